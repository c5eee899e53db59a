"""The benchmark suite: every available backend x every batch size, latency and accuracy side by side.

Every backend is built first (build time: compile / export / engine build). Then per batch size: each
backend's first call (compilation, autotuning, graph capture happen there) and its accuracy against
the float32 reference on the same inputs (relative and max error, top-1 agreement), and the memory
that call needed (CUDA: allocated beyond what was held before it; CPU: the process's peak RSS); then
the steady-state latency of all backends, timed in interleaved rounds so that a slow spell of the
machine hits them alike (median, p90, p99), and throughput. With a labelled set: WAR and UAR and their
difference to the reference. Speed is also given as a ratio to eager-fp32 measured in the same run,
and as a fraction of the machine's measured matmul peak (model FLOPs / time / peak).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import resource
import tempfile
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from stt_fast.accuracy import logits_agreement
from stt_fast.checkpoint import load_checkpoint
from stt_fast.config import get_config
from stt_fast.files import sha256_file, write_text_atomic
from stt_fast.flops import model_cost
from stt_fast.model import STT

from .backends import REFERENCE, Backend, Built, resolve
from .machine import best_ceilings, machine_header, measure_ceilings
from .timing import measure_interleaved, time_once

SCHEMA = 1
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


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
    return {"war": result["war"], "uar": result["uar"], "samples": result["samples"]}


def _build(backend: Backend, model: STT, device: torch.device, workdir: Path) -> tuple[dict, Built | None]:
    record: dict = {"backend": backend.name, "precision": backend.precision}
    reason = backend.unavailable(device)
    if reason:
        return record | {"skipped": reason}, None
    try:
        built = backend.build(model, device, workdir)
    except Exception as e:  # a backend that fails to build is reported, the suite goes on
        return record | {"error": f"build failed: {e}", "traceback": traceback.format_exc(limit=3)}, None
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
              device: torch.device, *, min_seconds: float) -> None:
    """First call and accuracy of every built backend, then their steady-state times, interleaved. A
    backend that fails at this batch size gets an error entry and is left out of the timing."""
    fns, entries = {}, {}
    for record, built in zip(records, builts):
        x = clips.to(built.input_device)
        try:
            first_ms, logits, memory = _first_call(built, x, device)
        except Exception as e:  # a backend that fails is reported, the suite goes on
            record["batches"].append({"batch": batch, "error": f"{type(e).__name__}: {e}"})
            continue
        entries[record["backend"]] = {"batch": batch, "first_call_ms": round(first_ms, 3),
                                      "peak_memory_mb": round(memory, 1),
                                      "accuracy": logits_agreement(logits, reference)}
        fns[record["backend"]] = lambda b=built, x=x: b.run(x)
    timings = measure_interleaved(fns, device, warmup=2, min_runs=5, min_seconds=min_seconds)
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
    """Speed-up over eager-fp32 measured in the same run, and labelled-set deltas to it."""
    ref = next((r for r in records if r["backend"] == REFERENCE and "batches" in r), None)
    if ref is None:
        return
    ref_ms = {b["batch"]: b["timing"]["median_ms"] for b in ref["batches"]}
    for r in records:
        for b in r.get("batches", []):
            if b["batch"] in ref_ms:
                b["speedup_vs_eager_fp32"] = ref_ms[b["batch"]] / b["timing"]["median_ms"]
        if "labelled" in r and "labelled" in ref:
            r["labelled"]["war_minus_reference"] = r["labelled"]["war"] - ref["labelled"]["war"]
            r["labelled"]["uar_minus_reference"] = r["labelled"]["uar"] - ref["labelled"]["uar"]


def run_suite(config_name: str = "paper", *, batch_sizes: list[int] | None = None, backends: list[str] | None = None,
              device: str | None = None, checkpoint: str | None = None, labelled=None, output_dir=DEFAULT_RESULTS,
              min_seconds: float = 1.0, progress: bool = True, seed: int = 0,
              name: str | None = None) -> tuple[dict, Path | None]:
    """Run the suite and write benchmarks/results/<machine>/<time>-<name>.json; returns (result, path).

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
        chosen.insert(0, resolve([REFERENCE])[0])  # the peer every ratio is taken against
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
        for backend in tqdm(chosen, desc="[bench] build", disable=not progress, unit="backend"):
            record, built = _build(backend, model, device, Path(tmp))
            records.append(record)
            builts.append(built)
        running = [(r, b) for r, b in zip(records, builts) if b is not None]
        for batch in tqdm(batch_sizes, desc="[bench] batch sizes", disable=not progress, unit="batch"):
            run_batch([r for r, _ in running], [b for _, b in running], batch, inputs[batch], references[batch],
                      device, min_seconds=min_seconds)
        if labelled is not None:
            for record, built in tqdm(running, desc="[bench] labelled set", disable=not progress, unit="backend"):
                record["labelled"] = _labelled_accuracy(built, labelled)
        del running, builts
        gc.collect()
    ceilings = best_ceilings(ceilings, measure_ceilings(device))
    for record in records:
        for entry in record.get("batches", []):
            entry["fraction_of_peak"] = (cost.flops_per_clip * entry["batch"] / (entry["timing"]["median_ms"] / 1e3)
                                         / (ceilings["matmul_tflops"] * 1e12))
    _ratios(records)
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": header,
        "ceilings": ceilings,
        "config_name": name or (config_name if not checkpoint else f"checkpoint-{Path(checkpoint).stem}"),
        "config": config.to_dict(),
        "model": {"parameters": cost.parameters, "flops_per_clip": cost.flops_per_clip,
                  "flops_note": "the reference model's FLOPs (2 per multiply-add); backends that prune "
                                "work still count these"},
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "labelled_samples": len(labelled) if labelled is not None else None,
        "batch_sizes": batch_sizes,
        "results": records,
    }
    path = None
    if output_dir is not None:
        stamp = result["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
        label = result["config_name"].replace(":", "-").replace("/", "-")
        path = Path(output_dir) / header["slug"] / f"{stamp}-{label}.json"
        write_text_atomic(path, json.dumps(result, indent=1, default=_json_default))
    return result, path


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
