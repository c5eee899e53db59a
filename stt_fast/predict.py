"""Video (or folder of frames) in, emotion out: `stt-fast predict`.

Each path goes through the clip pipeline (stt_fast.data.pipeline: decoding, sampling at the segment
centres, the optional face crop, resizing), read a few clips ahead on a thread of its own while the model
runs, and the readable clips go through the chosen backend in batches of batch_size. A path that cannot be
read gets an error entry and the others go on. With detect_face, a clip without a face is, by no_face:
"skip" (the default) left out with a "skipped" entry and no label; "full" predicted on its full frames
with a warning saying so; "error" an error entry. A clip far smaller than the model's input (fewer than
half its frames, or frames under half its size) is still predicted, with a warning: its frames were
repeated or upsampled, and the prediction is worth less.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .config import EMOTIONS
from .data.face import Detector
from .data.pipeline import ClipPipeline, PreparedClip
from .data.video import DEFAULT_LIMITS, ReadLimits
from .predictors import Predictor


def class_names(num_classes: int) -> list[str]:
    return list(EMOTIONS) if num_classes == len(EMOTIONS) else [str(k) for k in range(num_classes)]


def probabilities(logits: torch.Tensor, labels: Sequence[str]) -> list[dict]:
    """logits [B, K] -> [{"label", "probabilities": {class: p}}] per row."""
    rows = []
    for row in logits.float().softmax(dim=-1):
        rows.append({"label": labels[int(row.argmax())],
                     "probabilities": {name: round(float(p), 6) for name, p in zip(labels, row)}})
    return rows


def entry(item: PreparedClip) -> dict:
    """A prepared clip's entry before the model: {"path", "error"}, {"path", "skipped"} or {"path", "warnings"}."""
    if item.error is not None:
        return {"path": item.path, "error": item.error}
    if item.skipped is not None:
        return {"path": item.path, "skipped": item.skipped}
    return {"path": item.path, "warnings": item.warnings}


def predict_paths(paths: Sequence[str | os.PathLike], predictor: Predictor, *, detect_face: bool = False,
                  batch_size: int = 16, detector: Detector | None = None, no_face: str = "skip",
                  limits: ReadLimits = DEFAULT_LIMITS) -> list[dict]:
    """One entry per path, in order: {"path", "label", "probabilities": {class: p}, "warnings": [...]},
    {"path", "error"} for a path that could not be read, or {"path", "skipped"} for a clip without a face
    under no_face="skip". The next batch is read while the model runs on this one."""
    config = predictor.config
    labels = class_names(config.num_classes)
    pipeline = ClipPipeline(config.num_frames, config.image_size, detect_face=detect_face, no_face=no_face,
                            detector=detector, limits=limits)
    results: list[dict] = []
    batch: list[tuple[dict, torch.Tensor]] = []

    def flush() -> None:
        if batch:
            scored = probabilities(predictor(torch.stack([clip for _, clip in batch])), labels)
            for (row, _), result in zip(batch, scored):
                row.update(result)
            batch.clear()

    for item in pipeline.read_ahead(paths, depth=batch_size):
        row = entry(item)
        results.append(row)
        if item.clip is not None:
            batch.append((row, item.clip))
            if len(batch) == batch_size:
                flush()
    flush()
    return results
