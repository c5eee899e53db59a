"""Optional face detection and cropping with OpenCV's bundled Haar cascade (nothing is downloaded).

The face is looked for in a few frames spread over the clip; the largest detection decides one square
crop (with a margin) applied to every frame, so the face keeps its place across the clip as DFEW's
aligned crops do.

The cascade scans downscaled grey copies, coarse to fine, and the boxes are mapped back to the frame (the
crop is taken from the full-resolution frame). Its cost grows with the pixels it scans: on this project's
CPU machine (2-core AMD EPYC, 2026-12-04) one 1280x720 frame took 544 ms at full size, 142 ms at 640x360
and 30 ms at 320x180. A face of a DFER clip is the clip's subject, far larger than the cascade's 24-pixel
window at those sizes, so:
- the coarse pass scans copies whose shorter side is COARSE_SIDE (180) pixels: faces from 24/180 = 13% of
  the frame's shorter side (96 pixels at 720p), the close and medium shots of DFER data;
- only where it finds no face in any frame looked at does the fine pass scan DETECT_SIDE (360) pixels:
  faces from 6.7% (48 pixels at 720p). Smaller faces are not looked for (at full size the cascade found
  faces from 24 pixels, 3.3% at 720p, and false ones in textured backgrounds).
A face the coarse pass finds is larger than any the fine pass alone would add, so the largest face is the
same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Box = tuple[int, int, int, int]  # top, left, height, width
Detector = Callable[[np.ndarray], list[Box]]  # RGB uint8 [H, W, 3] -> boxes

COARSE_SIDE = 180  # shorter side of the coarse pass's copy (module docstring)
DETECT_SIDE = 360  # shorter side of the fine pass's copy
MIN_FACE = 24  # the cascade's smallest window, in pixels of the copy


class HaarFaces:
    """Detector: RGB uint8 [H, W, 3] -> the faces' boxes (top, left, height, width) in that frame's pixels;
    the coarse pass, then the fine one where the coarse found none. `passes` are the per-size detectors, for
    callers that look at several frames (largest_face)."""

    def __init__(self, sides: Sequence[int] = (COARSE_SIDE, DETECT_SIDE)) -> None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise ImportError("face detection needs OpenCV 4.x ('pip install \"opencv-python-headless<5\"'): "
                              "OpenCV 5 no longer ships the Haar cascades")
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if self.cascade.empty():
            raise RuntimeError("OpenCV's bundled face cascade could not be loaded")
        self.sides = tuple(sides)
        self.passes = [lambda rgb, side=side: self.at(rgb, side) for side in self.sides]

    def at(self, rgb: np.ndarray, side: int) -> list[Box]:
        """The faces found on a grey copy whose shorter side is at most `side` pixels."""
        import cv2

        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, side / min(gray.shape))
        if scale < 1.0:
            size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE))
        return [tuple(round(v / scale) for v in (y, x, h, w)) for (x, y, w, h) in found]

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        for find in self.passes:
            found = find(rgb)
            if found:
                return found
        return []


def haar_detector(detect_side: int | None = None) -> HaarFaces:
    """The cascade, coarse to fine (module docstring); detect_side: one pass at that size instead."""
    return HaarFaces((detect_side,) if detect_side else (COARSE_SIDE, DETECT_SIDE))


def largest_face(frames: Sequence[np.ndarray], detector: Detector) -> Box | None:
    """The largest face in any of the RGB frames: pass by pass where the detector has passes (a later, finer pass
    runs only if no frame had a face in the earlier ones), else the detector on each frame."""
    for find in getattr(detector, "passes", None) or [detector]:
        box = largest([b for rgb in frames for b in find(rgb)])
        if box is not None:
            return box
    return None


PROBES = 4  # frames of a clip the detector looks at


def probe_positions(count: int, probes: int = PROBES) -> list[int]:
    """Which of a clip's `count` frames the detector looks at: `probes` of them spread over the clip."""
    return sorted({round(i * (count - 1) / max(probes - 1, 1)) for i in range(probes)})


def largest(boxes: list[Box]) -> Box | None:
    return max(boxes, key=lambda b: b[2] * b[3]) if boxes else None


def face_box(frames: torch.Tensor, detector: Detector, probes: int = PROBES) -> Box | None:
    """The largest face found in `probes` frames [T, 3, H, W] spread over the clip, or None."""
    return largest_face([frames[i].permute(1, 2, 0).contiguous().numpy() for i in probe_positions(frames.shape[0],
                                                                                                  probes)], detector)


def square_around(box: Box, height: int, width: int, margin: float = 0.25) -> Box:
    """(top, left, side, side): a square around box, enlarged by margin on each side, clamped to a frame of
    height x width."""
    top, left, h, w = box
    side = min(round(max(h, w) * (1 + 2 * margin)), height, width)
    cy, cx = top + h / 2, left + w / 2
    y0 = int(min(max(round(cy - side / 2), 0), height - side))
    x0 = int(min(max(round(cx - side / 2), 0), width - side))
    return y0, x0, side, side


def crop_square(frames: torch.Tensor, box: Box, margin: float = 0.25) -> torch.Tensor:
    """A square around box, enlarged by margin on each side and clamped to the frame: [T, 3, s, s]."""
    y0, x0, side, _ = square_around(box, *frames.shape[-2:], margin=margin)
    return frames[..., y0:y0 + side, x0:x0 + side]
