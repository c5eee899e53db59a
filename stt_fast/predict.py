"""Video (or folder of frames) in, emotion out: `stt-fast predict`.

Each path is decoded, 2 x (T/2) frames are sampled at the segment centres, the face is optionally
detected and cropped (OpenCV's bundled cascade), the frames are resized to the model's input, and the
readable clips go through the chosen backend in batches of batch_size. A path that cannot be read gets
an error entry and the others go on. A clip in which detect_face finds no face is, by no_face: "full"
(the default) predicted on its full frames, with a warning saying so; "skip" left out with a "skipped"
entry; "error" an error entry. A clip far smaller than the
model's input (fewer than half its frames, or frames under half its size) is still predicted, with a
warning: its frames were repeated or upsampled, and the prediction is worth less.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .config import EMOTIONS
from .data.datasets import load_clip
from .data.face import Detector, crop_to_face
from .data.video import BadClipError
from .predictors import Predictor


def clip_warnings(source: dict, num_frames: int, image_size: int) -> list[str]:
    """Warnings for a clip far below the model's input: {"frames": n, "size": (h, w)} from load_clip."""
    found = []
    if source["frames"] < num_frames / 2:
        found.append(f"the clip has {source['frames']} frame(s); the model takes {num_frames}, so frames were "
                     "repeated")
    height, width = source["size"]
    if min(height, width) < image_size / 2:
        found.append(f"frames (or the face crop) are {height}x{width}, far below the model's "
                     f"{image_size}x{image_size}: they were upsampled")
    return found


NO_FACE = ("full", "skip", "error")
NO_FACE_WARNING = "no face found: the full frames were used"


class NoFaceSkipped(BadClipError):
    """A clip without a face, left out as no_face="skip" asks (not a failure)."""


def load_for_prediction(path: str | os.PathLike, num_frames: int, image_size: int, *, detect_face: bool = False,
                        detector: Detector | None = None, no_face: str = "full") -> tuple[torch.Tensor, list[str]]:
    """(float32 [T, 3, S, S] clip ready for the model, warnings about it); BadClipError if unreadable, and
    for a clip without a face as no_face says (NoFaceSkipped for "skip")."""
    if no_face not in NO_FACE:
        raise ValueError(f"no_face must be one of {NO_FACE}, got {no_face!r}")
    found: list[str] = []

    def face_or_frames(frames: torch.Tensor) -> torch.Tensor:
        try:
            return crop_to_face(frames, str(path), detector)
        except BadClipError:
            if no_face == "error":
                raise
            if no_face == "skip":
                raise NoFaceSkipped(f"{path}: no face found in the clip") from None
            found.append(NO_FACE_WARNING)
            return frames

    source: dict = {}
    clip = load_clip(path, num_frames=num_frames, image_size=image_size,
                     prepare=face_or_frames if detect_face else None, source=source)
    return clip, found + clip_warnings(source, num_frames, image_size)


def class_names(num_classes: int) -> list[str]:
    return list(EMOTIONS) if num_classes == len(EMOTIONS) else [str(k) for k in range(num_classes)]


def probabilities(logits: torch.Tensor, labels: Sequence[str]) -> list[dict]:
    """logits [B, K] -> [{"label", "probabilities": {class: p}}] per row."""
    rows = []
    for row in logits.float().softmax(dim=-1):
        rows.append({"label": labels[int(row.argmax())],
                     "probabilities": {name: round(float(p), 6) for name, p in zip(labels, row)}})
    return rows


def predict_paths(paths: Sequence[str | os.PathLike], predictor: Predictor, *, detect_face: bool = False,
                  batch_size: int = 16, detector: Detector | None = None, no_face: str = "full") -> list[dict]:
    """One entry per path, in order: {"path", "label", "probabilities": {class: p}, "warnings": [...]},
    {"path", "error"} for a path that could not be read, or {"path", "skipped"} for a clip without a face
    under no_face="skip"."""
    config = predictor.config
    labels = class_names(config.num_classes)
    results: list[dict] = []
    for start in range(0, len(paths), batch_size):
        entries, clips = [], []
        for path in paths[start:start + batch_size]:
            try:
                clip, warnings = load_for_prediction(path, config.num_frames, config.image_size,
                                                     detect_face=detect_face, detector=detector, no_face=no_face)
            except NoFaceSkipped as e:
                entries.append({"path": str(path), "skipped": str(e)})
                continue
            except BadClipError as e:
                entries.append({"path": str(path), "error": str(e)})
                continue
            entries.append({"path": str(path), "warnings": warnings})
            clips.append(clip)
        if clips:
            readable = iter(probabilities(predictor(torch.stack(clips)), labels))
            for entry in entries:
                if "error" not in entry and "skipped" not in entry:
                    entry.update(next(readable))
        results.extend(entries)
    return results
