"""Tuning data of st_attention: candidate launch configurations per mode, and why.

Kept as data so a tuning session edits a table, not the kernel. On a GPU the autotuner times the
candidates that fit the group (pruned below) once per key (mode, head dim, L, T, N, dtype); the batch
size is not in the key, so a new batch size neither recompiles nor re-tunes. Under the Triton
interpreter (CPU tests) the first fitting candidate is used as is.

STATUS: chosen from the shapes and the usual FlashAttention-2 practice on Hopper; not yet timed on a
GPU (no GPU was lent to the issue that wrote them). benchmarks/bench_st_attention.py times them.
"""

from __future__ import annotations

from typing import NamedTuple


class LaunchConfig(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # key rows per inner-loop step
    num_warps: int
    num_stages: int


CANDIDATES: dict[str, list[LaunchConfig]] = {
    # One long sequence per (batch, head), L = 785 at the paper's shape: the FlashAttention-2 regime.
    # 128 x 64 tiles with 4-8 warps and a 2-3 stage pipeline are what such kernels use at head dim 64
    # on sm_90; 64 x 64 keeps more programs in flight at small batch (B*H*13 programs instead of 7).
    "joint": [
        LaunchConfig(128, 64, 8, 3),
        LaunchConfig(128, 64, 4, 3),
        LaunchConfig(128, 128, 8, 2),
        LaunchConfig(64, 64, 4, 3),
        LaunchConfig(64, 32, 4, 2),
        LaunchConfig(32, 32, 2, 2),
        LaunchConfig(16, 16, 1, 1),
    ],
    # Groups of 1 + N = 50 tokens (cls + one frame): one 64-row query tile and one 64-key step cover a
    # whole group, so the online softmax runs a single iteration; 4 warps per 64 x 64 tile.
    "spatial": [
        LaunchConfig(64, 64, 4, 1),
        LaunchConfig(64, 64, 4, 2),
        LaunchConfig(64, 32, 4, 2),
        LaunchConfig(32, 32, 2, 2),
        LaunchConfig(128, 64, 8, 2),
        LaunchConfig(16, 16, 1, 1),
    ],
    # Groups of T = 16 tokens (one grid position across frames): the smallest tl.dot tile, 16 x 16;
    # tens of thousands of tiny programs, so 1-2 warps each to keep many resident per SM.
    "temporal": [
        LaunchConfig(16, 16, 1, 1),
        LaunchConfig(16, 16, 2, 1),
        LaunchConfig(32, 32, 2, 1),
        LaunchConfig(64, 64, 4, 1),
    ],
}

# The spatial cls program attends one query (the cls token) per frame; 16 rows is the smallest tile
# tl.dot accepts, so the cls row is repeated 16 times and only row 0 is stored.
CLS_BLOCK_M = 16

# Per-architecture exclusions: (major, minor) -> mode -> {config: why}. A candidate listed for a target
# is never timed there. Filled from the ahead-of-time compile matrix (`stt-fast kernels aot`), which
# the CI gate re-checks: no chosen candidate may spill registers or need more shared memory than the
# target gives a block.
EXCLUDED: dict[tuple[int, int], dict[str, dict[LaunchConfig, str]]] = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fitting(mode: str, query_len: int, key_len: int) -> list[LaunchConfig]:
    """Candidates whose tiles are no larger than the group needs (smallest tile: 16)."""
    max_m = max(16, _next_pow2(query_len))
    max_n = max(16, _next_pow2(key_len))
    fits = [c for c in CANDIDATES[mode] if c.block_m <= max_m and c.block_n <= max_n]
    return fits or [min(CANDIDATES[mode], key=lambda c: (c.block_m, c.block_n))]


def candidates(mode: str, query_len: int, key_len: int, capability: tuple[int, int] | None) -> list[LaunchConfig]:
    """The candidates the autotuner times for one group shape on a GPU of this compute capability
    (None: the interpreter): those that fit the group, less those the target cannot run well."""
    excluded = EXCLUDED.get(capability, {}).get(mode, {}) if capability else {}
    fits = fitting(mode, query_len, key_len)
    return [c for c in fits if c not in excluded] or fits[:1]
