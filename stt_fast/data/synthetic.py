"""A synthetic DFER-like data set: procedurally drawn faces whose features move over time differently per
class, written in the DFEW layout (stt_fast.data.datasets), for tests and for accuracy tracking.

Each clip draws one face (random position, size, skin and background colours, pixel noise) whose
expression grows from neutral to a class-specific apex after a random onset:

    Happy     mouth corners rise (smile), mouth widens
    Sad       mouth corners fall, inner eyebrow ends rise
    Neutral   no expression (small drift only)
    Angry     eyebrows lower and slant inward, mouth narrows
    Surprise  eyebrows rise, eyes widen, mouth opens round
    Disgust   one mouth corner rises (asymmetric), eyebrows lower, eyes narrow, nose wrinkles
    Fear      eyebrows rise with inner ends up, eyes widen, mouth stretches wide and opens a little

A fraction of the clips is written as a video file instead of a frame folder, to exercise both readers.
"""

from __future__ import annotations

import csv
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stt_fast.config import EMOTIONS
from stt_fast.files import current_umask

from .datasets import DFEW_FRAMES_DIR, DFEW_SPLIT_DIR, DFEW_VIDEOS_DIR, FOLDS

# Per class, the apex change of each facial parameter (0 = neutral face).
EXPRESSIONS: dict[str, dict[str, float]] = {
    "Happy": {"smile": 0.9, "mouth_width": 0.25},
    "Sad": {"smile": -0.8, "brow_tilt": 0.7},
    "Neutral": {},
    "Angry": {"brow_height": -0.6, "brow_tilt": -0.8, "mouth_width": -0.3},
    "Surprise": {"brow_height": 0.9, "eye_open": 0.6, "mouth_open": 0.7, "mouth_width": -0.3},
    "Disgust": {"asymmetry": 0.9, "brow_height": -0.5, "eye_open": -0.5, "wrinkle": 1.0},
    "Fear": {"brow_height": 0.5, "brow_tilt": 0.6, "eye_open": 0.5, "mouth_width": 0.45, "mouth_open": 0.3},
}


@dataclass(frozen=True)
class SynthConfig:
    clips_per_class: int = 60
    image_size: int = 64
    min_frames: int = 6
    max_frames: int = 24
    video_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clips_per_class < 1:
            raise ValueError(f"clips_per_class must be >= 1, got {self.clips_per_class}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"frame counts must satisfy 1 <= min_frames <= max_frames, got {self.min_frames} and "
                             f"{self.max_frames}")
        if not 0.0 <= self.video_fraction <= 1.0:
            raise ValueError(f"video_fraction must be in [0, 1], got {self.video_fraction}")


