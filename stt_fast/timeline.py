"""Emotion over time: windows of a frame stream classified as they complete, each frame through the
backbone once.

Windows sit on a fixed frame grid: a window of `window` seconds holds the model's T frames, one per grid
step of window / T seconds, and a new window starts every `stride` seconds (a whole number of grid steps).
Grid slot i takes the first frame whose timestamp is at or after start + i * step (a source slower than
the grid repeats its frame). Overlapping windows share their grid frames, so each frame's backbone
features (the per-frame half of the program: 11.22 of the paper model's 33.19 GFLOPs per clip) are
computed once and kept for the T slots that can still use them; the transformer (the per-window half)
runs per window. With stride = window / 4 that is 4 new frames per window instead of 16.

    timeline = Timeline(stt_fast.compile(model), window=2.0, stride=0.5)
    for frame, timestamp in frames:            # frame: uint8 [H, W, 3] RGB (numpy or torch)
        for result in timeline.push(frame, timestamp):
            print(result.start, result.label)
    segments(timeline.results)

Face: with a detector, faces are looked for every `face_every` grid frames and the box is tracked between
detections (smoothed, so that the crop is stable); a detection that finds nothing loses the face until
the next one finds it. A window holding a frame without a face is reported as such, never labelled, and
its transformer half does not run.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data.face import Box, Detector, crop_square
from .data.transforms import resize
from .inputs import clips_to_float
from .predict import class_names


@dataclass
class WindowResult:
    start: float  # seconds from the first frame
    end: float
    face: bool | None  # None: faces not looked for
    label: str | None  # None when no face
    probabilities: dict[str, float] | None
    latency: float = 0.0  # seconds from the window's last frame's arrival to this result
    logits: list[float] | None = None

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2

    @property
    def confidence(self) -> float | None:
        return None if self.probabilities is None else max(self.probabilities.values())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Segment:
    start: float
    end: float
    label: str | None  # None: no face
    confidence: float | None  # mean of the windows' top probability
    windows: int


class FrameModel:
    """A model seen as its two halves: frames -> per-frame features, and T frames' features -> logits.
    Wraps the reference STT and stt_fast.compile's module (torch and triton backends); any other module
    (exported graphs, engines) runs whole windows from scratch (halves = False)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.halves = hasattr(model, "frame_features") and getattr(model, "has_halves", True)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, 3, S, S] -> features [F, ...], one row per frame."""
        with torch.no_grad():
            if hasattr(self.model, "has_halves"):  # the compiled module: takes uint8 itself
                return self.model.frame_features(frames)
            weight = next(self.model.parameters())
            return self.model.frame_features(clips_to_float(frames.to(weight.device), weight.dtype))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, ...] of frame_features rows -> logits [B, K] float32 on the CPU."""
        with torch.no_grad():
            if hasattr(self.model, "has_halves"):
                logits = self.model.classify_features(features.flatten(1, 2))  # [B, T*N, C]
            else:
                logits = self.model.classify_features(features)
        return logits.float().cpu()

    def classify_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B, T, 3, S, S] -> logits [B, K], the whole model at once (from scratch)."""
        with torch.no_grad():
            device = next(iter(self.model.parameters()), torch.empty(0)).device
            return self.model(frames.to(device)).float().cpu()


class FaceTracker:
    """The face box of a stream: detected every `every` frames, smoothed between (exponential moving
    average of the box, `smoothing` of the old one kept), lost when a detection finds none."""

    def __init__(self, detector: Detector, every: int = 5, smoothing: float = 0.6) -> None:
        if every < 1 or not 0 <= smoothing < 1:
            raise ValueError(f"every must be >= 1 and smoothing in [0, 1), got {every}, {smoothing}")
        self.detector, self.every, self.smoothing = detector, every, smoothing
        self.box: tuple[float, float, float, float] | None = None
        self.count = 0

    def update(self, rgb: np.ndarray) -> Box | None:
        """The box for this frame (uint8 [H, W, 3]), or None without a face."""
        if self.count % self.every == 0:
            found = self.detector(rgb)
            if not found:
                self.box = None
            else:
                new = max(found, key=lambda b: b[2] * b[3])
                if self.box is None:
                    self.box = tuple(float(v) for v in new)
                else:
                    k = self.smoothing
                    self.box = tuple(k * old + (1 - k) * v for old, v in zip(self.box, new))
        self.count += 1
        return None if self.box is None else tuple(round(v) for v in self.box)


def _as_chw(frame) -> torch.Tensor:
    """uint8 [H, W, 3] (numpy or torch) -> uint8 [3, H, W]."""
    t = torch.from_numpy(np.ascontiguousarray(frame)) if isinstance(frame, np.ndarray) else frame
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [H, W, 3] RGB, got {tuple(t.shape)} {t.dtype}")
    return t.permute(2, 0, 1)


class Timeline:
    """Push frames, get window results as they complete (module docstring)."""

    def __init__(self, model: torch.nn.Module | FrameModel, *, window: float = 2.0, stride: float = 0.5,
                 detector: Detector | None = None, face_every: int = 5, cache: bool = True,
                 clock: Callable[[], float] | None = None) -> None:
        """cache=False runs every window from scratch (its T frames through the whole model): the
        measurement's peer, and what models without halves do anyway."""
        self.model = model if isinstance(model, FrameModel) else FrameModel(model)
        config = self.model.config
        if not (window > 0 and stride > 0 and math.isfinite(window) and math.isfinite(stride)):
            raise ValueError(f"window and stride must be positive seconds, got {window} and {stride}")
        self.frames_per_window = config.num_frames
        self.step = window / config.num_frames
        self.stride_steps = max(1, round(stride / self.step))
        if self.stride_steps > self.frames_per_window:
            raise ValueError(f"stride {stride} s is longer than the window ({window} s): frames would be skipped")
        self.window, self.stride = window, self.stride_steps * self.step
        self.cache = cache and self.model.halves
        self.size = config.image_size
        self.labels = class_names(config.num_classes)
        self.tracker = FaceTracker(detector, face_every) if detector is not None else None
        self.clock = clock
        self.slots: deque = deque(maxlen=self.frames_per_window)  # (frame or features or None, arrival)
        self.pending: list[tuple[torch.Tensor | None, float]] = []  # grid frames not yet through the backbone
        self._last_frame: dict = {}  # id -> (frame, features) of the previous window's last frame
        self.next_slot = 0
        self.t0: float | None = None
        self.results: list[WindowResult] = []
        self.frames_seen = 0
        self.backbone_frames = 0  # frames through the backbone (the work the cache saves)

    def _prepare(self, frame) -> torch.Tensor | None:
        chw = _as_chw(frame)
        if self.tracker is not None:
            box = self.tracker.update(chw.permute(1, 2, 0).numpy())
            if box is None:
                return None
            chw = crop_square(chw, box)
        return resize(chw.unsqueeze(0), self.size, dtype=torch.uint8)[0]

    def push(self, frame, timestamp: float) -> list[WindowResult]:
        """One source frame (uint8 [H, W, 3] RGB) at `timestamp` seconds -> the windows it completed."""
        if self.t0 is None:
            self.t0 = timestamp
        self.frames_seen += 1
        arrival = self.clock() if self.clock else 0.0
        prepared, done = None, []
        while self.t0 + self.next_slot * self.step <= timestamp + 1e-9:
            if prepared is None:
                prepared = (self._prepare(frame),)
            self.pending.append((prepared[0], arrival))
            self.next_slot += 1
            if self.next_slot >= self.frames_per_window and (
                    self.next_slot - self.frames_per_window) % self.stride_steps == 0:
                done.append(self._complete())
        return done

    def _complete(self) -> WindowResult:
        """The window of the last T grid slots: bring the pending frames into the slots, classify."""
        if self.cache:  # each distinct frame once: a source slower than the grid fills several slots with one
            # frame, which may straddle two windows (the last one's features are kept for the next)
            rows = {key: features for key, (_, features) in self._last_frame.items()}
            distinct = list({id(f): f for f, _ in self.pending if f is not None and id(f) not in rows}.values())
            if distinct:
                rows |= dict(zip(map(id, distinct), self.model.frame_features(torch.stack(distinct))))
                self.backbone_frames += len(distinct)
            last = self.pending[-1][0]
            self._last_frame = {} if last is None else {id(last): (last, rows[id(last)])}
        for f, a in self.pending:
            self.slots.append((None if f is None else (rows[id(f)] if self.cache else f), a))
        self.pending = []
        first = self.next_slot - self.frames_per_window
        start, end = first * self.step, self.next_slot * self.step
        face = None if self.tracker is None else all(s is not None for s, _ in self.slots)
        if face is False:
            result = WindowResult(start, end, False, None, None)
        else:
            items = torch.stack([s for s, _ in self.slots]).unsqueeze(0)
            if self.cache:
                logits = self.model.classify_features(items)
            else:
                logits = self.model.classify_frames(items)
                self.backbone_frames += self.frames_per_window
            probs = logits.softmax(dim=-1)[0]
            result = WindowResult(start, end, face, self.labels[int(probs.argmax())],
                                  {name: round(float(p), 6) for name, p in zip(self.labels, probs)},
                                  logits=[float(v) for v in logits[0]])
        if self.clock:
            result.latency = self.clock() - self.slots[-1][1]
        self.results.append(result)
        return result


