"""Reading a clip's frames from a folder of images or a video file.

Videos (PyAV): bounds first, then each frame decoded at most once.

1. probe_video opens the container and checks the frame size, duration and file against ReadLimits
   before anything is decoded, then reads the packet index (demuxing: no decoding) for the frame count,
   each frame's presentation time and the keyframes. A container's own frame count is not trusted (it is
   0 or approximate in Matroska, WebM, AVI and broken MP4s); the packets are.
2. decode_frames decodes the frames at the indices asked for, once each, with the decoder's threads:
   from the start up to the last index asked for, or, where the keyframes allow it and it decodes fewer
   frames (long recordings), by seeking to the keyframe before each group of indices. Frames are matched
   by presentation time, so a frame is the same whichever way it was reached. Frames stay in the
   decoder's format (YUV) until converted, so only the frames kept are converted to RGB, at the size the
   caller needs (frame_rgb).

Everything wrong with a file is a BadClipError naming it: not a regular file, unreadable, no video stream,
beyond the limits, truncated.
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


class BadClipError(ValueError):
    """A clip that cannot be read: unreadable or truncated video, empty folder, missing frames, or a file
    beyond the reading limits."""


@dataclass(frozen=True)
class ReadLimits:
    """What one video may cost, checked before it is decoded. The defaults take any camera's recording up
    to DCI 4K and three hours; `stt-fast serve` sets tighter ones for uploads."""

    max_frame_pixels: int = 4096 * 2160  # width x height of one frame
    max_seconds: float = 3 * 3600.0
    max_frames: int = 500_000

    def check_frame(self, width: int, height: int, where: str) -> None:
        if width * height > self.max_frame_pixels:
            raise BadClipError(f"{where}: frames of {width}x{height} exceed the limit of {self.max_frame_pixels:,} "
                               "pixels per frame")


DEFAULT_LIMITS = ReadLimits()


@dataclass(frozen=True)
class InMemoryVideo:
    """A video file's bytes (a server's upload), decoded without ever touching the disk; name is what
    messages call it."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


class Cancelled(Exception):
    """Decoding stopped because its caller no longer wants the result (a request that timed out)."""


