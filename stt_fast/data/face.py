"""Optional face detection and cropping with OpenCV's bundled Haar cascade (nothing is downloaded).

The face is looked for in a few frames spread over the clip; the largest detection decides one square
crop (with a margin) applied to every frame, so the face keeps its place across the clip as DFEW's
aligned crops do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .video import BadClipError

Box = tuple[int, int, int, int]  # top, left, height, width
Detector = Callable[[np.ndarray], list[Box]]  # RGB uint8 [H, W, 3] -> boxes


def haar_detector() -> Detector:
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise ImportError("face detection needs OpenCV 4.x ('pip install \"opencv-python-headless<5\"'): "
                          "OpenCV 5 no longer ships the Haar cascades")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError("OpenCV's bundled face cascade could not be loaded")

    def detect(rgb: np.ndarray) -> list[Box]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return [(int(y), int(x), int(h), int(w)) for (x, y, w, h) in found]

    return detect


def face_box(frames: torch.Tensor, detector: Detector, probes: int = 4) -> Box | None:
    """The largest face found in `probes` frames spread over the clip, or None."""
    count = frames.shape[0]
    picks = sorted({round(i * (count - 1) / max(probes - 1, 1)) for i in range(probes)})
    boxes = [box for i in picks for box in detector(frames[i].permute(1, 2, 0).contiguous().numpy())]
    return max(boxes, key=lambda b: b[2] * b[3]) if boxes else None


def crop_square(frames: torch.Tensor, box: Box, margin: float = 0.25) -> torch.Tensor:
    """A square around box, enlarged by margin on each side and clamped to the frame: [T, 3, s, s]."""
    top, left, h, w = box
    height, width = frames.shape[-2:]
    side = min(round(max(h, w) * (1 + 2 * margin)), height, width)
    cy, cx = top + h / 2, left + w / 2
    y0 = int(min(max(round(cy - side / 2), 0), height - side))
    x0 = int(min(max(round(cx - side / 2), 0), width - side))
    return frames[..., y0:y0 + side, x0:x0 + side]


def crop_to_face(frames: torch.Tensor, source: str, detector: Detector | None = None) -> torch.Tensor:
    """frames cropped to the clip's face; BadClipError naming `source` when no face is found."""
    box = face_box(frames, detector or haar_detector())
    if box is None:
        raise BadClipError(f"{source}: no face found in the clip")
    return crop_square(frames, box)