def segments(results: Sequence[WindowResult], *, smooth: int = 3) -> list[Segment]:
    """Runs of windows with one label, after a majority filter of `smooth` windows (a single window that
    disagrees with both neighbours takes theirs). Each window stands for the stride around its centre, so
    a class change is placed where the window centres cross it; windows without a face make segments of
    their own (label None) and are never smoothed into a label."""
    if not results:
        return []
    labels = [r.label for r in results]
    if smooth >= 3:
        for i in range(1, len(labels) - 1):
            before, after = results[i - 1].label, results[i + 1].label
            if before == after and before is not None and results[i].label not in (None, before):
                labels[i] = before
    stride = results[1].start - results[0].start if len(results) > 1 else results[0].end - results[0].start
    found: list[Segment] = []
    run: list[WindowResult] = []

    def close(label):
        first, last = run[0], run[-1]
        start = first.start if not found else first.centre - stride / 2
        end = last.end if last is results[-1] else last.centre + stride / 2
        conf = [r.confidence for r in run if r.confidence is not None]
        found.append(Segment(round(start, 4), round(end, 4), label, round(sum(conf) / len(conf), 6) if conf else None,
                             len(run)))

    label = labels[0]
    for result, lab in zip(results, labels):
        if lab != label and run:
            close(label)
            run = []
        label = lab
        run.append(result)
    close(label)
    return found


