"""The TensorRT and CUDA-binding code, checked against the real APIs without a GPU.

TensorRT cannot run here (no GPU, no libnvinfer), but its Python bindings wheels install from the
registry, and every class, method, property and enum member they register is a string in their shared
library. So every TensorRT name the code uses must be in the bindings of each supported version:
10.3 (JetPack 6), the newest 10.x and the newest 11.x, or be version-gated (reached through getattr /
hasattr with a fallback). The pycuda calls of the edge runner are checked against pycuda's sources (it
does not build without CUDA), and the cuda-python calls against the installed cuda.bindings module.

The names are collected from the code, not listed by hand: every attribute read on a receiver that holds
a TensorRT, pycuda or cuda-python object, per file and scope (RECEIVERS below). The reference files are
fetched by scripts/fetch_api_references.py (run by scripts/setup_venv.sh) into .whl/api; tests never
download.
"""

import ast
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".whl" / "api"
TENSORRT_VERSIONS = ("10.3.0", "10.16.1.11", "11.4.0.106")
PYCUDA = "2026.1"

# (file, scope: a class or function name, or "*" for the whole file) -> receivers -> the API they belong to.
RECEIVERS = {
    ("export/tensorrt.py", "*"): {"trt": "tensorrt", "builder": "tensorrt", "builder_config": "tensorrt",
                                  "parser": "tensorrt", "profile": "tensorrt", "cache": "tensorrt",
                                  "runner.engine": "tensorrt", "inspector": "tensorrt"},
    ("export/tensorrt_backend.py", "*"): {"trt": "tensorrt"},
    ("export/engine_runtime.py", "EngineRunner"): {"trt": "tensorrt", "self._runtime": "tensorrt",
                                                   "self.engine": "tensorrt"},
    ("export/engine_runtime.py", "deserialize"): {"trt": "tensorrt", "runtime": "tensorrt"},
    ("export/engine_runtime.py", "describe_engine"): {"engine": "tensorrt"},
    ("export/engine_runtime.py", "_sidecar_for_existing_engine"): {"trt": "tensorrt", "plan": "tensorrt"},
    ("export/engine_runtime.py", "_enqueue"): {"context": "tensorrt"},
    ("export/engine_runtime.py", "_PyCudaBuffers"): {"cuda": "pycuda", "self.cuda": "pycuda",
                                                     "self.context": "pycuda", "self.stream": "pycuda"},
    ("export/engine_runtime.py", "current_gpu"): {"cuda": "pycuda", "dev": "pycuda", "cudart": "cuda-python"},
    ("export/engine_runtime.py", "_CudaRuntimeBuffers"): {"cudart": "cuda-python", "self.cudart": "cuda-python",
                                                          "kind": "cuda-python"},
    ("export/engine_runtime.py", "_cuda_check"): {"cudart": "cuda-python"},
}
# Subclasses of a TensorRT interface: the methods they define override the interface's own.
TENSORRT_INTERFACES = ("IProgressMonitor",)


def _receiver(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _scopes(tree: ast.Module):
    """(scope name, node) for the module ("*") and every class and function in it."""
    yield "*", tree
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            yield node.name, node


def used_names() -> dict[str, dict[str, bool]]:
    """api -> {name: gated}: every attribute the code reads on that API's objects; gated names are read
    through getattr(obj, "name", default) or hasattr(obj, "name")."""
    found: dict[str, dict[str, bool]] = {}
    for (file, scope), receivers in RECEIVERS.items():
        tree = ast.parse((ROOT / file).read_text())
        for name, node in _scopes(tree):
            if name != scope:
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute):
                    chain, base = [sub.attr], sub.value
                    while isinstance(base, (ast.Attribute, ast.Call)) and _receiver(base) not in receivers:
                        if isinstance(base, ast.Call):  # cuda.Device(0).retain_primary_context: through the call
                            base = base.func
                            continue
                        chain.append(base.attr)
                        base = base.value
                    api = receivers.get(_receiver(base))
                    if api:
                        for attribute in chain:
                            found.setdefault(api, {}).setdefault(attribute, False)
                elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and \
                        sub.func.id in ("getattr", "hasattr") and len(sub.args) >= 2:
                    target, attribute = sub.args[0], sub.args[1]
                    while isinstance(target, ast.Attribute) and _receiver(target) not in receivers:
                        target = target.value
                    api = receivers.get(_receiver(target))
                    if api and isinstance(attribute, ast.Constant):
                        found.setdefault(api, {})[attribute.value] = True
                elif isinstance(sub, ast.ClassDef) and any(
                        isinstance(b, ast.Attribute) and b.attr in TENSORRT_INTERFACES for b in sub.bases):
                    for method in sub.body:
                        if isinstance(method, ast.FunctionDef) and not method.name.startswith("__"):
                            found.setdefault("tensorrt", {}).setdefault(method.name, False)
    for names in found.values():
        names.pop("__version__", None)  # a module attribute of every package, not a binding
        names.pop("__init__", None)
    return found


