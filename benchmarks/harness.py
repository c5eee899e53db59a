"""The benchmark suite: every available backend x every batch size, latency and accuracy side by side.

Every backend is built first (build time: compile / export / engine build). Then per batch size: each
backend's first call (compilation, autotuning, graph capture happen there) and its accuracy against
the float32 reference on the same inputs (relative and max error, top-1 agreement), and the memory
that call needed (CUDA: allocated beyond what was held before it; CPU: the process's peak RSS); then
the steady-state latency of all backends, timed in interleaved rounds so that a slow spell of the
machine hits them alike (median, p90, p99; each backend's turn starts with an untimed call, so that the
switch from another runtime is not timed: benchmarks/timing.py), and throughput. With a labelled set:
WAR and UAR and their difference to the reference.

Speed is given as ratios measured in the same run: to eager-fp32, and to the fastest peer of the same
precision family (fp32, or half: fp16/bf16), the peers being what a user would run instead
(benchmarks/backends.py). And as fractions of limits: "% of peak" is the reference model's FLOPs over
the time against the machine's measured matmul peak (DESIGN: it passes 100% for backends that prune
work); on a GPU of the datasheet table (stt_fast.bounds), the fraction of the roofline bound.

A measurement is flagged noisy when its spread says so (p90 above NOISY_SPREAD x the median) or when it
beats the measured ceiling (the FLOPs it executes, over its time, above NOISY_CEILING x the peak) in the
ceiling's own precision: either means the machine was disturbed while timing it or while measuring the
ceiling. ("% of peak" of a bf16 or int8 row is against the float32 peak: above 100% is what their units give.)
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import resource
import tempfile
import traceback
from pathlib import Path

import torch

from stt_fast.accuracy import logits_agreement
from stt_fast.checkpoint import load_checkpoint
from stt_fast.config import get_config
from stt_fast.files import sha256_file
from stt_fast.flops import model_cost, program_flops
from stt_fast.model import STT
from stt_fast.progress import progress_bar

from .backends import BACKENDS, REFERENCE, Backend, Built, resolve
from .machine import best_ceilings, machine_header, measure_ceilings, store_result
from .report import fastest_peers, precision_family, timed
from .timing import measure_interleaved, time_once

SCHEMA = 2
COMMITTED_RESULTS = Path(__file__).resolve().parent / "results"  # the project's reference runs (in a checkout)
NOISY_SPREAD = 1.5
NOISY_CEILING = 1.05


def default_batch_sizes(device: torch.device) -> list[int]:
    return [1, 8, 64, 256] if device.type == "cuda" else [1, 8]


@contextlib.contextmanager
def exact_float32():
    """No TF32 anywhere (the reference logits are the float32 ground truth)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _labelled_accuracy(built: Built, dataset) -> dict:
    from stt_fast.training import evaluate

    result = evaluate(lambda clips: built.run(clips.to(built.input_device)).float().cpu(), dataset,
                      batch_size=16, workers=0, progress=False)
    return {"war": result["war"], "uar": result["uar"], "samples": result["samples"],
            "confusion_matrix": result["confusion_matrix"]}


