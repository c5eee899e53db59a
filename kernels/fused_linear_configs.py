"""Tuning data of fused_linear: candidate tiles per dtype, and why.

Kept as data, like st_attention_configs.py. The autotuner times the candidates that fit the problem once
per key (N, K, the fused steps and the row count's power-of-two bucket); under the interpreter the first
fitting candidate runs untimed, so each list starts with the plan argued for here.

The model's products: M = B * 785 token rows at the paper's shape (785 at batch 1, 50,240 at batch 64)
by N in {512, 1536, 2048} by K in {256, 512, 2048}, and the cls rows of the last block (M = B).

- 128 x 128 x 64, 8 warps, 3 stages: the Hopper GEMM tile (two warpgroups of wgmma); at batch 64 there
  are 393 x 4 programs of it for N = 512.
- 64 x 128 x 64 and 64 x 64 x 64, 4 warps: at batch 1 (M = 785) the 128-row tile leaves 28 programs for
  N = 512 on a GPU of 132 SMs; 64 x 64 gives 104. Still one warpgroup of wgmma on sm_90.
- 32 x 64 x 64, 16 x 16 x 256, 16 x 32 x 128 and 16 x 64 x 128: the cls rows (M = B), where a 64-row
  tile would be mostly padding. At batch 1 these products read a weight matrix for one row, a GEMV:
  16 x 16 gives N / 16 programs (32 for N = 512, 128 for fc1) where 16 x 64 gave 8 and 32, so the
  programs draw on most of the bandwidth, and its 256-wide K steps halve the main loop (issue 31; the
  launch plan takes the first fitting candidate, so it lists first among the 16-row tiles). A split-K
  form would give more programs still, at the price of a second pass for the epilogue: not written.
- The LayerNorm prologue's statistics pass reads [BLOCK_M, statistics_tile] at a time: 128 columns
  where the registers allow (64 values a thread at 4 warps), so at K = 512 a 64-row tile makes 4
  dependent reads, not 8.
float32 (IEEE products, no tensor cores) has its own, smaller tiles: the operands are twice the size.
STATUS: compiled for sm_80/87/90 by the ahead-of-time gate (spills, shared memory); not timed on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple


class LinearConfig(NamedTuple):
    block_m: int  # rows per program
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int


CANDIDATES: list[LinearConfig] = [
    LinearConfig(64, 64, 64, 4, 3),
    LinearConfig(128, 128, 64, 8, 3),
    LinearConfig(64, 128, 64, 4, 3),
    LinearConfig(32, 64, 64, 4, 2),
    LinearConfig(16, 16, 256, 4, 3),
    LinearConfig(16, 32, 128, 4, 3),
    LinearConfig(16, 64, 128, 4, 2),
]
CANDIDATES_FP32: list[LinearConfig] = [
    LinearConfig(32, 64, 32, 4, 2),
    LinearConfig(64, 64, 32, 8, 2),
    LinearConfig(16, 32, 32, 4, 1),
]


# Per-architecture exclusions: (major, minor) -> dtype -> {config: why}, never timed there. Evidence: the
# ahead-of-time matrix (benchmarks/results/kernels-aot/), whose gate re-checks what is left in.
_BF16_PROLOGUE_SPILLS = "spills with the LayerNorm prologue in bf16 (tens of bytes; the AOT matrix, Triton 3.9)"
EXCLUDED: dict[tuple[int, int], dict[str, dict[LinearConfig, str]]] = {
    **{capability: {"bf16": {LinearConfig(128, 128, 64, 8, 3): _BF16_PROLOGUE_SPILLS,
                             LinearConfig(64, 128, 64, 4, 3): _BF16_PROLOGUE_SPILLS}}
       for capability in ((8, 0), (8, 6), (8, 7), (8, 9))},
    (9, 0): {"bf16": {LinearConfig(32, 64, 64, 4, 2): "spills 4 B on sm_90 with Triton 3.6 with the 128-column "
                                                      "statistics steps (issue 31; Triton 3.9 does not)"}},
}


def statistics_tile(config: LinearConfig, dtype_name: str) -> int:
    """Columns per step of the LayerNorm prologue's statistics pass: up to 128 and 8,192 values a step, at least
    BLOCK_K. float32 keeps BLOCK_K: its tiles are at the register limit already (128-wide steps spilled 4-24 B
    on sm_90 in the ahead-of-time compiles, as did 512-wide steps of the 16-row half-precision tile)."""
    if dtype_name == "fp32":
        return config.block_k
    return max(config.block_k, min(128, 8192 // config.block_m))


def candidate_table(dtype_name: str) -> list[LinearConfig]:
    """The candidates for a dtype ("fp16", "bf16" or "fp32")."""
    return CANDIDATES_FP32 if dtype_name == "fp32" else CANDIDATES


def _fit(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def fitting(m: int, n: int, k: int, dtype_name: str = "fp16") -> list[LinearConfig]:
    """Candidates whose tiles are no larger than the problem (rounded up to a power of two, at least 16),
    so that the cls rows (M = B) take the small tiles and the token rows the large ones."""
    table = candidate_table(dtype_name)
    fits = [c for c in table if c.block_m <= _fit(m) and c.block_n <= _fit(n) and c.block_k <= _fit(k)]
    return fits or [min(table, key=lambda c: (c.block_m, c.block_n, c.block_k))]


def candidates(m: int, n: int, k: int, capability: tuple[int, int] | None,
               dtype_name: str = "fp16") -> list[LinearConfig]:
    """What the autotuner times on a GPU of this compute capability (None: the interpreter): the fitting
    candidates less those excluded for the target and dtype."""
    excluded = EXCLUDED.get(capability, {}).get(dtype_name, {}) if capability else {}
    fits = fitting(m, n, k, dtype_name)
    return [c for c in fits if c not in excluded] or fits[:1]