def run_timeline(frames: Iterable[tuple[np.ndarray, float]], timeline: Timeline,
                 on_result: Callable[[WindowResult], None] | None = None) -> list[WindowResult]:
    """Push every (frame, timestamp) through timeline; on_result sees each window as it completes."""
    for frame, timestamp in frames:
        for result in timeline.push(frame, timestamp):
            if on_result:
                on_result(result)
    return timeline.results


CSV_COLUMNS = ("start", "end", "face", "label", "confidence")


def windows_csv(results: Sequence[WindowResult], labels: Sequence[str]) -> str:
    """One row per window: start, end, face, label, confidence, then the probability of each class."""
    lines = [",".join([*CSV_COLUMNS, *labels])]
    for r in results:
        probs = [f"{r.probabilities[name]:.6f}" for name in labels] if r.probabilities else [""] * len(labels)
        face = "" if r.face is None else str(r.face).lower()
        conf = "" if r.confidence is None else f"{r.confidence:.6f}"
        lines.append(",".join([f"{r.start:.4f}", f"{r.end:.4f}", face, r.label or "", conf, *probs]))
    return "\n".join(lines) + "\n"


def plot_timeline(results: Sequence[WindowResult], found: Sequence[Segment], labels: Sequence[str], path,
                  title: str = "") -> None:
    """The probabilities of each class over time (at the window centres), the segments drawn under them
    as coloured bars with their labels, windows without a face shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_output

    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(labels)}
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(11, 4.8), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    centres = [r.centre for r in results]
    for name in labels:
        values = [r.probabilities[name] if r.probabilities else float("nan") for r in results]
        if any(v == v for v in values):  # a class with no window to show (no face anywhere) gets no line
            ax.plot(centres, values, color=colours[name], label=name, linewidth=1.5)
    faceless = [s for s in found if s.label is None]
    for i, s in enumerate(faceless):  # windows without a face: the same extent as their segment in the strip below
        ax.axvspan(s.start, s.end, color="0.88", linewidth=0, label="no face" if i == 0 else None)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    handles, names = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, names, ncol=min(len(handles), 8), fontsize=8, loc="lower center",
                  bbox_to_anchor=(0.5, 1.0), frameon=False)
    for s in found:
        colour = colours.get(s.label, "0.8") if s.label else "0.8"
        bar.barh(0, s.end - s.start, left=s.start, color=colour, edgecolor="white")
        if s.end - s.start > 0.04 * (found[-1].end - found[0].start):
            bar.text((s.start + s.end) / 2, 0, s.label or "no face", ha="center", va="center", fontsize=8)
    bar.set_yticks([])
    bar.set_xlabel("seconds")
    fig.tight_layout(rect=(0, 0.06 if title else 0, 1, 1))
    if title:  # a footer below the axes, inside the figure
        fig.text(0.01, 0.01, title, fontsize=8, ha="left", va="bottom")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
