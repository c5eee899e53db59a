"""Benchmark suite on the CPU (tiny config): every CPU backend, peers included, runs and writes a complete
result; ratios and accuracy are what an independent recomputation gives; the report renders tables and
plots; the regression gate fails on every kind of regression and passes an equal run."""

import copy
import json
import re

import pytest
import torch
from stt_fast.benchmarks import bench_st_attention
from stt_fast.benchmarks.backends import BACKENDS
from stt_fast.benchmarks.harness import failures, run_suite
from stt_fast.benchmarks.report import compare, load_results, markdown, plots, precision_family
from stt_fast.benchmarks.timing import measure, measure_interleaved, percentile

import stt_fast
from stt_fast import STT, get_config, save_checkpoint
from stt_fast.accuracy import relative_error, tolerance
from stt_fast.cli import main
from stt_fast.flops import model_cost, program_flops
from tests.helpers import trained_looking

CPU_BACKENDS = [name for name, b in BACKENDS.items() if b.unavailable(torch.device("cpu")) is None]
PEERS = {name for name, b in BACKENDS.items() if b.role == "peer"}
PEERS_ON_THE_CPU = {"eager-fp32", "torch-compile", "onnxruntime-plain-fp32", "openvino-fp32", "openvino-default"}


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
    config = get_config("tiny")
    assert result["model"]["flops_per_clip"] == model_cost(config).flops_per_clip
    assert result["model"]["program_flops_per_clip"] == program_flops(config)
    by_name = {r["backend"]: r for r in result["results"]}
    assert set(by_name) == set(BACKENDS)
    assert PEERS_ON_THE_CPU | {"stt_fast-fp32", "stt_fast-onnxruntime-fp32"} <= set(CPU_BACKENDS)
    assert not failures(result)
    for name in CPU_BACKENDS:
        record = by_name[name]
        assert record["role"] == ("peer" if name in PEERS else "ours")
        assert record["build_seconds"] >= 0 and record["size_bytes"] > 0
        assert [b["batch"] for b in record["batches"]] == [1, 2]
        for b in record["batches"]:
            t = b["timing"]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"] <= t["p99_ms"]
            assert b["clips_per_second"] > 0 and b["fraction_of_peak"] > 0 and b["peak_memory_mb"] > 0
            assert b["first_call_ms"] > 0 and b["speedup_vs_eager_fp32"] > 0
            family_peers = [n for n in CPU_BACKENDS if n in PEERS
                            and precision_family(BACKENDS[n].precision) == precision_family(record["precision"])]
            assert (b["vs_fastest_peer"] > 0) if family_peers else "vs_fastest_peer" not in b
            if record["precision"] == "fp32":  # reduced precisions may flip a close call of the random tiny model
                assert b["accuracy"]["top1_agreement"] == 1.0
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                     "int8": torch.int8}[record["precision"]]
            assert b["accuracy"]["relative_error"] < tolerance(dtype).model
    for name in set(BACKENDS) - set(CPU_BACKENDS):
        assert by_name[name]["skipped"]
    default = by_name["stt_fast-fp32"]["notes"]
    if "backend=onnxruntime" in default:  # compile's CPU default is OpenVINO where installed, else ONNX Runtime
        assert by_name["stt_fast-fp32"]["same_as"] == "stt_fast-onnxruntime-fp32", "the report must say they are one"
    else:
        assert "same_as" not in by_name["stt_fast-fp32"]


def test_rows_of_one_engine_are_marked_as_one():
    from stt_fast.benchmarks.harness import _same_graph_notes

    records = [{"backend": "stt_fast-fp32", "notes": "backend=onnxruntime", "batches": []},
               {"backend": "stt_fast-onnxruntime-fp32", "notes": "CPU EP", "batches": []},
               {"backend": "stt_fast-torch-fp32", "notes": "backend=torch", "batches": []}]
    _same_graph_notes(records)
    assert records[0]["same_as"] == "stt_fast-onnxruntime-fp32" and records[1]["same_as"] == "stt_fast-fp32"
    assert "same_as" not in records[2]


