"""Benchmark suite on the CPU (tiny config): every CPU backend runs and writes a complete result; the report
renders tables and plots; the regression check flags a planted slowdown and passes an equal run."""

import copy
import json

import pytest
import torch
from stt_fast.benchmarks import bench_st_attention
from stt_fast.benchmarks.backends import BACKENDS
from stt_fast.benchmarks.harness import run_suite
from stt_fast.benchmarks.report import compare, load_results, markdown, plots
from stt_fast.benchmarks.timing import measure, percentile

from stt_fast import STT, get_config, save_checkpoint
from stt_fast.cli import main

CPU_BACKENDS = [name for name, b in BACKENDS.items() if b.unavailable(torch.device("cpu")) is None]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result, path = run_suite("tiny", batch_sizes=[1, 2], device="cpu", output_dir=out, min_seconds=0.05,
                             progress=False)
    return result, path


def test_every_cpu_backend_runs_and_writes_every_field(suite):
    result, path = suite
    assert json.loads(path.read_text())["created"] == result["created"]
    assert path.parent.name == result["machine"]["slug"] and result["machine"]["slug"].startswith("cpu-")
    for key in ("torch", "triton", "onnxruntime", "cpu", "cpu_count", "python"):
        assert key in result["machine"]
    assert result["ceilings"]["matmul_tflops"] > 0 and result["ceilings"]["copy_gbps"] > 0
    assert result["model"]["flops_per_clip"] > 0
    by_name = {r["backend"]: r for r in result["results"]}
    assert set(by_name) == set(BACKENDS)
    assert {"eager-fp32", "torch-compile", "stt_fast-fp32", "onnxruntime-fp32", "onnxruntime-fp16"} <= set(CPU_BACKENDS)
    for name in CPU_BACKENDS:
        record = by_name[name]
        assert "error" not in record, record.get("error")
        assert record["build_seconds"] >= 0 and record["size_bytes"] > 0
        assert [b["batch"] for b in record["batches"]] == [1, 2]
        for b in record["batches"]:
            t = b["timing"]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"] <= t["p99_ms"]
            assert b["clips_per_second"] > 0 and b["fraction_of_peak"] > 0 and b["peak_memory_mb"] > 0
            assert b["first_call_ms"] > 0 and b["speedup_vs_eager_fp32"] > 0
            assert b["accuracy"]["top1_agreement"] == 1.0
            limit = 5e-3 if record["precision"] == "fp16" else 1e-4
            assert b["accuracy"]["relative_error"] < limit
    assert by_name["eager-fp32"]["batches"][0]["accuracy"]["relative_error"] == 0.0
    for name in set(BACKENDS) - set(CPU_BACKENDS):
        assert by_name[name]["skipped"]


def test_report_renders_tables_and_plots(suite, tmp_path):
    result, path = suite
    other = copy.deepcopy(result)
    other["machine"]["slug"] = "nvidia-h100-80gb-hbm3"
    other["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    other_path = tmp_path / "nvidia-h100-80gb-hbm3" / "run.json"
    other_path.parent.mkdir()
    other_path.write_text(json.dumps(other))
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "run.json").write_text(path.read_text())
    results = load_results(tmp_path)
    text = markdown(results)
    assert text.count("### ") == 2 and "| stt_fast-fp32 | 2 |" in text and "NVIDIA H100 80GB HBM3 (sm 9.0)" in text
    assert "TensorRT is not installed" in text
    for png in plots(results, tmp_path / "plots"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "latency_vs_batch.png",
                                                                      "speedup.png"]


def test_regression_check_flags_a_planted_slowdown_and_passes_an_equal_run(suite, tmp_path, capsys):
    result, path = suite
    assert compare(result, result) == []
    slow = copy.deepcopy(result)
    target = next(r for r in slow["results"] if r["backend"] == "stt_fast-fp32")
    target["batches"][1]["timing"]["median_ms"] *= 1.5
    found = compare(slow, result, threshold=0.10)
    assert len(found) == 1 and found[0].startswith("stt_fast-fp32 batch 2: median")
    slow_path = tmp_path / "slow.json"
    slow_path.write_text(json.dumps(slow))
    assert main(["bench", "report", "--current", str(slow_path), "--baseline", str(path)]) == 1
    assert "REGRESSION stt_fast-fp32 batch 2" in capsys.readouterr().out
    assert main(["bench", "report", "--current", str(path), "--baseline", str(path)]) == 0


def test_labelled_accuracy_beside_latency(tmp_path):
    from stt_fast.data.datasets import ClipDataset, dfew_items
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew

    root = write_synthetic_dfew(tmp_path / "data", SynthConfig(clips_per_class=2), progress=False)
    checkpoint = save_checkpoint(STT(get_config("tiny")).eval(), tmp_path / "m.safetensors")
    dataset = ClipDataset(dfew_items(root, 1, "test"), num_frames=4, image_size=64, train=False)
    result, _ = run_suite("tiny", batch_sizes=[1], backends=["stt_fast-fp32"], device="cpu",
                          checkpoint=str(checkpoint), labelled=dataset, output_dir=None, min_seconds=0.01,
                          progress=False)
    assert [r["backend"] for r in result["results"]] == ["eager-fp32", "stt_fast-fp32"], "the peer is always run"
    reference, fast = result["results"]
    assert reference["labelled"]["samples"] == 7 and reference["labelled"]["war_minus_reference"] == 0
    assert fast["labelled"]["war"] == pytest.approx(reference["labelled"]["war"])
    assert result["checkpoint_sha256"] and result["labelled_samples"] == 7


def test_timing_helper():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    calls = []
    timing = measure(lambda: calls.append(1), "cpu", warmup=2, min_runs=7, max_runs=7, min_seconds=0)
    assert len(calls) == 9 and timing.runs == 7 and timing.warmup_runs == 2


def test_kernel_microbenchmark_on_the_cpu():
    result, _ = bench_st_attention.run([1], "fp32", "cpu", frames=3, patches=5, heads=2, head_dim=16,
                                       min_seconds=0.01, output_dir=None)
    rows = {(r["mode"], r["impl"]): r for r in result["rows"]}
    assert "CUDA only" in rows[("joint", "st_attention")]["skipped"]
    for mode in ("joint", "spatial", "temporal"):
        for impl in ("sdpa-math", "reference"):
            row = rows[(mode, impl)]
            assert row["relative_error"] < 1e-5 and row["tflops"] > 0 and row["gbps"] > 0
    assert bench_st_attention.attention_flops("temporal", 1, 16, 49, 8, 64) == 4 * 8 * 64 * 49 * 16 * 16
