"""Annotate a video collection: every clip of a source labelled, resumably, in one process or on a Ray cluster.

    stt-fast annotate SOURCE --checkpoint CK --output OUT [--ray local|auto|ADDRESS] [--workers N] ...

SOURCE is a folder (searched recursively for video files and folders of frames), a DFEW-layout data set,
or a text file of paths (one per line; relative paths are relative to the file's folder).

Each clip goes through exactly what `stt-fast predict` does (stt_fast.predict: decoding, test-time
sampling, optional face crop, the chosen backend, the softmax), so labels and probabilities are the same.
Rows: path, label, the seven probabilities (p_<class>), warnings, error (a clip that cannot be read gets
its error and no label: a bad file never stops the run), backend, model_sha256 (the file the model came
from).

Output: OUT is a folder of part files, one per batch, each written under a temporary name and renamed when
complete, so a reader never sees a half-written part (Parquet: `pandas.read_parquet(OUT)`,
`pyarrow.dataset.dataset(OUT)`, `ray.data.read_parquet(OUT)` or a glob of `OUT/*.parquet`; JSON lines:
`cat OUT/*.jsonl`). A second run over the same SOURCE and OUT skips the clips already written and
finishes the rest; an interrupted run (Ctrl-C, a killed worker or driver) loses at most the batches in
flight. Clips that could not be read keep their row (with its error) and are not tried again unless
retry_failed, which takes their rows out of the part files first and then annotates them anew.
OUT/_manifest.json records the model, backend and counts of the last complete run (its leading
underscore keeps it out of what Parquet readers take for data, as the temporary files' leading dot does).

Execution: without Ray, one process decodes and predicts batch by batch. With Ray (an optional extra,
stt-fast[ray]), Ray Data runs decoding and sampling as parallel CPU tasks and inference in a pool of
actors, each holding one model (one compiled module, or one TensorRT engine) built once; the driver
streams the results into the part files. No scheduler of our own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.pipeline import ClipPipeline
from .data.video import DEFAULT_LIMITS, IMAGE_SUFFIXES, VIDEO_SUFFIXES, ReadLimits
from .files import sha256_file, write_text_atomic
from .predictors import ModelSpec

FORMATS = ("parquet", "jsonl")
PART_PREFIX = "part-"
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"


# --- what to annotate ----------------------------------------------------------------------------------

def list_sources(source: str | os.PathLike) -> list[str]:
    """The clips of SOURCE, in a stable order: a folder (recursive), a DFEW-layout set, or a list file."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
            raise ValueError(f"{source} is a single clip: annotate labels a collection (a folder, a DFEW-layout set or "
                             f"a text file of paths); `stt-fast predict {source}` labels one file")
        try:
            text = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{source} is not a text file of clip paths (one per line); pass a folder, a DFEW-layout "
                             "set or such a list") from None
        base = source.parent
        paths = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line)
                paths.append(str(path if path.is_absolute() else base / path))
        if not paths:
            raise ValueError(f"{source} lists no clip paths")
        return paths
    if not source.is_dir():
        raise FileNotFoundError(f"source not found: {source}")
    clips = []
    for folder, subfolders, files in os.walk(source):
        subfolders.sort()
        folder = Path(folder)
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            clips.append(str(folder))  # a folder of frames is one clip
            subfolders.clear()
            continue
        clips += [str(folder / f) for f in sorted(files) if Path(f).suffix.lower() in VIDEO_SUFFIXES]
    if not clips:
        raise ValueError(f"{source}: no video files or folders of frames found")
    return sorted(clips)


# --- the output folder ---------------------------------------------------------------------------------

def row_columns(labels: Sequence[str]) -> list[str]:
    return ["path", "label", *(f"p_{name}" for name in labels), "warnings", "error", "backend", "model_sha256"]


def _part_name(paths: Sequence[str], fmt: str) -> str:
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return f"{PART_PREFIX}{digest}.{fmt}"