def test_ratios_are_those_of_the_recorded_medians(suite):
    result, _ = suite
    records = {r["backend"]: r for r in result["results"]}
    for batch_index in (0, 1):
        medians = {name: r["batches"][batch_index]["timing"]["median_ms"] for name, r in records.items()
                   if "batches" in r and r["precision"] == "fp32"}
        peers = [name for name in PEERS_ON_THE_CPU if name in medians]  # openvino-default is bf16 on bf16 CPUs
        fastest_peer = min(medians[name] for name in peers)
        for name, ms in medians.items():
            entry = records[name]["batches"][batch_index]
            assert entry["vs_fastest_peer"] == pytest.approx(fastest_peer / ms)
            assert entry["speedup_vs_eager_fp32"] == pytest.approx(medians["eager-fp32"] / ms)
        assert max(records[name]["batches"][batch_index]["vs_fastest_peer"] for name in peers) == pytest.approx(1.0)


def test_recorded_accuracy_matches_an_independent_recomputation(suite):
    """The suite's inputs are reproducible (seed 0): recompute one backend's error against the reference."""
    result, _ = suite
    torch.manual_seed(0)
    model = STT(get_config("tiny")).eval()  # the suite builds its model right after seeding
    generator = torch.Generator().manual_seed(0)
    c = model.config
    inputs = [torch.rand(b, c.num_frames, 3, c.image_size, c.image_size, generator=generator) for b in (1, 2)]
    compiled = stt_fast.compile(model, backend="torch", validate=False)
    record = next(r for r in result["results"] if r["backend"] == "stt_fast-torch-fp32")
    for x, entry in zip(inputs, record["batches"]):
        with torch.no_grad():
            expected = relative_error(compiled(x), model(x))
        assert entry["accuracy"]["relative_error"] == pytest.approx(expected, rel=0.5, abs=1e-9)
        assert entry["accuracy"]["relative_error"] > 0, "a rewritten program differs from the reference by rounding"


def test_a_backend_that_fails_is_reported_and_the_command_exits_non_zero(monkeypatch, tmp_path, capsys):
    from stt_fast.benchmarks import backends

    def broken(model, device, workdir):
        raise RuntimeError("injected build failure")

    monkeypatch.setitem(backends.BACKENDS, "stt_fast-torch-fp32",
                        backends.Backend("stt_fast-torch-fp32", "fp32", "ours", lambda d: None, broken))
    code = main(["bench", "--config", "tiny", "--batch-sizes", "1", "--backends", "stt_fast-torch-fp32",
                 "--min-seconds", "0.01", "--output", str(tmp_path), "--quiet"])
    assert code == 1
    assert "stt_fast-torch-fp32: build failed: RuntimeError: injected build failure" in capsys.readouterr().err


def test_selftest_runs_never_replace_a_full_run_in_the_report(suite, tmp_path):
    """A newer batch-1 selftest result of the same machine and config is left out of a folder's report (and
    taken when asked for, or named as a file). (Mutation: without the purpose check, the report's newest
    tiny run is the selftest's, and the other batch rows vanish.)"""
    result, path = suite
    full = tmp_path / "machine" / "full.json"
    full.parent.mkdir()
    full.write_text(path.read_text())
    quick = copy.deepcopy(result)
    quick["purpose"], quick["created"] = "selftest", "2999-01-01T00:00:00+00:00"
    quick["batch_sizes"] = [1]
    (tmp_path / "machine" / "selftest.json").write_text(json.dumps(quick))
    assert [r["_path"] for r in load_results(tmp_path)] == [str(full)]
    assert len(load_results(tmp_path, include_selftest=True)) == 2
    assert load_results(tmp_path / "machine" / "selftest.json")[0]["purpose"] == "selftest"
    assert result["purpose"] == "bench"


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
    # (a row measured on a busy machine carries "(noisy)" after its name)
    assert text.count("### ") == 2 and re.search(r"\| stt_fast-fp32( \(noisy\))? \| ours \| 2 \|", text)
    assert "NVIDIA H100 80GB HBM3 (sm 9.0)" in text
    assert "TensorRT is not installed" in text and "Fastest peer per batch size" in text
    twin = copy.deepcopy(result)
    next(r for r in twin["results"] if r["backend"] == "stt_fast-fp32")["same_as"] = "stt_fast-onnxruntime-fp32"
    assert "the same engine and graph as stt_fast-onnxruntime-fp32" in markdown([twin])
    for png in plots(results, tmp_path / "plots"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "latency_vs_batch.png",
                                                                      "speedup.png"]


