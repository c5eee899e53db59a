"""Reading a clip's frames from a folder of images or a video file, as uint8 [T, 3, H, W].

Videos are decoded with PyAV, or OpenCV where PyAV is missing, in two passes (count, then keep only
the sampled frames), so a long video never sits in memory whole. Every failure is a BadClipError
naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


class BadClipError(ValueError):
    """A clip that cannot be read: unreadable or truncated video, empty folder, missing frames."""


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def list_frames(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadClipError(f"{folder}: clip folder not found")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        videos = [p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES]
        if videos:
            raise BadClipError(f"{folder}: a folder of {len(videos)} video file(s), not of frames: pass the videos "
                               f"themselves, or label the whole collection with `stt-fast annotate {folder}`")
        raise BadClipError(f"{folder}: no frame images in the folder")
    return frames


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 [H, W, 3] arrays (same size) -> [T, 3, H, W]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def read_images(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError) as e:
            raise BadClipError(f"{path}: unreadable frame image: {e}") from e
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise BadClipError(f"{paths[0].parent}: frames differ in size: {sorted(sizes)}")
    return _to_tensor(arrays)


def _decode_av(path: Path, keep: set[int] | None):
    """Count the frames (keep None) or return {index: RGB array} for the indices in keep."""
    import av

    kept, count = {}, 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadClipError(f"{path}: no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if keep is not None and count in keep:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
    except BadClipError:
        raise
    except Exception as e:  # av.error.* for unreadable, truncated or foreign files
        raise BadClipError(f"{path}: unreadable video: {e}") from e
    return count if keep is None else kept


def _decode_cv2(path: Path, keep: set[int] | None):
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise BadClipError(f"{path}: unreadable video (OpenCV could not open it)")
    kept, count = {}, 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if keep is not None and count in keep:
                kept[count] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            count += 1
    finally:
        capture.release()
    return count if keep is None else kept


def _decoder():
    try:
        import av  # noqa: F401

        return _decode_av
    except ImportError:
        try:
            import cv2  # noqa: F401

            return _decode_cv2
        except ImportError:
            raise ImportError("reading videos needs PyAV ('pip install av') or OpenCV") from None


def count_video_frames(path: str | os.PathLike) -> int:
    path = Path(path)
    if not path.is_file():
        raise BadClipError(f"{path}: video file not found")
    count = _decoder()(path, None)
    if count == 0:
        raise BadClipError(f"{path}: the video has no decodable frames (truncated or empty?)")
    return count


def read_video(path: str | os.PathLike, indices: list[int]) -> torch.Tensor:
    path = Path(path)
    kept = _decoder()(path, set(indices))
    missing = sorted(set(indices) - set(kept))
    if missing:
        raise BadClipError(f"{path}: frames {missing[:5]} could not be decoded (the video changed or is damaged)")
    return _to_tensor([kept[i] for i in indices])


def read_clip(path: str | os.PathLike, choose: Callable[[int], list[int]]) -> torch.Tensor:
    """The frames choose(num_available) of a frame folder or a video file: uint8 [T, 3, H, W]."""
    path = Path(path)
    if path.is_dir():
        frames = list_frames(path)
        return read_images([frames[i] for i in choose(len(frames))])
    if not path.exists():
        raise BadClipError(f"{path}: clip not found")
    if not is_video(path):
        raise BadClipError(f"{path}: not a video file or a folder of frames")
    return read_video(path, choose(count_video_frames(path)))
