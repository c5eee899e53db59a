"""Videos of a real face for benchmarks and tests, made on the spot (nothing is downloaded).

The face is scikit-image's astronaut photograph (Eileen Collins, NASA; shipped inside scikit-image), moving
over a blurred random texture, encoded as H.264 by PyAV. write_face_video places it at a known box per
frame, so that a detector's box can be checked; write_faceless_video is the texture alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

RESOLUTIONS = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}


def astronaut() -> np.ndarray:
    """RGB uint8 [512, 512, 3]: a real frontal face (needs scikit-image: the dev and bench extras)."""
    try:
        from skimage import data
    except ImportError:
        raise ImportError("the face videos use scikit-image's astronaut photograph: pip install scikit-image "
                          "(in the dev and bench extras)") from None
    return data.astronaut()


def _texture(width: int, height: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_NEAREST), (0, 0), 3)


def face_position(index: int, frames: int, width: int, height: int, side: int) -> tuple[int, int]:
    """(top, left) of the photograph in frame index: a slow ellipse around the centre."""
    phase = 2 * math.pi * index / max(frames, 1)
    return (int((height - side) * (0.5 + 0.3 * math.cos(phase))), int((width - side) * (0.5 + 0.4 * math.sin(phase))))


def _encode(path: Path, frames, width: int, height: int, fps: int) -> None:
    import av

    from stt_fast.files import atomic_output

    with atomic_output(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_face_video(path: str | os.PathLike, width: int = 1280, height: int = 720, *, seconds: float = 4.0,
                     fps: int = 30, face_side: int | None = None, seed: int = 0) -> Path:
    """An H.264 MP4 of the astronaut photograph (face_side pixels square, default half the height) moving over
    a texture. The photograph's face sits at about (0.13, 0.35) of its side from its top-left corner."""
    path = Path(path)
    side = face_side or height // 2
    import cv2

    photo = cv2.resize(astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    background = _texture(width, height, seed)
    count = max(1, round(seconds * fps))

    def frames():
        for i in range(count):
            frame = background.copy()
            top, left = face_position(i, count, width, height, side)
            frame[top:top + side, left:left + side] = photo
            yield frame

    _encode(path, frames(), width, height, fps)
    return path


def write_faceless_video(path: str | os.PathLike, width: int = 640, height: int = 360, *, seconds: float = 2.0,
                         fps: int = 25, seed: int = 0) -> Path:
    """An H.264 MP4 of a drifting texture: no face anywhere."""
    path = Path(path)
    background = _texture(width + 64, height, seed)
    count = max(1, round(seconds * fps))
    _encode(path, (np.ascontiguousarray(background[:, i % 64:i % 64 + width]) for i in range(count)),
            width, height, fps)
    return path
