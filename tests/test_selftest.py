"""`stt-fast selftest` on a machine without a GPU: it runs the CPU parts, lists what it skipped and why, and
writes one folder with a summary ready to send back."""

import json
import os
import subprocess
import sys

import pytest

GPU_ONLY = {"cuda-graphs": "CUDA GPU", "devices": "two CUDA GPUs", "launch-plan": "CUDA GPU",
            "kernel-bench": "CUDA GPU", "tensorrt": "CUDA GPU", "aot": "no local GPU"}


@pytest.mark.slow
def test_selftest_on_the_cpu_runs_the_cpu_parts_and_lists_the_rest(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this test checks the CPU-only behaviour; on a GPU run `stt-fast selftest` itself")
    entry = os.path.join(os.path.dirname(sys.executable), "stt-fast")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([entry, "selftest", "--config", "tiny", "--quick", "--output", str(tmp_path), "--quiet"],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = next(tmp_path.glob("*/*"))
    report = json.loads((folder / "selftest.json").read_text())
    status = {item["name"]: item for item in report["items"]}
    assert [i["name"] for i in report["items"]] == ["kernels", "cuda-graphs", "backends", "no-host-sync", "devices",
                                                    "launch-plan", "kernel-bench", "bench", "tensorrt", "aot"]
    for name in ("kernels", "backends", "no-host-sync", "bench"):
        assert status[name]["status"] == "passed", status[name]
    assert "interpreter" in status["kernels"]["detail"] and "fake CUDA" in status["no-host-sync"]["detail"]
    for name, reason in GPU_ONLY.items():
        assert status[name]["status"] == "skipped" and reason in status[name]["detail"]
        assert f"  {name}: " in result.stdout, "the skip list is printed"
    summary = (folder / "SUMMARY.md").read_text()
    assert "4 passed, 0 failed, 6 skipped" in summary and "no GPU" in summary
    assert {"kernels.json", "backends.json", "bench.md", "SUMMARY.md"} <= {p.name for p in folder.rglob("*")}


def test_a_gpu_that_is_not_there_is_named(capsys):
    """Refused as the options are read (status 2, one line naming the devices here), before any work."""
    import torch

    from stt_fast.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as stop:
        main(["selftest", "--device", "cuda:3", "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "cuda:3" in err and "this machine has: cpu" in err
    assert len(err.strip().splitlines()) == 1
