"""Video (or folder of frames) in, emotion out: `stt-fast predict`.

Each path is decoded, 2 x (T/2) frames are sampled at the segment centres, the face is optionally
detected and cropped (OpenCV's bundled cascade), the frames are resized to the model's input, and all
paths go through the chosen backend as one batch (in chunks of batch_size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .config import EMOTIONS
from .data.datasets import load_clip
from .data.face import Detector, crop_to_face
from .predictors import Predictor


def load_for_prediction(path: str | os.PathLike, num_frames: int, image_size: int, *, detect_face: bool = False,
                        detector: Detector | None = None) -> torch.Tensor:
    """float32 [T, 3, S, S] clip ready for the model (test-time sampling and transform)."""
    prepare = (lambda frames: crop_to_face(frames, str(path), detector)) if detect_face else None
    return load_clip(path, num_frames=num_frames, image_size=image_size, prepare=prepare)


def predict_paths(paths: Sequence[str | os.PathLike], predictor: Predictor, *, detect_face: bool = False,
                  batch_size: int = 16, detector: Detector | None = None) -> list[dict]:
    """[{"path", "label", "probabilities": {class: p}}] in the order of paths."""
    config = predictor.config
    labels = list(EMOTIONS) if config.num_classes == len(EMOTIONS) else [str(k) for k in range(config.num_classes)]
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        clips = torch.stack([load_for_prediction(p, config.num_frames, config.image_size, detect_face=detect_face,
                                                 detector=detector) for p in chunk])
        probs = predictor(clips).softmax(dim=-1)
        for path, row in zip(chunk, probs):
            results.append({"path": str(path), "label": labels[int(row.argmax())],
                            "probabilities": {name: round(float(p), 6) for name, p in zip(labels, row)}})
    return results
