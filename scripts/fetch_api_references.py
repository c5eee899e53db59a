"""Fetch the public bindings whose API names tests/test_api_conformance.py checks the code against.

TensorRT cannot run without a GPU and libnvinfer, but its Python bindings wheels install from the
registry, and every class, method, property and enum member they register is a string in their shared
library. pycuda does not build without CUDA, but its source distribution lists its API. Both are
downloaded once into a cache folder (default .whl/api, ignored by git); the tests read them there and
never download anything.

    python scripts/fetch_api_references.py [CACHE_DIR]
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

# TensorRT 10.3: JetPack 6 (Jetson Orin); the newest 10.x; the newest 11.x.
TENSORRT_BINDINGS = ("10.3.0", "10.16.1.11", "11.4.0.106")
PYCUDA = "2026.1"


def fetch_wheel(requirement: str, cache: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                             "--no-deps", "--only-binary=:all:", "--dest", str(cache), requirement],
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"could not download {requirement}: {result.stderr.strip().splitlines()[-1]}")


def fetch_sdist(name: str, version: str, cache: Path) -> Path:
    """The source distribution of name==version from PyPI's simple index, its SHA-256 checked against the
    index's (pip would try to build it to read its metadata, which pycuda cannot do without CUDA)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        index = json.load(response)
    sdist = next(f for f in index["files"] if f["filename"] == f"{name}-{version}.tar.gz")
    target = cache / sdist["filename"]
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sdist["hashes"]["sha256"]:
        return target
    with urllib.request.urlopen(sdist["url"], timeout=120) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sdist["hashes"]["sha256"]:
        raise SystemExit(f"{sdist['filename']}: SHA-256 does not match PyPI's")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def main() -> int:
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl/api")
    cache.mkdir(parents=True, exist_ok=True)
    for version in TENSORRT_BINDINGS:
        if not list(cache.glob(f"tensorrt_cu12_bindings-{version}-*.whl")):
            fetch_wheel(f"tensorrt-cu12-bindings=={version}", cache)
    fetch_sdist("pycuda", PYCUDA, cache)
    print(f"[api references] TensorRT bindings {', '.join(TENSORRT_BINDINGS)} and pycuda {PYCUDA} in {cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
