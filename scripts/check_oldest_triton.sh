#!/usr/bin/env bash
# The kernels on the oldest Triton this project supports (3.6, the Triton of current CUDA images such as
# torch 2.11's), beside the venv's own: Triton 3.6 is installed into a folder of its own that shadows the
# venv's through PYTHONPATH, and the kernel tests (interpreter) and an ahead-of-time compile gate run with it.
# Usage: scripts/check_oldest_triton.sh [VENV_DIR] [TARGET_DIR]
#
# numpy < 2.4 beside it: Triton 3.6's interpreter converts one-element arrays to Python scalars, which
# numpy 2.4 refuses (it warns from 1.25 on).
set -euo pipefail
venv=${1:-.venv}
target=${2:-.venv-triton36}
python="$venv/bin/python"
if [ ! -f "$target/.ready" ]; then
    echo "[oldest triton] installing triton==3.6.0 and numpy<2.4 into $target"
    rm -rf "$target"
    "$python" -m pip install -q --no-deps --no-compile --target "$target" "triton==3.6.0" "numpy<2.4"
    touch "$target/.ready"
fi
export PYTHONPATH="$PWD/$target"
"$python" -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__; print('[oldest triton] Triton', triton.__version__)"
"$python" -m pytest -q -n auto -p no:cacheprovider tests/test_st_attention.py tests/test_add_layer_norm.py tests/test_fused_linear.py \
    tests/test_cls_attention.py tests/test_max_pool.py tests/test_kernels_aot.py -k "not the_gate_passes" -W "ignore::DeprecationWarning:triton.runtime.interpreter"
# the gate on the main GPU target, at the paper's shapes (the full matrix is committed under benchmarks/results)
env -u TRITON_INTERPRET TRITON_CACHE_DIR="$(mktemp -d)" "$venv/bin/stt-fast" kernels aot --targets sm_90 \
    --dtypes fp16 --config paper --check --quiet > /dev/null && echo "[oldest triton] sm_90 fp16 gate passed"