def _container_source(source):
    import io

    return io.BytesIO(source.data) if isinstance(source, InMemoryVideo) else str(source)


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """path, if it is a regular file (a FIFO or a device would block or never end); BadClipError otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadClipError(f"{path}: {what} not found") from None
    except OSError as e:
        raise BadClipError(f"{path}: {what} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise BadClipError(f"{path}: not a regular file (a pipe, device or socket is not read)")
    return path


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


def _to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 [H, W, 3] arrays (same size) -> [T, 3, H, W]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def read_image(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    """One frame image as RGB uint8 [H, W, 3]; its size checked against the limits before it is decoded."""
    from PIL import Image

    regular_file(path, "frame image")
    try:
        with Image.open(path) as img:
            limits.check_frame(img.width, img.height, str(path))
            return np.array(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, BadClipError):
            raise
        raise BadClipError(f"{path}: unreadable frame image: {e}") from e


def read_images(paths: list[Path], limits: ReadLimits = DEFAULT_LIMITS) -> torch.Tensor:
    arrays = [read_image(path, limits) for path in paths]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise BadClipError(f"{paths[0].parent}: frames differ in size: {sorted(sizes)}")
    return _to_tensor(arrays)


# --- videos ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoInfo:
    """What probe_video learnt without decoding: frame size, frame count, presentation times (pts, in the
    stream's time base, in presentation order; None where the container has none) and keyframe indices."""

    path: Path | InMemoryVideo
    width: int
    height: int
    frames: int
    fps: float | None
    seconds: float | None
    pts: tuple[int, ...] | None
    keyframes: tuple[int, ...]


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading videos needs PyAV: pip install av (or 'stt-fast[data]')") from None
    return av


def probe_video(path: str | os.PathLike | InMemoryVideo, limits: ReadLimits = DEFAULT_LIMITS) -> VideoInfo:
    """The video's size, duration and packet index, checked against limits; nothing is decoded."""
    if not isinstance(path, InMemoryVideo):
        path = regular_file(path, "video file")
    av = _av()
    try:
        with av.open(_container_source(path)) as container:
            if not container.streams.video:
                raise BadClipError(f"{path}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width and height:
                limits.check_frame(width, height, str(path))
            fps = float(stream.average_rate) if stream.average_rate else None
            seconds = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                       else container.duration / 1e6 if container.duration else None)
            if seconds is not None and seconds > limits.max_seconds:
                raise BadClipError(f"{path}: {seconds:.1f} s long, beyond the limit of {limits.max_seconds:g} s")
            pts: list[int | None] = []
            keys: list[int | None] = []
            for packet in container.demux(stream):
                if not packet.size:  # the demuxer's closing empty packet
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
                if len(pts) > limits.max_frames:
                    raise BadClipError(f"{path}: more than the limit of {limits.max_frames:,} frames")
    except BadClipError:
        raise
    except Exception as e:  # av.error.* for unreadable, truncated or foreign files
        raise BadClipError(f"{path}: unreadable video: {e}") from e
    if not pts:
        raise BadClipError(f"{path}: the video has no decodable frames (truncated or empty?)")
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        order, keyframes = None, ()  # no usable presentation times: frames are counted as decoded
    else:
        order = tuple(sorted(pts))
        keyframes = tuple(sorted(bisect.bisect_left(order, k) for k in keys if k is not None))
    return VideoInfo(path, width, height, len(pts), fps, seconds, order, keyframes)


MIN_SKIP = 16  # frames a seek must skip to be worth the decoder's flush and restart


def _plan(info: VideoInfo, wanted: list[int]) -> list[tuple[int | None, int]]:
    """The runs to decode, each (keyframe index to seek to, or None to start from the beginning; the last index
    of the run): a seek where the keyframe before the next index lies at least MIN_SKIP frames beyond where
    decoding is, so that the frames between are never decoded."""
    if info.pts is None or not info.keyframes:
        return [(None, wanted[-1])]
    runs: list[tuple[int | None, int]] = []
    position = 0  # the next frame decoding would give without a seek
    for index in wanted:
        before = bisect.bisect_right(info.keyframes, index) - 1
        key = info.keyframes[before] if before >= 0 else 0
        if key - position >= MIN_SKIP:
            runs.append((key, index))
        elif runs:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((None, index))
        position = index + 1
    return runs


def decode_frames(info: VideoInfo, indices: Sequence[int], limits: ReadLimits = DEFAULT_LIMITS,
                  on_frame: Callable[[object], None] | None = None) -> dict:
    """{index: av.VideoFrame} for the frame indices asked for (0 <= index < info.frames), each frame
    decoded once; on_frame(frame) sees every frame the decoder gives (the tests count them)."""
    wanted = sorted(set(indices))
    if not wanted:
        return {}
    if wanted[0] < 0 or wanted[-1] >= info.frames:
        raise ValueError(f"frame indices must lie in [0, {info.frames}), got {wanted[0]}..{wanted[-1]}")
    runs = _plan(info, wanted)
    kept = _decode_runs(info, runs, set(wanted), limits, on_frame)
    if len(kept) < len(wanted) and any(start is not None for start, _ in runs):
        # a seek that did not land where the index says (a damaged index, open GOPs): decode from the start
        kept = _decode_runs(info, [(None, wanted[-1])], set(wanted), limits, on_frame)
    missing = [i for i in wanted if i not in kept]
    if missing:
        raise BadClipError(f"{info.path}: frames {missing[:5]} could not be decoded (the video is damaged or "
                           "truncated)")
    return kept


def _decode_runs(info: VideoInfo, runs: list[tuple[int | None, int]], wanted: set[int], limits: ReadLimits,
                 on_frame: Callable[[object], None] | None) -> dict:
    av = _av()
    path = info.path
    by_pts = {info.pts[i]: i for i in wanted} if info.pts is not None else None
    kept: dict = {}
    try:
        with av.open(_container_source(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # the decoder's own frame and slice threads
            count = 0
            for start, last in runs:
                if start is not None:
                    container.seek(info.pts[start], stream=stream, backward=True, any_frame=False)
                end = last if by_pts is None else info.pts[last]
                for frame in container.decode(stream):
                    if on_frame:
                        on_frame(frame)
                    limits.check_frame(frame.width, frame.height, str(path))
                    if by_pts is None:
                        index, reached, count = count, count, count + 1
                    else:
                        index, reached = by_pts.get(frame.pts), frame.pts if frame.pts is not None else -1
                    if index in wanted and index not in kept:
                        kept[index] = frame
                    if reached >= end:
                        break
    except (BadClipError, Cancelled):
        raise
    except Exception as e:
        if len(kept) < len(wanted):
            raise BadClipError(f"{path}: unreadable video: {e}") from e
    return kept


YUV420 = ("yuv420p", "yuvj420p")


def frame_rgb(frame, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A decoded frame (or the region (top, left, height, width) of it) as RGB uint8 [H, W, 3]: exactly the
    decoder's RGB conversion of the whole frame, cropped. A 4:2:0 frame's region on even coordinates is
    cropped in YUV and only it converted (a face's square costs its own pixels, not the frame's)."""
    if region is None or region == (0, 0, frame.height, frame.width):
        return frame.to_ndarray(format="rgb24")
    top, left, h, w = region
    if frame.format.name in YUV420 and not (top | left | h | w) & 1:
        try:
            return _crop_yuv420(frame, top, left, h, w)
        except (ValueError, TypeError, AttributeError):  # an unusual layout: the whole frame, then the crop
            pass
    return frame.to_ndarray(format="rgb24")[top:top + h, left:left + w]


def _crop_yuv420(frame, top: int, left: int, h: int, w: int) -> np.ndarray:
    av = _av()

    def cut(plane, rows: slice, cols: slice) -> np.ndarray:
        return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[rows, cols]

    y, u, v = frame.planes[:3]
    chroma_rows, chroma_cols = slice(top // 2, (top + h) // 2), slice(left // 2, (left + w) // 2)
    packed = np.concatenate([cut(y, slice(top, top + h), slice(left, left + w)).ravel(),
                             cut(u, chroma_rows, chroma_cols).ravel(), cut(v, chroma_rows, chroma_cols).ravel()])
    crop = av.VideoFrame.from_ndarray(packed.reshape(h * 3 // 2, w), format=frame.format.name)
    crop.colorspace, crop.color_range = frame.colorspace, frame.color_range  # the same conversion matrix
    return crop.to_ndarray(format="rgb24")


def even_region(region: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A region moved and shrunk by at most a pixel onto even coordinates (where 4:2:0 chroma samples fall)."""
    top, left, h, w = region
    top, left = top - top % 2, left - left % 2
    return top, left, max(2, h - h % 2), max(2, w - w % 2)


def read_video(path: str | os.PathLike, indices: list[int] | Callable[[int], list[int]],
               limits: ReadLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """The frames at indices (repeats allowed; or indices(frame count)), full size: uint8 [len, 3, H, W]."""
    info = probe_video(path, limits)
    indices = indices(info.frames) if callable(indices) else indices
    frames = decode_frames(info, indices, limits)
    return _to_tensor([frame_rgb(frames[i]) for i in indices])


def count_video_frames(path: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> int:
    return probe_video(path, limits).frames


def read_clip(path: str | os.PathLike, choose: Callable[[int], list[int]],
              limits: ReadLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """The frames choose(num_available) of a frame folder or a video file: uint8 [T, 3, H, W] at full size."""
    path = Path(path)
    if path.is_dir():
        frames = list_frames(path)
        return read_images([frames[i] for i in choose(len(frames))], limits)
    if not path.exists():
        raise BadClipError(f"{path}: clip not found")
    if not is_video(path):
        raise BadClipError(f"{path}: not a video file or a folder of frames")
    return read_video(path, choose, limits)
