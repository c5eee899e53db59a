"""Packaging: the top-level folders kernels/ and export/ install as stt_fast.kernels and stt_fast.export.

Metadata lives in pyproject.toml; only the package mapping is here.
"""

from setuptools import setup

PACKAGES = {
    "stt_fast": "stt_fast",
    "stt_fast.compiler": "stt_fast/compiler",
    "stt_fast.data": "stt_fast/data",
    "stt_fast.kernels": "kernels",
    "stt_fast.export": "export",
}

setup(packages=list(PACKAGES), package_dir=PACKAGES)
