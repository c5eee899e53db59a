"""Packaging: the top-level folders kernels/, export/ and benchmarks/ install as stt_fast.kernels,
stt_fast.export and stt_fast.benchmarks (the benchmark code, not its stored results).

Metadata lives in pyproject.toml; only the package mapping is here.
"""

from setuptools import setup

PACKAGES = {
    "stt_fast": "stt_fast",
    "stt_fast.compiler": "stt_fast/compiler",
    "stt_fast.cli": "stt_fast/cli",
    "stt_fast.serving": "stt_fast/serving",
    "stt_fast.data": "stt_fast/data",
    "stt_fast.kernels": "kernels",
    "stt_fast.export": "export",
    "stt_fast.benchmarks": "benchmarks",
}

setup(packages=list(PACKAGES), package_dir=PACKAGES)