def _cached(pattern: str) -> Path:
    matches = sorted(CACHE.glob(pattern))
    if not matches:
        pytest.fail(f"{CACHE / pattern} is missing: run `python scripts/fetch_api_references.py` "
                    "(scripts/setup_venv.sh does) to fetch the bindings this check reads")
    return matches[0]


def tensorrt_strings(version: str) -> bytes:
    with zipfile.ZipFile(_cached(f"tensorrt_cu12_bindings-{version}-*.whl")) as wheel:
        library = next(n for n in wheel.namelist() if n.endswith(".so"))
        return wheel.read(library)


def registered(name: str, library: bytes) -> bool:
    """A name the bindings register: a NUL-terminated string in the library (the linker may share the
    tail of a longer string, hence no check of what precedes it)."""
    return name.encode() + b"\0" in library


def test_the_scan_finds_the_calls_it_is_meant_to_check():
    names = used_names()
    for expected in ("Builder", "create_network", "set_memory_pool_limit", "OnnxParser", "execute_async_v3",
                     "set_tensor_address", "deserialize_cuda_engine", "WORKSPACE", "phase_start"):
        assert expected in names["tensorrt"], expected
    assert names["tensorrt"]["STRONGLY_TYPED"] and names["tensorrt"]["IProgressMonitor"], "version-gated names"
    assert {"mem_alloc", "memcpy_htod_async", "retain_primary_context", "push", "pop"} <= set(names["pycuda"])
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaFree", "cudaMallocHost", "cudaFreeHost",
            "cudaStreamDestroy"} <= set(names["cuda-python"])
    for expected in ("get_tensor_profile_shape", "num_io_tensors", "clear_flag", "create_engine_inspector",
                     "get_engine_information", "set_input_shape", "engine_host_code_allowed"):
        assert expected in names["tensorrt"], expected
    assert names["tensorrt"]["hardware_compatibility_level"] is not None


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_every_tensorrt_name_exists_in_each_supported_version(version):
    library = tensorrt_strings(version)
    assert registered("ICudaEngine", library) and not registered("no_such_tensorrt_api", library)
    names = used_names()["tensorrt"]
    missing = sorted(n for n, gated in names.items() if not gated and not registered(n, library))
    assert not missing, f"TensorRT {version} has no {missing}: gate them on the version or stop using them"


def test_version_gated_tensorrt_names_exist_in_some_supported_version():
    libraries = [tensorrt_strings(v) for v in TENSORRT_VERSIONS]
    gated = [n for n, is_gated in used_names()["tensorrt"].items() if is_gated]
    assert gated
    for name in gated:
        assert any(registered(name, library) for library in libraries), f"{name} exists in no supported version"


def test_pycuda_names_exist_in_its_sources():
    with tarfile.open(_cached(f"pycuda-{PYCUDA}.tar.gz")) as sdist:
        sources = "".join(sdist.extractfile(member).read().decode("utf-8", "replace") for member in sdist.getmembers()
                          if member.name.endswith(("wrap_cudadrv.cpp", "pycuda/driver.py")))
    for name in used_names()["pycuda"]:
        exported = re.search(rf'"{name}"|\bDEF_SIMPLE_\w+\({name}\)|\bdef {name}\b', sources)
        assert exported, f"pycuda {PYCUDA} exports no {name!r}"


def test_cuda_python_names_exist_in_the_installed_bindings():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (the dev extra has it)")
    names = used_names()["cuda-python"]
    holders = [runtime, runtime.cudaMemcpyKind, runtime.cudaError_t]
    missing = sorted(n for n in names if not any(hasattr(h, n) for h in holders) and n not in ("name",))
    assert not missing, f"cuda.bindings.runtime has no {missing}"


def test_cuda_python_buffers_fail_clearly_without_a_gpu():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (the dev extra has it)")
    import torch
    from stt_fast.export.engine_runtime import _CudaRuntimeBuffers, current_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the failure path cannot be shown")
    with pytest.raises(RuntimeError, match=r"cudaSetDevice failed: .*is there a CUDA GPU"):
        _CudaRuntimeBuffers(0)
    with pytest.raises(RuntimeError, match="cudaGetDeviceProperties failed"):
        current_gpu(0, "cuda-python")
