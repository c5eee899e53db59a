"""Frame sources for the timeline: a video file, a folder of frames, a camera, a stream URL; and a live
reader that never queues without bound.

Every source yields (rgb, timestamp): uint8 [H, W, 3] RGB frames and seconds. Files give their own
timestamps (the decoder's presentation times; a folder's frames are 1 / fps apart); cameras and stream
URLs the arrival time on a monotonic clock. A source that cannot be opened raises BadSourceError (a
ValueError naming it) before the first frame.

keep(timestamp) -> bool, when given, is asked before a frame is converted to RGB (or a folder's image
read): a frame it refuses is decoded (the decoder needs it) but never converted or yielded. FrameGrid is
the timeline's: it keeps the frames that fill a slot of its frame grid, one in three or four at the
usual 8 slots a second against 25-30 frames a second.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .video import BadClipError, is_video, list_frames, read_images, regular_file


class BadSourceError(ValueError):
    """A source that cannot be opened or read."""


def _is_live(source: str) -> bool:
    return source.isdigit() or "://" in source


class FrameGrid:
    """keep(timestamp) for a source: True for the frames that fill a slot of a grid of `step` seconds from the
    first frame on (slot i takes the first frame at or after first + i * step: stt_fast.timeline's rule).
    step None (not known yet) keeps every frame."""

    def __init__(self, step: float | None = None) -> None:
        self.step = step
        self.first: float | None = None
        self.last: float | None = None  # the latest timestamp asked about, kept or not
        self.seen = 0  # frames asked about
        self.next_slot = 0

    @property
    def span(self) -> float:
        """Seconds from the first frame asked about to the latest."""
        return 0.0 if self.first is None else self.last - self.first

    def __call__(self, timestamp: float) -> bool:
        self.seen += 1
        self.last = timestamp
        if self.first is None:
            self.first = timestamp
        if self.step is None:
            return True
        fills = False
        while self.first + self.next_slot * self.step <= timestamp + 1e-9:
            self.next_slot += 1
            fills = True
        return fills


Keep = Callable[[float], bool]


def open_source(source: str | os.PathLike, *, fps: float = 25.0,
                keep: Keep | None = None) -> tuple[Iterator[tuple[np.ndarray, float]], dict]:
    """(frames, info) for a video file, a folder of frames (fps apart), a camera index ("0") or a stream
    URL ("rtsp://..."). info: {"kind", "fps" (the source's, or None), "live"}. keep: module docstring."""
    keep = keep or (lambda timestamp: True)
    text = str(source)
    if _is_live(text):
        return _capture(int(text) if text.isdigit() else text, keep=keep)
    path = Path(text)
    if path.is_dir():
        frames = list_frames(path)
        if not frames:
            raise BadSourceError(f"{path}: no image frames in the folder")

        def folder():
            for i, frame in enumerate(frames):
                if keep(i / fps):
                    yield read_images([frame])[0].permute(1, 2, 0).numpy(), i / fps

        return folder(), {"kind": "folder", "fps": fps, "live": False}
    if not path.exists():
        raise BadSourceError(f"{path}: no such file or folder")
    if not is_video(path):
        raise BadSourceError(f"{path}: not a video file or a folder of frames")
    try:
        regular_file(path, "video file")
    except BadClipError as e:
        raise BadSourceError(str(e)) from None
    return _video_file(path, keep)


def _video_file(path: Path, keep: Keep):
    try:
        import av
    except ImportError:  # OpenCV reads files too
        return _capture(str(path), live=False, keep=keep)
    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except Exception as e:  # PyAV's errors: one clear line
        raise BadSourceError(f"{path}: cannot be read as a video ({type(e).__name__}: {e})") from None
    rate = float(stream.average_rate) if stream.average_rate else None

    stream.thread_type = "AUTO"  # the decoder's own threads

    def frames():
        try:
            for i, frame in enumerate(container.decode(stream)):
                timestamp = float(frame.time) if frame.time is not None else i / (rate or 25.0)
                if keep(timestamp):
                    yield frame.to_ndarray(format="rgb24"), timestamp
        except Exception as e:
            raise BadSourceError(f"{path}: decoding stopped ({type(e).__name__}: {e})") from None
        finally:
            container.close()

    return frames(), {"kind": "video", "fps": rate, "live": False}


def _capture(source: int | str, live: bool = True, keep: Keep = lambda timestamp: True):
    import cv2

    with contextlib.suppress(AttributeError):  # OpenCV's own warnings: the error below says it in one line
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise BadSourceError(f"{what}: cannot be opened")
    rate = capture.get(cv2.CAP_PROP_FPS) or None
    start = time.monotonic()

    def frames():
        try:
            index = 0
            while True:
                if not capture.grab():
                    return
                stamp = time.monotonic() - start if live else index / (rate or 25.0)
                index += 1
                if not keep(stamp):
                    continue
                ok, bgr = capture.retrieve()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), stamp
        finally:
            capture.release()

    return frames(), {"kind": "camera" if isinstance(source, int) else ("stream" if live else "video"),
                      "fps": rate, "live": live}


class LiveReader:
    """Reads a source on its own thread into a buffer of at most `capacity` frames; when the consumer
    falls behind, the oldest frame is dropped (and counted), so memory stays bounded and the newest
    frames are the ones processed; with drop=False the reader waits for room instead (a recording read
    ahead while the model runs, nothing lost). pace=True plays a file at its own timestamps, as a camera
    would deliver it. Iterate it for (rgb, timestamp); stop() ends it early."""

    def __init__(self, frames: Iterator[tuple[np.ndarray, float]], *, capacity: int = 8, pace: bool = False,
                 drop: bool = True) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.buffer: deque = deque()
        self.dropped = 0
        self.read = 0
        self.error: Exception | None = None
        self._frames, self._pace, self._drop = frames, pace, drop
        self._lock = threading.Condition()
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stt-fast-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        first = None
        try:
            for frame, stamp in self._frames:
                if self._stop.is_set():
                    break
                if self._pace:
                    first = stamp if first is None else first
                    delay = (stamp - first) - (time.monotonic() - started)
                    if delay > 0 and self._stop.wait(delay):
                        break
                with self._lock:
                    while not self._drop and len(self.buffer) >= self.capacity and not self._stop.is_set():
                        self._lock.wait(0.1)
                    if len(self.buffer) >= self.capacity:
                        self.buffer.popleft()
                        self.dropped += 1
                    self.buffer.append((frame, stamp))
                    self.read += 1
                    self._lock.notify()
        except Exception as e:  # handed to the consumer, which reports it
            self.error = e
        finally:
            with self._lock:
                self._done = True
                self._lock.notify()

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        while True:
            with self._lock:
                while not self.buffer and not self._done:
                    self._lock.wait(0.1)
                if self.buffer:
                    item = self.buffer.popleft()
                    self._lock.notify()  # a reader waiting for room (drop=False)
                elif self.error is not None:
                    raise self.error
                else:
                    return
            yield item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
