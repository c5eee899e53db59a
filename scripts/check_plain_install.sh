#!/usr/bin/env bash
# Prove that a plain (non-editable) `pip install .` works: install into a scratch folder, then import
# every package from there (not from the source tree) and run the CLI and a tiny model.
# Usage: scripts/check_plain_install.sh VENV_DIR
set -euo pipefail
venv=$(cd "${1:-.venv}" && pwd)
repo=$(pwd)
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
"$venv/bin/python" -m pip --disable-pip-version-check install -q --no-deps --target "$target" "$repo"
cd "$target"
PYTHONPATH="$target" "$venv/bin/python" - "$target" <<'PY'
import sys, torch
target = sys.argv[1]
import stt_fast, stt_fast.kernels, stt_fast.export, stt_fast.data, stt_fast.cli, stt_fast.compiler, stt_fast.serving
import stt_fast.benchmarks
packages = (stt_fast, stt_fast.kernels, stt_fast.export, stt_fast.data, stt_fast.cli, stt_fast.compiler,
            stt_fast.serving, stt_fast.benchmarks)
for mod in packages:
    assert mod.__file__.startswith(target), f"{mod.__name__} imported from {mod.__file__}, not {target}"
config = stt_fast.get_config("tiny")
logits = stt_fast.STT(config).eval()(torch.rand(1, config.num_frames, 3, config.image_size, config.image_size))
assert logits.shape == (1, 7)
print("[plain install]", ", ".join(m.__name__ for m in packages), "import from", target)
PY
PYTHONPATH="$target" "$venv/bin/python" -m stt_fast info --config tiny > /dev/null
echo "[plain install] ok"