def _build(backend: Backend, model: STT, device: torch.device, workdir: Path) -> tuple[dict, Built | None]:
    record: dict = {"backend": backend.name, "precision": backend.precision, "role": backend.role,
                    "executed_flops_per_clip": backend.executed_flops(model.config)}
    reason = backend.unavailable(device)
    if reason:
        return record | {"skipped": reason}, None
    try:
        built = backend.build(model, device, workdir)
    except Exception as e:  # a backend that fails to build is reported, the suite goes on
        return record | {"error": f"build failed: {type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=3)}, None
    return record | {"build_seconds": round(built.build_seconds, 3), "size_bytes": built.size_bytes,
                     "notes": built.notes, "batches": []}, built


def _first_call(built: Built, x: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor, float]:
    """(first call ms, logits, memory in MiB the call needed beyond what was allocated before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    outputs = []
    with torch.no_grad():  # the timed first call's own logits are the ones checked: no second run
        ms = time_once(lambda: outputs.append(built.run(x)), device)
    logits = outputs[0].float().cpu()
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide peak RSS (Linux: KiB)
    return ms, logits, extra


def run_batch(records: list[dict], builts: list[Built], batch: int, clips: torch.Tensor, reference: torch.Tensor,
              device: torch.device, *, min_seconds: float, progress: bool = True) -> None:
    """First call and accuracy of every built backend, then their steady-state times, interleaved. A
    backend that fails at this batch size gets an error entry and is left out of the timing."""
    fns, entries = {}, {}
    bar = progress_bar(desc=f"[bench] batch {batch}: first calls", total=len(records), enabled=progress,
                       unit="backend")
    for record, built in zip(records, builts):
        bar.set_postfix_str(record["backend"])
        x = clips.to(built.input_device)
        try:
            first_ms, logits, memory = _first_call(built, x, device)
        except Exception as e:  # a backend that fails is reported, the suite goes on
            record["batches"].append({"batch": batch, "error": f"{type(e).__name__}: {e}"})
            bar.update()
            continue
        entries[record["backend"]] = {"batch": batch, "first_call_ms": round(first_ms, 3),
                                      "peak_memory_mb": round(memory, 1),
                                      "accuracy": logits_agreement(logits, reference)}
        fns[record["backend"]] = lambda b=built, x=x: b.run(x)
        bar.update()
    bar.close()
    runs = 6
    bar = progress_bar(desc=f"[bench] batch {batch}: timing", total=runs * len(fns), enabled=progress, unit="run")

    def on_run(name: str) -> None:
        if bar.n >= bar.total:
            bar.total += len(fns)
        bar.set_postfix_str(name)
        bar.update()

    # rounds of one untimed call (after the switch from another runtime) and two timed ones per backend
    timings = measure_interleaved(fns, device, warmup=2, min_runs=runs, min_seconds=min_seconds, runs_per_round=2,
                                  settle=1, on_run=on_run)
    bar.close()
    for record in records:
        entry = entries.get(record["backend"])
        if entry is None:
            continue
        timing = timings[record["backend"]]
        entry |= {"timing": timing.to_dict(), "clips_per_second": batch / (timing.median_ms / 1e3)}
        record["batches"].append(entry)


def failures(result: dict) -> list[str]:
    """The backends that errored (at build, or at some batch size); unavailable ones are not failures."""
    found = []
    for record in result["results"]:
        if "error" in record:
            found.append(f"{record['backend']}: {record['error']}")
        for b in record.get("batches", []):
            if "error" in b:
                found.append(f"{record['backend']} batch {b['batch']}: {b['error']}")
    return found


def _ratios(records: list[dict]) -> None:
    """Speed-up over eager-fp32 and over the fastest peer of the same precision family, both measured in
    the same run, and labelled-set deltas to the reference."""
    ref = next((r for r in records if r["backend"] == REFERENCE), None)
    ref_ms = {b["batch"]: b["timing"]["median_ms"] for b in timed(ref)}
    fastest = fastest_peers(records)
    for r in records:
        for b in timed(r):
            ms = b["timing"]["median_ms"]
            if b["batch"] in ref_ms:
                b["speedup_vs_eager_fp32"] = ref_ms[b["batch"]] / ms
            peer = fastest.get((precision_family(r["precision"]), b["batch"]))
            if peer is not None:
                b["vs_fastest_peer"] = peer[0] / ms
                b["fastest_peer"] = peer[1]
        if ref and "labelled" in r and "labelled" in ref:
            r["labelled"]["war_minus_reference"] = r["labelled"]["war"] - ref["labelled"]["war"]
            r["labelled"]["uar_minus_reference"] = r["labelled"]["uar"] - ref["labelled"]["uar"]


_PEAK_PRECISION = {"torch.float32": "fp32", "torch.float16": "fp16"}


def _limits(records: list[dict], config, ceilings: dict, header: dict) -> None:
    """Fractions of the measured peak and of the GPU's roofline bound, and the noise flags."""
    from stt_fast.bounds import program_bound

    model_flops = model_cost(config).flops_per_clip
    gpu = header.get("gpu", {})
    for r in records:
        for b in timed(r):
            seconds = b["timing"]["median_ms"] / 1e3
            b["fraction_of_peak"] = model_flops * b["batch"] / seconds / (ceilings["matmul_tflops"] * 1e12)
            ceiling = r["executed_flops_per_clip"] * b["batch"] / seconds / (ceilings["matmul_tflops"] * 1e12)
            bound = program_bound(gpu["name"], config, b["batch"], r["precision"], memory_gib=gpu.get("memory_gib"),
                                  executed=r["executed_flops_per_clip"]) if gpu else None
            if bound is not None:
                b["bound_ms"] = bound.microseconds / 1e3
                b["fraction_of_bound"] = bound.microseconds / 1e3 / b["timing"]["median_ms"]
            reasons = []
            spread = b["timing"]["p90_ms"] / b["timing"]["median_ms"]
            if spread > NOISY_SPREAD:
                reasons.append(f"p90 is {spread:.1f}x the median")
            # the peak is measured in the ceiling's dtype (float32 on a CPU, float16 on a GPU): bf16 and int8
            # units run faster than it, so only rows of that precision can beat it by noise
            if ceiling > NOISY_CEILING and r["precision"] == _PEAK_PRECISION.get(ceilings.get("matmul_dtype"), "fp32"):
                reasons.append(f"{100 * ceiling:.0f}% of the measured matmul peak for the FLOPs it executes")
            if reasons:
                b["noisy"] = "; ".join(reasons)


# stt_fast.compile's backend -> the row that runs that backend explicitly
EXPLICIT_ROWS = {"onnxruntime": "stt_fast-onnxruntime-fp32", "torch": "stt_fast-torch-fp32"}


def _same_graph_notes(records: list[dict]) -> None:
    """stt_fast-fp32 runs compile's default backend; when another row runs that same backend explicitly
    (ONNX Runtime on stt_fast's graph, say), they are one engine, not two. Say so on both rows."""
    by_name = {r["backend"]: r for r in records}
    auto = by_name.get("stt_fast-fp32")
    for backend, name in EXPLICIT_ROWS.items():
        twin = by_name.get(name)
        if auto and twin and f"backend={backend}" in auto.get("notes", "") and "batches" in twin:
            auto["same_as"] = twin["backend"]
            twin["same_as"] = auto["backend"]


def run_suite(config_name: str = "paper", *, batch_sizes: list[int] | None = None, backends: list[str] | None = None,
              device: str | None = None, checkpoint: str | None = None, labelled=None,
              output_dir: str | Path | None = None, min_seconds: float = 1.0, progress: bool = True, seed: int = 0,
              name: str | None = None, purpose: str = "bench") -> tuple[dict, Path | None]:
    """Run the suite and write OUTPUT_DIR/<machine>/<time>-<name>.json; returns (result, path).

    purpose: "bench" (a full run) or "selftest" (a short check, which reports leave out by default).
    checkpoint: benchmark this model (else config_name with random weights).
    labelled: a ClipDataset to measure WAR/UAR on (its config must be the model's).
    name: what the run is called in results and reports (default: the config name, or the checkpoint's).
    output_dir None: nothing written.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(seed)
    model = load_checkpoint(checkpoint) if checkpoint else STT(get_config(config_name)).eval()
    config = model.config
    chosen = resolve(backends)
    if REFERENCE not in [b.name for b in chosen]:
        chosen.insert(0, BACKENDS[REFERENCE])  # the accuracy reference and the peer of every ratio
    batch_sizes = batch_sizes or default_batch_sizes(device)
    cost = model_cost(config)
    header = machine_header(device)
    ceilings = measure_ceilings(device)
    generator = torch.Generator().manual_seed(seed)
    inputs = {b: torch.rand(b, config.num_frames, 3, config.image_size, config.image_size, generator=generator)
              for b in batch_sizes}
    with exact_float32(), torch.no_grad():
        reference = model.to(device)
        references = {b: reference(x.to(device)).float().cpu() for b, x in inputs.items()}
        model.cpu()
    records, builts = [], []
    with tempfile.TemporaryDirectory(prefix="stt_fast-bench-") as tmp:
        bar = progress_bar(chosen, desc="[bench] build", enabled=progress, unit="backend")
        for backend in bar:
            bar.set_postfix_str(backend.name)
            record, built = _build(backend, model, device, Path(tmp))
            records.append(record)
            builts.append(built)
        running = [(r, b) for r, b in zip(records, builts) if b is not None]
        for batch in batch_sizes:
            run_batch([r for r, _ in running], [b for _, b in running], batch, inputs[batch], references[batch],
                      device, min_seconds=min_seconds, progress=progress)
        if labelled is not None:
            for record, built in progress_bar(running, desc="[bench] labelled set", enabled=progress,
                                              unit="backend"):
                record["labelled"] = _labelled_accuracy(built, labelled)
        del running, builts
        gc.collect()
    ceilings = best_ceilings(ceilings, measure_ceilings(device))
    _limits(records, config, ceilings, header)
    _ratios(records)
    _same_graph_notes(records)
    result = {
        "schema": SCHEMA,
        "purpose": purpose,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": header,
        "ceilings": ceilings,
        "config_name": name or (config_name if not checkpoint else f"checkpoint-{Path(checkpoint).stem}"),
        "config": config.to_dict(),
        "model": {"parameters": cost.parameters, "flops_per_clip": cost.flops_per_clip,
                  "program_flops_per_clip": program_flops(config),
                  "flops_note": "the reference model's FLOPs (2 per multiply-add); stt_fast's program executes "
                                "program_flops_per_clip"},
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "labelled_samples": len(labelled) if labelled is not None else None,
        "batch_sizes": batch_sizes,
        "noise_rule": f"noisy: p90 > {NOISY_SPREAD} x median, or executed FLOPs / time > {NOISY_CEILING} x the "
                      "measured matmul peak",
        "results": records,
    }
    label = result["config_name"].replace(":", "-").replace("/", "-")
    path = store_result(result, output_dir, name=label) if output_dir is not None else None
    return result, path
