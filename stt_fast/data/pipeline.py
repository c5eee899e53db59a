"""The path from a file to the model, in one place: decode -> detect -> crop -> resize -> batch.

`stt-fast predict`, `eval`, `annotate` and `serve` all read clips through ClipPipeline:

    pipeline = ClipPipeline(num_frames=16, image_size=112, detect_face=True)
    for item in pipeline.read_ahead(paths):          # in order, the next clips read while the model runs
        item.clip                                     # float32 [T, 3, S, S] in [0, 1], or None
        item.error, item.skipped, item.warnings, item.seconds

Per clip:
1. decode: the T frames sampled TSN-style at the segment centres (stt_fast.data.sampling), each decoded
   once and kept in the decoder's format (stt_fast.data.video: bounds checked before decoding, seeking in
   long videos);
2. detect (optional): the face looked for in PROBES of them, on a downscaled copy (stt_fast.data.face);
   the largest box, widened to a square, is the clip's region; without detection the region is the frame;
3. crop and resize: the region of each frame converted to RGB at full resolution (a video frame's region
   cropped in YUV first, so that only its pixels are converted: exactly the decoder's conversion of the
   whole frame, cropped), then resized to S x S (antialiased bilinear on uint8) and only then made float.

No face, when detection was asked for, means no label (no_face="skip"): a clip is never labelled from
frames the user asked to be cropped to a face, unless no_face="full" asks for the full frames (with a
warning) or "error" makes it a failure.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .face import Detector, largest_face, probe_positions, square_around
from .sampling import sample_indices, segments_for
from .transforms import resize
from .video import (
    DEFAULT_LIMITS,
    BadClipError,
    Cancelled,
    InMemoryVideo,
    ReadLimits,
    decode_frames,
    even_region,
    frame_rgb,
    is_video,
    list_frames,
    probe_video,
    read_image,
)

NO_FACE = ("skip", "full", "error")
NO_FACE_WARNING = "no face found: the full frames were used"


class NoFaceSkipped(BadClipError):
    """A clip without a face, left out as no_face="skip" asks (not a failure)."""


@dataclass
class PreparedClip:
    """One path through the pipeline: the clip, or why there is none (error: unreadable; skipped: no face)."""

    path: str
    clip: torch.Tensor | None = None  # float32 [T, 3, S, S] in [0, 1]
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # decode, detect, crop_resize


def clip_warnings(frames: int, size: tuple[int, int], num_frames: int, image_size: int) -> list[str]:
    """Warnings for a clip far below the model's input: fewer than half its frames, or frames (the face
    crop) under half its size: they were repeated or upsampled, and the prediction is worth less."""
    found = []
    if frames < num_frames / 2:
        found.append(f"the clip has {frames} frame(s); the model takes {num_frames}, so frames were repeated")
    height, width = size
    if min(height, width) < image_size / 2:
        found.append(f"frames (or the face crop) are {height}x{width}, far below the model's "
                     f"{image_size}x{image_size}: they were upsampled")
    return found


def _size(frame) -> tuple[int, int]:
    return (frame.shape[0], frame.shape[1]) if isinstance(frame, np.ndarray) else (frame.height, frame.width)


def _rgb(frame, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A sampled frame (or its region) as RGB uint8 [H, W, 3]: an image as it was read, a video frame through
    the decoder's converter."""
    if isinstance(frame, np.ndarray):
        if region is None:
            return frame
        top, left, h, w = region
        return frame[top:top + h, left:left + w]
    return frame_rgb(frame, region)


