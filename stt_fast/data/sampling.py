"""TSN-style sampling of a clip's frames (docs/model.md).

The clip is cut into `segments` equal segments and `frames_per_segment` consecutive frames are taken
from each: at a random offset in training, at the segment's centre in testing. Clips shorter than
segments * frames_per_segment repeat frames: the indices spread evenly over the clip, in order.
"""

from __future__ import annotations

import random


def sample_indices(num_available: int, *, segments: int = 8, frames_per_segment: int = 2, train: bool = False,
                   rng: random.Random | None = None) -> list[int]:
    """Indices of the frames to read, in temporal order: segments * frames_per_segment of them."""
    if num_available < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_available}")
    if segments < 1 or frames_per_segment < 1:
        raise ValueError("segments and frames_per_segment must be >= 1")
    needed = segments * frames_per_segment
    if num_available < needed:
        # Short clip: spread the frames over the clip, repeating some (every frame used at least once
        # when possible), in order.
        return [i * num_available // needed for i in range(needed)]
    rng = rng or random
    length = num_available / segments
    indices = []
    for s in range(segments):
        start, stop = round(s * length), round((s + 1) * length)
        room = max(stop - start - frames_per_segment, 0)
        offset = rng.randint(0, room) if train else room // 2
        indices.extend(min(start + offset + k, num_available - 1) for k in range(frames_per_segment))
    return indices


def segments_for(num_frames: int, frames_per_segment: int = 2) -> int:
    """Segments for a model taking num_frames frames: 8 for the paper's 16."""
    if num_frames % frames_per_segment:
        raise ValueError(f"num_frames ({num_frames}) must be a multiple of frames_per_segment ({frames_per_segment})")
    return num_frames // frames_per_segment