def write_part(out: Path, rows: list[dict], fmt: str, columns: Sequence[str]) -> Path:
    """One batch's rows as a complete part file (temporary name, then rename)."""
    path = out / _part_name([r["path"] for r in rows], fmt)
    if fmt == "jsonl":
        write_text_atomic(path, "".join(json.dumps({c: r.get(c) for c in columns}) + "\n" for r in rows))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .files import atomic_output

    # one schema for every part: a part whose clips all read has an all-null error column, which would
    # otherwise be typed null and make the folder unreadable as one data set beside a part with errors
    schema = pa.schema([(c, pa.float64() if c.startswith("p_") else pa.string()) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    with atomic_output(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


PART_NAME = re.compile(rf"{PART_PREFIX}[0-9a-f]{{16}}\.(jsonl|parquet)")
TEMPORARY_NAME = re.compile(rf"\.{PART_PREFIX}[0-9a-f]{{16}}\.(jsonl|parquet)\..+\.tmp")  # files.atomic_output's


def read_rows(out: str | os.PathLike) -> list[dict]:
    """Every row of every complete part file in OUT (temporary files of an interrupted run are ignored); a
    part file without the columns annotate writes is refused, naming it."""
    rows = []
    for path in sorted(Path(out).iterdir()) if Path(out).is_dir() else []:
        if PART_NAME.fullmatch(path.name):
            part = _part_rows(path)
            if any(not isinstance(r, dict) or "path" not in r or "model_sha256" not in r for r in part):
                raise ValueError(f"{path} is not a part file stt-fast annotate wrote (no path or model_sha256 "
                                 "column): choose another output folder")
            rows += part
    return rows


def _check_ours(out: Path) -> None:
    """OUT must be new, empty, or hold only what annotate writes: its part files, their temporary files and its
    manifest (and the manifest.json of earlier versions); anything else is the user's, and OUT is refused."""
    for path in out.iterdir():
        name = path.name
        if PART_NAME.fullmatch(name) or TEMPORARY_NAME.fullmatch(name) or name == MANIFEST:
            continue
        if name == LEGACY_MANIFEST and _is_our_manifest(path):
            continue
        raise ValueError(f"{out} holds files stt-fast annotate did not write (e.g. {name}): choose a new or empty "
                         "output folder, or one an earlier annotate wrote")


def _is_our_manifest(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"source", "model_sha256", "clips"} <= set(record)


def _part_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    except (ValueError, OSError) as e:  # JSON, Unicode and Arrow errors are ValueErrors or OSErrors
        raise ValueError(f"{path} is not a readable part file ({type(e).__name__}: {e}): choose another output "
                         "folder, or remove it") from None


def drop_failed_rows(out: Path, columns: Sequence[str]) -> int:
    """Take the rows of clips that could not be read out of OUT's part files (each part rewritten whole,
    atomically, or removed when nothing else is in it) and return how many there were: those clips are
    then not done, and the next run annotates them again."""
    dropped = 0
    for path in sorted(out.iterdir()):
        if not PART_NAME.fullmatch(path.name):
            continue
        rows = _part_rows(path)
        kept = [r for r in rows if not r.get("error")]
        if len(kept) == len(rows):
            continue
        dropped += len(rows) - len(kept)
        if kept:
            written = write_part(out, kept, path.suffix[1:], columns)
            if written != path:
                path.unlink()
        else:
            path.unlink()
    return dropped


def _clean_partial(out: Path) -> int:
    """Remove what an interrupted run left half-written (never a complete part, never a file not named as ours)."""
    stale = [p for p in out.iterdir() if TEMPORARY_NAME.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# --- one clip and one batch, exactly as `stt-fast predict` -----------------------------------------------

def decoded_row(item) -> dict:
    """{"path", "clip" (float32 [T, 3, S, S] or None), "warnings", "error"} of a PreparedClip: predict's loading.
    A clip without a face (detection asked for) has no clip and no error: its row carries no label and says
    why in its warnings."""
    warnings = item.warnings + ([item.skipped] if item.skipped else [])
    return {"path": item.path, "clip": None if item.clip is None else item.clip.numpy(),
            "warnings": "; ".join(warnings), "error": item.error or ""}


class BatchPredictor:
    """decoded clips -> result rows; one model, built once (one per Ray actor)."""

    def __init__(self, spec: ModelSpec, model_sha256: str) -> None:
        from .predict import class_names

        self.predictor = spec.load()
        self.labels = class_names(self.predictor.config.num_classes)
        self.model_sha256 = model_sha256

    def rows(self, decoded: Iterable[dict]) -> list[dict]:
        import torch

        from .predict import probabilities

        decoded = list(decoded)
        readable = [d for d in decoded if d["clip"] is not None]
        scored = iter(probabilities(self.predictor(torch.stack([torch.as_tensor(d["clip"]) for d in readable])),
                                    self.labels)) if readable else iter(())
        rows = []
        for d in decoded:
            row = {"path": d["path"], "label": None, "warnings": d["warnings"] or "", "error": d["error"] or None,
                   "backend": self.predictor.name, "model_sha256": self.model_sha256}
            row |= {f"p_{name}": None for name in self.labels}
            if d["clip"] is not None:
                result = next(scored)
                row["label"] = result["label"]
                row |= {f"p_{name}": p for name, p in result["probabilities"].items()}
            rows.append(row)
        return rows

    def __call__(self, batch: dict) -> dict:
        """Ray Data's batch form (columns of numpy arrays) in and out."""
        decoded = [{"path": str(batch["path"][i]), "clip": batch["clip"][i] if batch["readable"][i] else None,
                    "warnings": str(batch["warnings"][i]), "error": str(batch["error"][i])}
                   for i in range(len(batch["path"]))]
        rows = self.rows(decoded)
        columns = row_columns(self.labels)
        return {c: np.array([r[c] for r in rows], dtype=object) for c in columns}


# --- running ---------------------------------------------------------------------------------------------

@dataclass
class AnnotateResult:
    total: int
    skipped_done: int
    written: int
    errors: int
    seconds: float
    output: Path
    failed: list[str] = field(default_factory=list)  # clips of SOURCE whose rows in OUT hold an error

    @property
    def clips_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def _in_process(todo: list[str], spec: ModelSpec, model_sha256: str, pipeline, batch_size: int) -> Iterator[list[dict]]:
    """Batches of rows; the next batch's clips are read while the model runs on this one."""
    predictor = BatchPredictor(spec, model_sha256)
    decoded = []
    for item in pipeline.read_ahead(todo, depth=batch_size):
        decoded.append(decoded_row(item))
        if len(decoded) == batch_size:
            yield predictor.rows(decoded)
            decoded = []
    if decoded:
        yield predictor.rows(decoded)


def _with_ray(todo: list[str], spec: ModelSpec, model_sha256: str, pipeline, batch_size: int,
              ray_address: str, workers: int, gpus_per_worker: float, cpus_per_worker: float) -> Iterator[list[dict]]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("--ray needs Ray Data: pip install 'stt-fast[ray]'") from None
    from .ray_cluster import connect_ray

    # logical CPUs enough for the actors and at least one decoding task beside them
    started_here = connect_ray(ray_address, cpus_needed=workers * cpus_per_worker + 1)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    frames, size = pipeline.num_frames, pipeline.image_size

    def decode_row(row: dict) -> dict:
        d = decoded_row(pipeline.prepare(row["path"]))
        # Ray's columns hold arrays only: a placeholder clip, marked unreadable
        return {**d, "readable": d["clip"] is not None,
                "clip": d["clip"] if d["clip"] is not None else np.zeros((frames, 3, size, size), np.float32)}

    try:
        # a block per batch, and at least one per actor where there are clips enough: no actor of the pool idles
        blocks = max(1, min(len(todo), max(workers, len(todo) // batch_size)))
        dataset = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
        # Decoding: parallel CPU tasks (half a CPU each: lighter than inference). Inference: an actor pool,
        # one model per actor. Their resources differ, so Ray keeps them apart rather than fusing them.
        dataset = dataset.map(decode_row, num_cpus=0.5)

        class ActorPredictor(BatchPredictor):  # the model spec baked in: nothing to ship per actor start
            def __init__(self) -> None:
                import torch

                torch.set_num_threads(max(1, int(cpus_per_worker)))  # the actor's share of the node's cores
                super().__init__(spec, model_sha256)

        dataset = dataset.map_batches(ActorPredictor, batch_size=batch_size, batch_format="numpy",
                                      compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                                      num_gpus=gpus_per_worker)
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            names = list(batch)
            yield [{name: _plain(batch[name][i]) for name in names} for i in range(len(batch["path"]))]
    finally:
        if started_here:
            ray.shutdown()


def _plain(value):
    """A value back from Ray's columns as the in-process rows hold it (Ray turns None into NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def annotate(source: str | os.PathLike, output: str | os.PathLike, *, backend: str = "reference",
             checkpoint: str | None = None, onnx: str | None = None, engine: str | None = None,
             device: str | None = None, batch_size: int = 16, detect_face: bool = False, no_face: str = "skip",
             limits: ReadLimits = DEFAULT_LIMITS, fmt: str | None = None,
             ray_address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
             cpus_per_worker: float = 1.0, on_batch: Callable[[int, int, int], None] | None = None,
             retry_failed: bool = False) -> AnnotateResult:
    """Annotate every clip of source into the output folder (see the module docstring); resumable.

    on_batch(done, total, errors) is called after each written batch (progress). retry_failed: clips
    whose rows hold an error are annotated again (their old rows removed first)."""
    fmt = fmt or ("parquet" if _has_pyarrow() else "jsonl")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "parquet" and not _has_pyarrow():
        raise ImportError("Parquet output needs pyarrow (pip install 'stt-fast[ray]'), or use --format jsonl")
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be >= 1")
    spec = ModelSpec(backend, checkpoint, onnx, engine, device)
    model_file = spec.file()
    if not model_file:
        raise ValueError(f"backend {backend!r} needs " + {"onnx": "--onnx", "tensorrt": "--engine"}.get(
            backend, "--checkpoint"))
    if not Path(model_file).is_file():
        raise FileNotFoundError(f"model file not found: {model_file}")
    paths = list_sources(source)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _check_ours(out)
    _clean_partial(out)
    model_sha256 = sha256_file(model_file)
    config = spec.config()
    columns = row_columns(_labels(config))
    existing = read_rows(out)
    other_model = {r["model_sha256"] for r in existing} - {model_sha256}
    if other_model:
        raise ValueError(f"{out} holds annotations by another model ({sorted(other_model)[0][:12]}...): choose another "
                         "output folder")
    if retry_failed and any(r.get("error") for r in existing):
        drop_failed_rows(out, columns)
        existing = read_rows(out)
    done = {r["path"] for r in existing}
    todo = [p for p in paths if p not in done]
    started = time.perf_counter()
    written = errors = 0
    if on_batch:
        on_batch(len(paths) - len(todo), len(paths), 0)
    if todo:
        pipeline = ClipPipeline(config.num_frames, config.image_size, detect_face=detect_face, no_face=no_face,
                                limits=limits)
        batches = (_with_ray(todo, spec, model_sha256, pipeline, batch_size, ray_address, workers,
                             gpus_per_worker, cpus_per_worker) if ray_address
                   else _in_process(todo, spec, model_sha256, pipeline, batch_size))
        for rows in batches:
            write_part(out, rows, fmt, columns)
            written += len(rows)
            errors += sum(1 for r in rows if r.get("error"))
            if on_batch:
                on_batch(len(paths) - len(todo) + written, len(paths), errors)
    seconds = time.perf_counter() - started
    failed = sorted(r["path"] for r in read_rows(out) if r.get("error") and r["path"] in set(paths))
    result = AnnotateResult(len(paths), len(paths) - len(todo), written, errors, seconds, out, failed)
    legacy = out / LEGACY_MANIFEST  # where earlier versions kept it: Parquet readers choke on it
    if legacy.is_file() and _is_our_manifest(legacy):
        legacy.unlink()
    write_text_atomic(out / MANIFEST, json.dumps({
        "source": str(source), "clips": len(paths), "written_this_run": written, "skipped_already_done": len(done),
        "errors_this_run": errors, "failed_clips": len(failed), "backend": backend, "model_file": str(model_file),
        "model_sha256": model_sha256,
        "format": fmt, "ray": ray_address, "workers": workers, "batch_size": batch_size,
        "seconds": round(seconds, 2), "clips_per_second": round(result.clips_per_second, 3)}, indent=2))
    return result


def _labels(config) -> list[str]:
    from .predict import class_names

    return class_names(config.num_classes)


def _has_pyarrow() -> bool:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True