def test_noisy_measurements_are_flagged_in_the_table(suite):
    result, _ = suite
    noisy = copy.deepcopy(result)
    entry = next(r for r in noisy["results"] if r["backend"] == "stt_fast-fp32")["batches"][0]
    entry["noisy"] = "p90 is 3.0x the median"
    text = markdown([noisy])
    assert "| stt_fast-fp32 (noisy) | ours | 1 |" in text and "stt_fast-fp32 batch 1: p90 is 3.0x" in text


def _record(result, backend):
    return next(r for r in result["results"] if r["backend"] == backend)


def _slower(r):
    _record(r, "stt_fast-fp32")["batches"][1]["timing"]["median_ms"] *= 1.5


def _top1_lower(r):
    _record(r, "stt_fast-fp32")["batches"][1]["accuracy"]["top1_agreement"] = 0.5


def _error_higher(r):
    _record(r, "stt_fast-fp32")["batches"][1]["accuracy"]["relative_error"] = 0.5


def _backend_errored(r):
    record = _record(r, "stt_fast-fp32")
    del record["batches"]
    record["error"] = "build failed: boom"


def _backend_missing(r):
    r["results"] = [x for x in r["results"] if x["backend"] != "stt_fast-fp32"]


def _batch_failed(r):
    _record(r, "stt_fast-fp32")["batches"][1] = {"batch": 2, "error": "OOM"}


REGRESSIONS = {
    "slower": (_slower, "stt_fast-fp32 batch 2: median"),
    "top1-lower": (_top1_lower, "stt_fast-fp32 batch 2: top-1 agreement 0.500"),
    "error-higher": (_error_higher, "stt_fast-fp32 batch 2: relative error 5.00e-01"),
    "backend-errored": (_backend_errored, "stt_fast-fp32: measured in the baseline, not in this run (build failed"),
    "backend-missing": (_backend_missing, "stt_fast-fp32: measured in the baseline, missing from this run"),
    "batch-failed": (_batch_failed, "stt_fast-fp32 batch 2: failed in this run (OOM)"),
}


@pytest.mark.parametrize("kind", list(REGRESSIONS))
def test_regression_gate_catches(suite, kind):
    result, _ = suite
    change, expected = REGRESSIONS[kind]
    changed = copy.deepcopy(result)
    change(changed)
    found = compare(changed, result, threshold=0.10)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_regression_gate_scales_latency_by_the_measured_peak(suite):
    """A run 2.5x slower on a machine measured 2.5x slower is no regression; 2.5x slower at the same peak
    is; peaks over 2x apart are refused with the reason. (Mutation: raw medians report +150% regressions
    on a busy machine.)"""
    from stt_fast.benchmarks.report import peak_ratio

    result, _ = suite
    slow = copy.deepcopy(result)
    for record in slow["results"]:
        for b in record.get("batches", []):
            if "timing" in b:
                b["timing"]["median_ms"] *= 1.8
    assert len(compare(slow, result)) > 0, "1.8x slower at the same peak"
    slow["ceilings"]["matmul_tflops"] = result["ceilings"]["matmul_tflops"] / 1.8
    assert peak_ratio(slow, result) == pytest.approx(1 / 1.8)
    assert compare(slow, result) == [], "as slow as its measured peak says"
    slow["ceilings"]["matmul_tflops"] = result["ceilings"]["matmul_tflops"] / 3
    with pytest.raises(ValueError, match="differ too much"):
        compare(slow, result)
    other = copy.deepcopy(result)
    other["machine"]["device"] = "cuda:0"
    with pytest.raises(ValueError, match="compare runs of one machine"):
        compare(other, result)


