#!/usr/bin/env bash
# Create (or refresh) a virtual environment with stt_fast installed in editable mode and the tools
# the tests and benchmarks use. Usage: scripts/setup_venv.sh [VENV_DIR]
#
# torch is pinned here, and only here (pyproject.toml keeps torch>=2.4): TORCH_SPEC overrides it,
# for example TORCH_SPEC="torch==2.11.0" to match a machine's CUDA stack.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $torch_spec"
    "${pip[@]}" install -q "$torch_spec"
fi
echo "[setup] installing stt_fast (editable) with its dev extras"
"${pip[@]}" install -q -e ".[dev]"
echo "[setup] fetching the TensorRT bindings and pycuda sources the API check reads (into .whl/api)"
"$venv/bin/python" scripts/fetch_api_references.py .whl/api
"$venv/bin/python" -c "import stt_fast, torch; print(f'[setup] stt_fast {stt_fast.__version__}, torch {torch.__version__}')"