class ClipPipeline:
    """Files to model inputs (module docstring). detector: RGB frame -> boxes (default: the Haar cascade,
    built on first use)."""

    def __init__(self, num_frames: int, image_size: int, *, detect_face: bool = False, no_face: str = "skip",
                 detector: Detector | None = None, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        if no_face not in NO_FACE:
            raise ValueError(f"no_face must be one of {NO_FACE}, got {no_face!r}")
        self.num_frames, self.image_size = num_frames, image_size
        self.segments = segments_for(num_frames)
        self.detect_face, self.no_face, self.limits = detect_face, no_face, limits
        self._detector = detector

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            from .face import haar_detector

            self._detector = haar_detector()
        return self._detector

    def sampled_frames(self, path: str | os.PathLike | InMemoryVideo,
                       stop: threading.Event | None = None) -> tuple[list, int]:
        """(the T sampled frames in order, how many the clip has): video frames still in the decoder's
        format, images as RGB arrays; each distinct frame read once. stop: set it to make decoding raise
        Cancelled at its next frame."""
        if isinstance(path, InMemoryVideo):
            return self._video_frames(path, stop)
        path = Path(path)
        if path.is_dir():
            names = list_frames(path)
            indices = sample_indices(len(names), segments=self.segments, frames_per_segment=2)
            read = {i: read_image(names[i], self.limits) for i in sorted(set(indices))}
            if len({a.shape for a in read.values()}) > 1:
                raise BadClipError(f"{path}: frames differ in size: {sorted({a.shape for a in read.values()})}")
            return [read[i] for i in indices], len(names)
        if not path.exists():
            raise BadClipError(f"{path}: clip not found")
        if not is_video(path):
            raise BadClipError(f"{path}: not a video file or a folder of frames")
        return self._video_frames(path, stop)

    def _video_frames(self, source, stop: threading.Event | None) -> tuple[list, int]:
        info = probe_video(source, self.limits)
        indices = sample_indices(info.frames, segments=self.segments, frames_per_segment=2)

        def check(frame) -> None:
            if stop is not None and stop.is_set():
                raise Cancelled(f"{source}: decoding stopped (its request was cancelled)")

        decoded = decode_frames(info, indices, self.limits, on_frame=check)
        return [decoded[i] for i in indices], info.frames

    def region(self, frames: list, source: str, warnings: list[str]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the frames the model sees: the face's square, or the whole frame."""
        height, width = _size(frames[0])
        if not self.detect_face:
            return 0, 0, height, width
        box = largest_face([_rgb(frames[i]) for i in probe_positions(len(frames))], self.detector)
        if box is not None:
            square = square_around(box, height, width)
            return square if isinstance(frames[0], np.ndarray) else even_region(square)
        if self.no_face == "full":
            warnings.append(NO_FACE_WARNING)
            return 0, 0, height, width
        if self.no_face == "skip":
            raise NoFaceSkipped(f"{source}: no face found in the clip")
        raise BadClipError(f"{source}: no face found in the clip")

    def crop_resize(self, frames: list, region: tuple[int, int, int, int]) -> torch.Tensor:
        """uint8 [T, 3, S, S] of the region of each frame."""
        converted: dict[int, torch.Tensor] = {}
        out = []
        for frame in frames:  # a repeated frame (short clips) is converted once
            if id(frame) not in converted:
                converted[id(frame)] = torch.from_numpy(np.ascontiguousarray(_rgb(frame, region)))
            out.append(converted[id(frame)])
        # [T, H, W, 3] viewed as [T, 3, H, W]: channels-last, the resampler's fast layout
        return resize(torch.stack(out).permute(0, 3, 1, 2), self.image_size, dtype=torch.uint8)

    def load(self, path: str | os.PathLike | InMemoryVideo, seconds: dict[str, float] | None = None,
             stop: threading.Event | None = None) -> tuple[torch.Tensor, list[str]]:
        """(float32 [T, 3, S, S] clip in [0, 1], warnings); BadClipError for a clip that cannot be read, and
        NoFaceSkipped / BadClipError for one without a face as no_face says. seconds: receives each stage's
        time. stop: set it to abandon the work (Cancelled is raised)."""
        seconds = {} if seconds is None else seconds
        warnings: list[str] = []
        started = time.perf_counter()
        frames, available = self.sampled_frames(path, stop)
        if stop is not None and stop.is_set():
            raise Cancelled(f"{path}: stopped (its request was cancelled)")
        seconds["decode"] = time.perf_counter() - started
        started = time.perf_counter()
        region = self.region(frames, str(path), warnings)
        seconds["detect"] = time.perf_counter() - started
        started = time.perf_counter()
        clip = self.crop_resize(frames, region).float().div_(255)
        seconds["crop_resize"] = time.perf_counter() - started
        return clip, warnings + clip_warnings(available, region[2:], self.num_frames, self.image_size)

    def prepare(self, path: str | os.PathLike) -> PreparedClip:
        """load(path) that never raises for a clip: an unreadable one gets its error, a faceless one skipped."""
        item = PreparedClip(str(path))
        try:
            item.clip, item.warnings = self.load(path, item.seconds)
        except NoFaceSkipped as e:
            item.skipped = str(e)
        except BadClipError as e:
            item.error = str(e)
        return item

    def read_ahead(self, paths: Iterable[str | os.PathLike], depth: int = 4) -> Iterator[PreparedClip]:
        """prepare(path) for each path, in order, up to `depth` clips ahead of the caller on one thread."""
        return read_ahead(paths, self.prepare, depth)


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], work: Callable[[T], R], depth: int = 4) -> Iterator[R]:
    """work(item) for each item, in order, computed on one background thread at most `depth` items ahead of
    the consumer: reading overlaps the caller's work (inference) and memory stays bounded. An exception of
    work is raised where its result would have been; closing the iterator early cancels what is queued."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    source = iter(items)
    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stt_fast-read-ahead")
    try:
        for item in source:
            pending.append(pool.submit(work, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