def test_regression_gate_passes_an_equal_run_and_exits_by_its_verdict(suite, tmp_path, capsys):
    result, path = suite
    assert compare(result, result) == []
    slow = copy.deepcopy(result)
    _slower(slow)
    slow_path = tmp_path / "slow.json"
    slow_path.write_text(json.dumps(slow))
    assert main(["bench", "report", "--current", str(slow_path), "--baseline", str(path)]) == 1
    assert "REGRESSION stt_fast-fp32 batch 2" in capsys.readouterr().out
    assert main(["bench", "report", "--current", str(path), "--baseline", str(path)]) == 0


def test_labelled_accuracy_beside_latency(tmp_path):
    """A model whose predictions vary from clip to clip, so that equal WAR/UAR and equal confusion matrices
    mean the backends agree clip by clip, not that both predict one class."""
    from stt_fast.data.datasets import ClipDataset, dfew_items
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew

    root = write_synthetic_dfew(tmp_path / "data", SynthConfig(clips_per_class=3), progress=False)
    dataset = ClipDataset(dfew_items(root, 1, "test"), num_frames=4, image_size=64, train=False)
    model = trained_looking(get_config("tiny"))
    # A nearest-prototype head: class k's weights are clip k's centred features, so each clip leans to its own
    # class (an untrained head predicts one class for every clip, whatever the backend).
    features = []
    hook = model.norm.register_forward_hook(lambda module, args, out: features.append(out))
    with torch.no_grad():
        model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
        hook.remove()
        mean = features[0].mean(dim=0)
        weight = (features[0] - mean) / (features[0] - mean).norm(dim=1, keepdim=True)
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-weight @ mean)  # logits of the centred features
    checkpoint = save_checkpoint(model, tmp_path / "m.safetensors")
    result, _ = run_suite("tiny", batch_sizes=[1], backends=["stt_fast-fp32"], device="cpu",
                          checkpoint=str(checkpoint), labelled=dataset, output_dir=None, min_seconds=0.01,
                          progress=False)
    assert [r["backend"] for r in result["results"]] == ["eager-fp32", "stt_fast-fp32"], "the peer is always run"
    reference, fast = result["results"]
    predicted_classes = sum(1 for column in zip(*reference["labelled"]["confusion_matrix"]) if sum(column))
    assert predicted_classes >= 3, "the check needs a model that does not predict a single class"
    assert reference["labelled"]["samples"] == 7 and reference["labelled"]["war_minus_reference"] == 0
    assert fast["labelled"]["confusion_matrix"] == reference["labelled"]["confusion_matrix"]
    assert fast["labelled"]["war"] == pytest.approx(reference["labelled"]["war"])
    assert result["checkpoint_sha256"] and result["labelled_samples"] == 7


def test_timing_helper():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    calls = []
    timing = measure(lambda: calls.append(1), "cpu", warmup=2, min_runs=7, max_runs=7, min_seconds=0)
    assert len(calls) == 9 and timing.runs == 7 and timing.warmup_runs == 2
    order = []
    timings = measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, "cpu",
                                  warmup=1, min_runs=4, max_runs=4, min_seconds=0, runs_per_round=2, settle=1)
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3, "each turn: one untimed, two timed"
    assert timings["a"].runs == timings["b"].runs == 4


def test_kernel_microbenchmark_on_the_cpu():
    result, _ = bench_st_attention.run([1], "fp32", "cpu", frames=3, patches=5, heads=2, head_dim=16,
                                       min_seconds=0.01, output_dir=None)
    rows = {(r["mode"], r["impl"]): r for r in result["rows"]}
    assert "CUDA only" in rows[("joint", "st_attention")]["skipped"]
    for mode in ("joint", "spatial", "temporal"):
        for impl in ("sdpa-math", "reference"):
            row = rows[(mode, impl)]
            assert row["relative_error"] < 1e-5 and row["tflops"] > 0 and row["gbps"] > 0


def test_a_machines_notes_are_shown_under_its_table(suite, tmp_path):
    result, path = suite
    folder = tmp_path / result["machine"]["slug"]
    folder.mkdir()
    (folder / "run.json").write_text(path.read_text())
    (folder / f"{result['config_name']}.notes.md").write_text("**Reading it.** What was tried, measured.")
    assert "**Reading it.** What was tried, measured." in markdown(load_results(tmp_path))