def _face_frame(size: int, t: float, face: dict, expression: dict[str, float], rng: random.Random) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), face["background"])
    draw = ImageDraw.Draw(img)
    onset, apex = face["onset"], face["onset"] + face["rise"]
    e = face["amplitude"] * min(max((t - onset) / (apex - onset), 0.0), 1.0)
    p = {k: e * v for k, v in expression.items()}
    drift = 0.05 * math.sin(2 * math.pi * (t + face["phase"]))  # every class moves a little
    cx, cy, r = face["cx"] * size, face["cy"] * size, face["r"] * size
    draw.ellipse([cx - r, cy - 1.15 * r, cx + r, cy + 1.15 * r], fill=face["skin"], outline=(60, 40, 30))
    dark = (35, 25, 20)
    eye_h = 0.09 * r * (1 + p.get("eye_open", 0.0))
    brow_y = cy - 0.42 * r - 0.22 * r * (p.get("brow_height", 0.0) + drift)
    tilt = 0.18 * r * p.get("brow_tilt", 0.0)
    for side in (-1, 1):
        ex, ey = cx + side * 0.38 * r, cy - 0.2 * r
        draw.ellipse([ex - 0.13 * r, ey - eye_h, ex + 0.13 * r, ey + eye_h], fill=(250, 250, 250), outline=dark)
        draw.ellipse([ex - 0.05 * r, ey - 0.05 * r, ex + 0.05 * r, ey + 0.05 * r], fill=dark)
        outer, inner = ex + side * 0.2 * r, ex - side * 0.12 * r
        draw.line([(outer, brow_y), (inner, brow_y - tilt)], fill=dark, width=max(2, round(0.12 * r)))
    if p.get("wrinkle", 0.0) > 0.2:
        for k in (-1, 1):
            for dy in (0.0, 0.12):
                draw.line([(cx + k * 0.04 * r, cy + dy * r), (cx + k * 0.2 * r, cy + (dy + 0.1) * r)], fill=dark,
                          width=max(1, round(0.07 * r)))
    width = 0.36 * r * (1 + p.get("mouth_width", 0.0))
    my = cy + 0.5 * r
    smile, asym, opening = p.get("smile", 0.0), p.get("asymmetry", 0.0), p.get("mouth_open", 0.0)
    left = (cx - width, my - 0.3 * r * smile)
    right = (cx + width, my - 0.3 * r * (smile + asym))
    mid = (cx, my + 0.3 * r * smile * 0.8)
    if opening > 0.05:
        h = 0.3 * r * opening
        draw.ellipse([cx - width * 0.8, my - h, cx + width * 0.8, my + h], fill=(90, 20, 30), outline=dark)
    else:
        draw.line([left, mid, right], fill=(120, 30, 40), width=max(2, round(0.1 * r)), joint="curve")
    pixels = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, face["noise"], pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def synth_clip(label: int, num_frames: int, size: int, rng: random.Random, held: bool = False) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of one synthetic clip of class `label`; held: the expression at its apex
    from the first frame (no onset), as in a long recording that cuts from one expression to the next."""
    face = {
        "cx": rng.uniform(0.44, 0.56), "cy": rng.uniform(0.46, 0.54), "r": rng.uniform(0.32, 0.38),
        "skin": tuple(int(c) for c in np.clip(np.array([224, 172, 140]) * rng.uniform(0.55, 1.1), 0, 255)),
        "background": tuple(rng.randrange(40, 220) for _ in range(3)), "noise": rng.uniform(2, 6),
        "onset": rng.uniform(0.0, 0.35), "rise": rng.uniform(0.25, 0.5), "amplitude": rng.uniform(0.75, 1.0),
        "phase": rng.random(),
    }
    if held:
        face["onset"], face["rise"] = -1.0, 0.5
    expression = EXPRESSIONS[EMOTIONS[label]]
    times = [i / max(num_frames - 1, 1) for i in range(num_frames)]
    return np.stack([_face_frame(size, t, face, expression, rng) for t in times])


def _write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_long_video(path: str | os.PathLike, pieces: list[tuple[int, float]], *, fps: int = 25, size: int = 64,
                     seed: int = 0, held: bool = True) -> list[dict]:
    """A video of synthetic clips back to back: pieces [(class index, seconds)], each one face showing one
    expression (a new face per piece; held: at its apex throughout). Returns [{"start", "end", "label"}] in
    seconds, the ground truth."""
    rng = random.Random(seed)
    truth, chunks, start = [], [], 0.0
    for label, seconds in pieces:
        count = max(1, round(seconds * fps))
        chunks.append(synth_clip(label, count, size, rng, held=held))
        truth.append({"start": start, "end": start + count / fps, "label": EMOTIONS[label]})
        start += count / fps
    _write_video(Path(path), np.concatenate(chunks), fps=fps)
    return truth


def write_synthetic_dfew(root: str | os.PathLike, config: SynthConfig = SynthConfig(), progress: bool = True,
                         overwrite: bool = False) -> Path:
    """Write a synthetic data set in the DFEW layout under root and return root.

    Clips are numbered from 00001, classes interleaved; each of the 5 folds tests on every fifth clip
    of each class and trains on the rest. The set is written beside root and moved into place when
    complete. A non-empty root is refused (FileExistsError) unless overwrite, which replaces a data
    set in the DFEW layout whole; a folder holding anything else is never replaced.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass --force to replace it whole (or choose another folder)")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in ("Clip", DFEW_SPLIT_DIR.name)) \
            if root.is_dir() else [root.name]
        if foreign:
            raise FileExistsError(f"{root} holds more than a DFEW-layout data set ({', '.join(foreign[:5])}); "
                                  "not replacing it, even with --force")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        partial.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700 folders; the set gets the usual permissions
        _write_clips_and_splits(partial, config, progress)
        if root.is_dir():
            shutil.rmtree(root)
        elif root.exists():
            root.unlink()
        os.replace(partial, root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def _write_clips_and_splits(root: Path, config: SynthConfig, progress: bool) -> None:
    from PIL import Image

    from stt_fast.progress import progress_bar

    try:
        import av  # noqa: F401

        can_write_video = config.video_fraction > 0
    except ImportError:
        can_write_video = False
    rng = random.Random(config.seed)
    frames_dir, videos_dir = root / DFEW_FRAMES_DIR, root / DFEW_VIDEOS_DIR
    frames_dir.mkdir(parents=True, exist_ok=True)
    videos_dir.mkdir(parents=True, exist_ok=True)
    labels = [c for _ in range(config.clips_per_class) for c in range(len(EMOTIONS))]
    rows = []
    for clip_id, label in enumerate(progress_bar(labels, desc="[synth] clips", enabled=progress, unit="clip"), start=1):
        name = f"{clip_id:05d}"
        frames = synth_clip(label, rng.randint(config.min_frames, config.max_frames), config.image_size, rng)
        if can_write_video and rng.random() < config.video_fraction:
            _write_video(videos_dir / f"{name}.mp4", frames)
        else:
            folder = frames_dir / name
            folder.mkdir(exist_ok=True)
            for k, array in enumerate(frames, start=1):
                Image.fromarray(array).save(folder / f"{name}_{k:05d}.jpg", quality=92)
        rows.append((clip_id, label))
    per_class_index = {}
    for fold in FOLDS:
        splits = {"train": [], "test": []}
        for clip_id, label in rows:
            k = per_class_index.setdefault((fold, label), 0)
            per_class_index[(fold, label)] = k + 1
            splits["test" if k % len(FOLDS) == fold - 1 else "train"].append((clip_id, label))
        for split, items in splits.items():
            path = root / DFEW_SPLIT_DIR / f"{split}(single-labeled)" / f"set_{fold}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["video_name", "label"])
                writer.writerows((clip_id, label + 1) for clip_id, label in items)
