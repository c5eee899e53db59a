"""Labelled clip sets: the DFEW layout, AFEW-style class folders, and the torch Dataset over them.

DFEW layout (as DFEW ships it; the synthetic generator writes the same):

    ROOT/Clip/clip_224x224/00001/00001_00001.jpg ...     one folder of frames per clip, or
    ROOT/Clip/original/00001.mp4                          one video file per clip
    ROOT/EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    ROOT/EmoLabel_DataSplit/test(single-labeled)/set_1.csv  ... set_5.csv
        video_name,label        label 1..7 = Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear
                                (or the class name)

AFEW-style: ROOT/SPLIT/<Class>/<clip>, where <clip> is a video file or a folder of frames and <Class>
one of the seven names (any case).
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from stt_fast.config import EMOTIONS

from .pipeline import ClipPipeline
from .sampling import sample_indices, segments_for
from .transforms import train_transform
from .video import VIDEO_SUFFIXES, BadClipError, read_clip

DFEW_FRAMES_DIR = Path("Clip") / "clip_224x224"
DFEW_VIDEOS_DIR = Path("Clip") / "original"
DFEW_SPLIT_DIR = Path("EmoLabel_DataSplit")
FOLDS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class ClipItem:
    path: Path
    label: int


def parse_label(value: str, where: str) -> int:
    """'1'..'7' (DFEW) or a class name -> 0-based index; BadClipError naming `where` otherwise."""
    text = value.strip()
    if text.isdigit() and 1 <= int(text) <= len(EMOTIONS):
        return int(text) - 1
    names = {name.lower(): i for i, name in enumerate(EMOTIONS)}
    if text.lower() in names:
        return names[text.lower()]
    raise BadClipError(f"{where}: unknown label {value!r} (expected 1-{len(EMOTIONS)} or one of {', '.join(EMOTIONS)})")


def _dfew_clip_path(root: Path, name: str) -> Path | None:
    folder = root / DFEW_FRAMES_DIR / name
    if folder.is_dir():
        return folder
    for suffix in sorted(VIDEO_SUFFIXES):
        video = root / DFEW_VIDEOS_DIR / f"{name}{suffix}"
        if video.is_file():
            return video
    return None


def dfew_items(root: str | os.PathLike, fold: int, split: str, *, skip_missing: bool = False,
               problems: list[str] | None = None) -> list[ClipItem]:
    """The clips of one DFEW fold and split ("train" or "test").

    A clip listed in the annotation file but absent from the layout is an error naming the file and
    line, or, with skip_missing, left out and described in `problems`.
    """
    root = Path(root)
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    annotation = root / DFEW_SPLIT_DIR / f"{split}(single-labeled)" / f"set_{fold}.csv"
    if not annotation.is_file():
        raise FileNotFoundError(f"DFEW annotation file not found: {annotation} (for a set laid out as class folders, "
                                "ROOT/Train/<Class>/<clip>, pass --layout folders)")
    items = []
    with open(annotation, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            where = f"{annotation}:{line}"
            if row.get("video_name") is None or row.get("label") is None:
                raise BadClipError(f"{where}: expected columns video_name,label")
            name = row["video_name"].strip()
            name = f"{int(name):05d}" if name.isdigit() else name
            if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
                raise BadClipError(f"{where}: clip name {name!r} is not a plain name (a clip lies in {root})")
            label = parse_label(row["label"], where)
            path = _dfew_clip_path(root, name)
            if path is None:
                message = (f"{where}: clip {name} is listed but has neither frames in {root / DFEW_FRAMES_DIR / name} "
                           f"nor a video in {root / DFEW_VIDEOS_DIR}")
                if not skip_missing:
                    raise BadClipError(message)
                if problems is not None:
                    problems.append(message)
                continue
            items.append(ClipItem(path, label))
    if not items:
        raise BadClipError(f"{annotation}: no usable clips")
    return items


def class_folder_items(root: str | os.PathLike) -> list[ClipItem]:
    """AFEW-style: root/<Class>/<video file or frame folder>."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = parse_label(class_dir.name, str(class_dir))
        for clip in sorted(class_dir.iterdir()):
            if clip.is_dir() or clip.suffix.lower() in VIDEO_SUFFIXES:
                items.append(ClipItem(clip, label))
    if not items:
        raise BadClipError(f"{root}: no clips found in class folders ({', '.join(EMOTIONS)})")
    return items


def load_clip(path: str | os.PathLike, *, num_frames: int, image_size: int, train: bool = False,
              crop_scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    """One clip ready for the model: float32 [num_frames, 3, image_size, image_size] in [0, 1].

    Testing: the clip pipeline of `stt-fast predict` (stt_fast.data.pipeline; segment centres, resize), so
    that eval scores what predict labels. Training: frames sampled at random offsets in their segments,
    read at full size, then the random resized crop and flip (stt_fast.data.transforms)."""
    if not train:
        return ClipPipeline(num_frames, image_size).load(path)[0]
    segments = segments_for(num_frames)
    frames = read_clip(path, lambda available: sample_indices(available, segments=segments, frames_per_segment=2,
                                                              train=True, rng=random))
    return train_transform(frames, image_size, scale=crop_scale)


class ClipDataset(Dataset):
    """(clip float32 [T, 3, S, S] in [0, 1], label, path, error) per item.

    T and S come from the model's config; frames are sampled TSN-style (2 per segment) and transformed
    as in docs/model.md (crop_scale: the area range of the training crop, 8%-100% in the paper).
    With skip_bad, an unreadable clip gives (None, label, path, message) instead of raising, so a
    training run can skip and report it; collate_clips drops such items.
    """

    def __init__(self, items: list[ClipItem], *, num_frames: int, image_size: int, train: bool,
                 skip_bad: bool = False, crop_scale: tuple[float, float] = (0.08, 1.0)) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.items = list(items)
        self.num_frames, self.image_size, self.train, self.skip_bad = num_frames, image_size, train, skip_bad
        self.crop_scale = crop_scale
        segments_for(num_frames)  # an odd frame count is refused here, not at the first clip

    def __len__(self) -> int:
        return len(self.items)

    def load(self, item: ClipItem) -> torch.Tensor:
        return load_clip(item.path, num_frames=self.num_frames, image_size=self.image_size, train=self.train,
                         crop_scale=self.crop_scale)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            return self.load(item), item.label, str(item.path), None
        except BadClipError as e:
            if not self.skip_bad:
                raise
            return None, item.label, str(item.path), str(e)


def collate_clips(batch) -> dict:
    """Stack the readable clips; report the unreadable ones under "bad" as (path, message)."""
    good = [b for b in batch if b[0] is not None]
    return {
        "clips": torch.stack([b[0] for b in good]) if good else None,
        "labels": torch.tensor([b[1] for b in good], dtype=torch.long),
        "paths": [b[2] for b in good],
        "bad": [(b[2], b[3]) for b in batch if b[0] is None],
    }


def make_loader(dataset: ClipDataset, *, batch_size: int, workers: int | None = None,
                pin_memory: bool = False) -> DataLoader:
    """The DataLoader recipe: shuffled in training, worker processes decoding clips in parallel."""
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=dataset.train, num_workers=workers,
                      collate_fn=collate_clips, pin_memory=pin_memory, persistent_workers=workers > 0,
                      drop_last=False)
