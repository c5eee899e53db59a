"""Tuning data of st_attention: candidate launch configurations per mode and dtype, and why.

Kept as data so that a tuning session edits a table, not the kernel. On a GPU the autotuner times the
candidates that fit the group (and the target: EXCLUDED) once per key (mode, head dim, L, T, N, dtype
and the batch's power-of-two bucket: the best tile at batch 1 is not the best at batch 64, where many
more programs are in flight); a new batch size in a known bucket neither recompiles nor re-tunes, and
the timings are kept on disk where the Triton version can (cache_results). Under the Triton
interpreter (CPU tests) the first fitting candidate is used without timing: each list starts with the
plan the kernel's docstring argues for.

Every candidate below was compiled ahead of time for sm_80 / sm_86 / sm_87 / sm_89 / sm_90 at the
paper's shape (`stt-fast kernels aot`, committed under benchmarks/results/kernels-aot/): none spills,
none needs more shared memory than its target gives a block, and the 64-row-and-larger tiles of 4+
warps reach wgmma on sm_90. STATUS: not yet timed on a GPU; the autotuner chooses among them there.
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
    # 128 x 64 tiles with 8 warps and a 3-stage pipeline are what such kernels use at head dim 64 on
    # sm_90 (wgmma); 64 x 64 keeps more programs in flight at small batch (B*H*13 programs instead of 7).
    # 128 x 64 with 4 warps and 128 x 128 with 8 warps sit at 255 registers on sm_80-89 (no spills): kept
    # for sm_90, where they use 232 and 177, and left to the autotuner elsewhere.
    "joint": [
        LaunchConfig(128, 64, 8, 3),
        LaunchConfig(128, 64, 4, 3),
        LaunchConfig(128, 128, 8, 2),
        LaunchConfig(64, 64, 4, 3),
        LaunchConfig(64, 32, 4, 2),
        LaunchConfig(32, 32, 2, 2),
        LaunchConfig(16, 16, 2, 1),  # 1 warp spilled 4 B on sm_80 once the batch offsets became 64-bit
    ],
    # Groups of 1 + N = 50 tokens (cls + one frame): one 64-row query tile and one 64-key step cover a
    # whole group, so the online softmax runs once. 32 x 64 halves the tile with the whole group still in
    # one key step. The ahead-of-time matrix moved two first choices: 64 x 64 with 4 warps and 2 stages,
    # and with 8 warps and 1 stage, each spilled 8 B on sm_80 (8 warps and 2 stages do not); 16 x 16
    # runs 2 warps because 1 warp spilled 56 B on sm_90.
    "spatial": [
        LaunchConfig(64, 64, 4, 1),
        LaunchConfig(64, 64, 8, 2),
        LaunchConfig(32, 64, 4, 1),
        LaunchConfig(64, 32, 4, 2),
        LaunchConfig(32, 32, 2, 2),
        LaunchConfig(128, 64, 8, 1),
        LaunchConfig(16, 16, 2, 1),
    ],
    # Groups of T = 16 tokens (one grid position across frames). Packed tiles: a 64-row tile holds 4
    # grid positions (block-diagonal mask), so the tensor cores see 64 x 64 tiles (wgmma on sm_90) and
    # the grid shrinks 4x (13 programs per head instead of 49), at 4x the (tiny) attention FLOPs. The
    # one-position 16 x 16 tiles of the first plan stay as candidates. block_n = block_m: keys are the
    # tile's own rows.
    "temporal": [
        LaunchConfig(64, 64, 4, 1),
        LaunchConfig(32, 32, 2, 1),
        LaunchConfig(128, 128, 8, 1),
        LaunchConfig(16, 16, 1, 1),
        LaunchConfig(16, 16, 2, 1),
    ],
}

# float32 (IEEE products, no TF32, so FMA units rather than tensor cores) holds twice the bytes per
# operand: the half-precision tiles above spill in float32 (64 x 64 spatial and 128 x 64 joint by
# kilobytes on every target, and 128 x 64 joint needs 128 KiB of shared memory on sm_86/89), and so do
# the smaller ones at 2 warps (32 x 32 by ~500 B). Smaller tiles spread over more warps do not.
CANDIDATES_FP32: dict[str, list[LaunchConfig]] = {
    "joint": [LaunchConfig(64, 32, 8, 2), LaunchConfig(32, 32, 4, 2), LaunchConfig(16, 16, 2, 1)],
    "spatial": [LaunchConfig(64, 32, 8, 1), LaunchConfig(32, 32, 8, 1), LaunchConfig(16, 16, 4, 1)],
    "temporal": [LaunchConfig(32, 32, 4, 1), LaunchConfig(64, 64, 8, 1), LaunchConfig(16, 16, 2, 1),
                 LaunchConfig(16, 16, 4, 1)],
}

# The spatial cls program attends one query (the cls token) per frame; 16 rows is the smallest tile
# tl.dot accepts, so the cls row is repeated 16 times and only row 0 is stored.
CLS_BLOCK_M = 16

# Per-architecture exclusions: (major, minor) -> mode -> {config: why}. A candidate listed for a target
# is never timed there. The ahead-of-time compile matrix is the evidence, and the CI gate re-checks
# that no candidate left in may spill registers or need more shared memory than the target gives a
# block. The matrix of Triton 3.6 (the oldest supported; benchmarks/results/kernels-aot/) found some that
# spill there only, where Triton 3.9 does not: excluded on those targets, kept elsewhere.
_SPATIAL_CLS_SPILLS = ("spills 16 B with Triton 3.6 since each frame's first tile also attends the cls query "
                       "(issue 31; Triton 3.9 does not)")
EXCLUDED: dict[tuple[int, int], dict[str, dict[LaunchConfig, str]]] = {
    (8, 0): {
        "joint": {LaunchConfig(128, 64, 4, 3): "255 registers; spills 8 B on sm_80 with Triton 3.6"},
        "spatial": {LaunchConfig(32, 32, 2, 2): "spills 4 B on sm_80 with Triton 3.6",
                    LaunchConfig(16, 16, 4, 1): "float32: spills 12 B on sm_80 with Triton 3.6 (issue 31's kernel)"},
    },
    **{capability: {"spatial": {LaunchConfig(32, 64, 4, 1): _SPATIAL_CLS_SPILLS}}
       for capability in ((8, 6), (8, 7), (8, 9))},
}


def candidate_table(dtype_name: str) -> dict[str, list[LaunchConfig]]:
    """The candidate lists for a dtype ("fp16", "bf16" or "fp32")."""
    return CANDIDATES_FP32 if dtype_name == "fp32" else CANDIDATES


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fitting(mode: str, length: int, frames: int, patches: int, dtype_name: str = "fp16") -> list[LaunchConfig]:
    """Candidates whose tiles are no larger than the group needs (smallest tile: 16). Temporal tiles
    of at least T (rounded up) rows pack whole grid positions, no more positions than there are."""
    table = candidate_table(dtype_name)[mode]
    if mode == "joint":
        limit_m = limit_n = max(16, _next_pow2(length))
        fits = [c for c in table if c.block_m <= limit_m and c.block_n <= limit_n]
    elif mode == "spatial":
        fits = [c for c in table if c.block_m <= max(16, _next_pow2(patches))
                and c.block_n <= max(16, _next_pow2(patches + 1))]
    else:
        t_pad = _next_pow2(frames)
        fits = [c for c in table if c.block_m < t_pad or c.block_m // t_pad <= _next_pow2(patches)]
    return fits or [min(table, key=lambda c: (c.block_m, c.block_n))]


def candidates(mode: str, length: int, frames: int, patches: int, capability: tuple[int, int] | None,
               dtype_name: str = "fp16") -> list[LaunchConfig]:
    """The candidates the autotuner times for one group shape on a GPU of this compute capability
    (None: the interpreter): those that fit the group, less those the target cannot run well."""
    excluded = EXCLUDED.get(capability, {}).get(mode, {}) if capability else {}
    fits = fitting(mode, length, frames, patches, dtype_name)
    return [c for c in fits if c not in excluded] or fits[:1]
