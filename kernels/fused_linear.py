"""fused_linear: a linear layer with the passes around it in its prologue and epilogue, one launch.

    out = residual + act(LayerNorm(a) @ weight^T + bias)

each step optional (fused_linear_reference.py states them exactly): the LayerNorm of the input rows
(prologue: statistics in float32 over K in one pass, the normalised tile rounded to a's dtype before the product, as a
separate LayerNorm would leave it), the bias (a vector, or a table indexed by the row within each clip:
the position embeddings), GELU in its erf form, the residual add (cls rows optionally keep the residual:
STT's temporal branch), and the output dtype (float32 logits from a half-precision head).

Why: in a pre-norm transformer every sub-layer is LayerNorm -> linear -> ... -> linear -> residual add.
cuBLAS plus separate kernels run that as four launches and three extra passes over the [M, D] rows
(add, normalise, GELU); here the LayerNorm rides in the next product's prologue (each program reads its
rows' full K anyway, so the statistics cost re-reads of tiles already in L2) and the add in the
previous product's epilogue, so a sub-layer is its products and its attention. At the paper's shape the
forward drops from 82 launches to 50 (stt-fast kernels plan).

tokens = P: the output is the token layout of clips of P rows (stt_fast.layout: the cls slot first), and a
holds only the patch rows: the token projection writes the [B, L, D] buffer directly, with the cls token
and the position table as its bias table; no concatenation.

Tiles: kernels/fused_linear_configs.py. One program per (BLOCK_M rows, BLOCK_N columns), programs ordered
column-fastest so that the programs sharing a tile of rows run together and read it from L2 once.
Row offsets are 64-bit: rows * K passes 2**31 elements from batch 1,336 for fc2 (K = 2,048). float32 uses
IEEE products, as st_attention does.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .add_layer_norm import _rows
from .fused_linear_configs import LinearConfig, candidate_table, candidates, statistics_tile
from .fused_linear_reference import fused_linear_reference
from .st_attention import (
    _DISK_CACHE,
    HAS_TRITON,
    _capability,
    _dtype_name,
    _log_cpu_fallback_once,
    _untimed,
    device_guard,
    interpreting,
)

AUTOTUNE_KEY = ("N", "K", "HAS_BIAS", "BIAS_TABLE", "NORM", "GELU", "HAS_RES", "SKIP_CLS", "TOKENS", "DOT_FP32",
                "PRECISION", "M_BUCKET")  # every specialisation: one call site's tuning is never another's

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _fused_linear_kernel(A, W, BIAS, RES, OUT, NORM_W, NORM_B,
                             M, N, K, stride_am, stride_wn, stride_rm, stride_om, eps, period,
                             HAS_BIAS: tl.constexpr, BIAS_TABLE: tl.constexpr, NORM: tl.constexpr,
                             GELU: tl.constexpr, HAS_RES: tl.constexpr, SKIP_CLS: tl.constexpr,
                             TOKENS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             STATS_K: tl.constexpr, M_BUCKET):
        # M_BUCKET is read by no instruction: it keys the autotuner on the row count's bucket.
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if TOKENS:  # output row r = clip * P + l; l = 0 is the cls slot (no input row)
            a_rows = rows - rows // period - 1
            a_ok = row_ok & (rows % period != 0)
        else:
            a_rows = rows
            a_ok = row_ok
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        a_base = A + a_rows[:, None] * stride_am
        if NORM:  # the rows' statistics in one pass: each K tile's mean and centred sum of squares, merged
            # into the running ones (Chan et al.): no cancellation from E[x^2] - E[x]^2, one read of the rows
            mean = tl.zeros([BLOCK_M], tl.float32)
            squares = tl.zeros([BLOCK_M], tl.float32)
            offs_s = tl.arange(0, STATS_K)  # a wider step than the product's: fewer dependent reads
            for k0 in range(0, K, STATS_K):
                ks = k0 + offs_s
                k_ok = ks < K
                x = tl.load(a_base + ks[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                seen = tl.minimum(k0, K).to(tl.float32)
                taken = tl.minimum(K - k0, STATS_K).to(tl.float32)
                tile_mean = tl.sum(x, 1) / taken
                centred = tl.where(k_ok[None, :], x - tile_mean[:, None], 0.0)
                delta = tile_mean - mean
                mean += delta * (taken / (seen + taken))
                squares += tl.sum(centred * centred, 1) + delta * delta * (seen * taken / (seen + taken))
            rstd = 1.0 / tl.sqrt(squares / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            a = tl.load(a_base + ks[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                g = tl.load(NORM_W + ks, mask=k_ok, other=0.0).to(tl.float32)
                b = tl.load(NORM_B + ks, mask=k_ok, other=0.0).to(tl.float32)
                normed = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
                a = tl.where(a_ok[:, None] & k_ok[None, :], normed, 0.0).to(A.dtype.element_ty)
            w = tl.load(W + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            if BIAS_TABLE:
                acc += tl.load(BIAS + (rows % period)[:, None] * N + cols[None, :], mask=tile_ok, other=0.0).to(
                    tl.float32)
            else:
                acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        if HAS_RES:
            if SKIP_CLS:
                acc = tl.where((rows % period != 0)[:, None], acc, 0.0)
            acc += tl.load(RES + rows[:, None] * stride_rm + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty), mask=tile_ok)

    def _config(c: LinearConfig, dtype_name: str):
        return triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
                              "STATS_K": statistics_tile(c, dtype_name)}, num_warps=c.num_warps,
                             num_stages=c.num_stages)

    def _prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        a = args.get("A")
        allowed = candidates(args["M"], args["N"], args["K"], _capability(a), _linear_dtype(a))
        kept = [c for c in configs if _launch_config(c) in allowed] or configs[-1:]
        return kept[:1] if interpreting() else kept  # the interpreter times nothing: the table's first

    _TUNED = {}

    def _tuned(dtype_name: str):
        if dtype_name not in _TUNED:
            timing = {"do_bench": _untimed} if interpreting() else {}
            _TUNED[dtype_name] = triton.autotune(
                configs=[_config(c, dtype_name) for c in candidate_table(dtype_name)], key=list(AUTOTUNE_KEY),
                prune_configs_by={"early_config_prune": _prune}, **_DISK_CACHE, **timing)(_fused_linear_kernel)
        return _TUNED[dtype_name]


def _linear_dtype(t) -> str:
    """The dtype's name as the exclusions know it: "fp32", "bf16" or "fp16"."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(getattr(t, "dtype", None), "fp16")


def _launch_config(config) -> LinearConfig:
    k = config.kwargs
    return LinearConfig(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_warps, config.num_stages)


def planned_grid(rows: int, n: int, k: int, norm: bool, dtype_name: str,
                 capability: tuple[int, int]) -> tuple[int, int, int]:
    """(programs, longest, total) of one launch as stt_fast.launch_plan models it: the grid of the first
    fitting candidate on that target (the autotuner may take another on the GPU), and the chain of dependent
    memory reads in a program, the same in every program: the prologue's statistics pass (its loads are not
    software-pipelined: each step a round trip), then the pipelined main loop (one)."""
    config = candidates(rows, n, k, capability, dtype_name)[0]
    programs = -(-rows // config.block_m) * -(-n // config.block_n)
    chain = 1 + (-(-k // statistics_tile(config, dtype_name)) if norm else 0)
    return programs, chain, programs * chain


def m_bucket(rows: int) -> int:
    """The row count as the autotuner sees it: rounded up to a power of two (batch 1 and batch 64 are
    timed apart; a new batch size in a known bucket neither recompiles nor re-tunes)."""
    return 1 << max(0, (rows - 1).bit_length())


def _check(a, weight, bias, norm, residual, cls_period, tokens, out_dtype) -> tuple[int, int, tuple[int, ...]]:
    """The arguments' contract; returns (rows of the output, N, the output's shape)."""
    if a.dim() < 2 or weight.dim() != 2 or weight.shape[1] != a.shape[-1]:
        raise ValueError(f"a [..., K] and weight [N, K] needed, got {tuple(a.shape)} and {tuple(weight.shape)}")
    if weight.dtype != a.dtype or weight.device != a.device or weight.stride(1) != 1:
        raise ValueError("weight must be a row-major [N, K] tensor of a's dtype on a's device")
    n = weight.shape[0]
    if tokens < 0 or (tokens and tokens < 2) or cls_period < 0:
        raise ValueError(f"tokens must be 0 or >= 2 and cls_period >= 0, got {tokens} and {cls_period}")
    if tokens:
        rows = a.numel() // a.shape[-1]
        if rows % (tokens - 1):
            raise ValueError(f"tokens={tokens}: a must hold whole clips of {tokens - 1} rows, got {rows}")
        shape = (rows // (tokens - 1) * tokens, n)
        if bias is None or tuple(bias.shape) != (tokens, n):
            raise ValueError(f"tokens={tokens} needs a bias table [{tokens}, {n}] (row 0: the cls token)")
    else:
        shape = (*a.shape[:-1], n)
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if bias is not None and (bias.dtype != a.dtype or not bias.is_contiguous()):
        raise ValueError("bias must be a contiguous tensor of a's dtype")
    if norm is not None:
        norm_weight, norm_bias, _ = norm
        if tuple(norm_weight.shape) != (a.shape[-1],) or tuple(norm_bias.shape) != (a.shape[-1],):
            raise ValueError(f"the norm's weight and bias must be [{a.shape[-1]}]")
    if residual is not None and (tuple(residual.shape) != shape or residual.dtype != (out_dtype or a.dtype)):
        raise ValueError(f"residual must be {shape} of the output's dtype, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    if cls_period and residual is None:
        raise ValueError("cls_period applies to the residual add: give residual")
    return shape[0] if len(shape) == 2 else int(torch.Size(shape[:-1]).numel()), n, shape


def fused_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
                 residual: torch.Tensor | None = None, cls_period: int = 0, tokens: int = 0,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out = residual + act(LayerNorm(a) @ weight^T + bias), each step optional (module docstring).

    a [..., K] with a contiguous last dim (rows evenly strided: a view such as x[:, 0] is read in place);
    weight [N, K] row-major; bias [N] (tokens = P: a table [P, N]); norm (weight [K], bias [K], eps);
    residual [..., N] of the output's dtype, any row stride. Returns a new contiguous [..., N] tensor
    (tokens: [B * P, N]) in out_dtype (default a's). Runs the Triton kernel on CUDA and through the
    interpreter on the CPU (TRITON_INTERPRET=1), otherwise fused_linear_reference. Bad input: ValueError.
    """
    norm_weight, norm_bias, eps = norm if norm is not None else (None, None, 0.0)
    if torch.compiler.is_compiling() or is_fake(a):
        _check(a, weight, bias, norm, residual, cls_period, tokens, out_dtype)  # the op's fake does not check
        return torch.ops.stt_fast.fused_linear(a, weight, bias, norm_weight, norm_bias, float(eps), gelu, residual,
                                               int(cls_period), int(tokens), out_dtype)
    return _fused_linear(a, weight, bias, norm_weight, norm_bias, eps, gelu, residual, cls_period, tokens, out_dtype)


def _fused_linear(a, weight, bias, norm_weight, norm_bias, eps, gelu, residual, cls_period, tokens, out_dtype,
                  config: LinearConfig | None = None) -> torch.Tensor:
    """The launch (or the reference on a CPU without the interpreter), after the checks. config: one tile
    forced instead of the autotuner's choice (the tests try every candidate)."""
    rows, n, shape = _check(a, weight, bias, None if norm_weight is None else (norm_weight, norm_bias, eps),
                            residual, cls_period, tokens, out_dtype)
    norm = None if norm_weight is None else (norm_weight, norm_bias, eps)
    if a.device.type == "cpu" and not interpreting():
        _log_cpu_fallback_once()
        return fused_linear_reference(a, weight, bias, norm=norm, gelu=gelu, residual=residual,
                                      cls_period=cls_period, tokens=tokens, out_dtype=out_dtype)
    if not HAS_TRITON:
        raise RuntimeError("fused_linear on a GPU needs the 'triton' package")
    out = torch.empty(shape, dtype=out_dtype or a.dtype, device=a.device)
    res2 = None if residual is None else _rows(residual, "residual")
    args, kwargs = launch_arguments(_rows(a, "a"), weight, bias, res2, out.view(rows, n), norm_weight, norm_bias, eps,
                                    gelu=gelu, cls_period=cls_period, tokens=tokens)
    if config is None:
        kernel = _tuned(_dtype_name(a))
    else:
        kernel = _fused_linear_kernel
        kwargs.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                      STATS_K=statistics_tile(config, _linear_dtype(a)), num_warps=config.num_warps,
                      num_stages=config.num_stages)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with device_guard(a):
        kernel[grid](*args, **kwargs)
    return out


def launch_arguments(a2, weight, bias, residual2, out2, norm_weight, norm_bias, eps: float, *, gelu: bool,
                     cls_period: int, tokens: int):
    """(positional, keyword) arguments of one launch over [R, K] / [R, N] row views, all but the tile;
    shared by the launcher and the ahead-of-time compiles (kernels/aot.py)."""
    rows, n = out2.shape
    k = a2.shape[1]
    res = residual2 if residual2 is not None else out2
    args = [a2, weight, bias if bias is not None else out2, res, out2,
            norm_weight if norm_weight is not None else out2, norm_bias if norm_bias is not None else out2,
            rows, n, k, a2.stride(0), weight.stride(0), res.stride(0), out2.stride(0), float(eps),
            max(tokens or cls_period, 1)]
    kwargs = dict(HAS_BIAS=bias is not None, BIAS_TABLE=bias is not None and bias.dim() == 2,
                  NORM=norm_weight is not None, GELU=gelu, HAS_RES=residual2 is not None, SKIP_CLS=cls_period > 0,
                  TOKENS=tokens > 0, DOT_FP32=a2.device.type == "cpu" and a2.dtype == torch.bfloat16,
                  PRECISION="ieee" if a2.dtype == torch.float32 else "tf32", M_BUCKET=m_bucket(rows))
    return args, kwargs


@torch.library.custom_op("stt_fast::fused_linear", mutates_args=())
def _fused_linear_op(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, eps: float, gelu: bool,
                     residual: torch.Tensor | None, cls_period: int, tokens: int,
                     out_dtype: torch.dtype | None) -> torch.Tensor:
    """torch.ops.stt_fast.fused_linear: one op for torch.compile, torch.export and fake-tensor tracing."""
    return _fused_linear(a, weight, bias, norm_weight, norm_bias, eps, gelu, residual, cls_period, tokens, out_dtype)


@_fused_linear_op.register_fake
def _(a, weight, bias, norm_weight, norm_bias, eps, gelu, residual, cls_period, tokens, out_dtype):
    rows = a.numel() // a.shape[-1]
    shape = (rows // (tokens - 1) * tokens, weight.shape[0]) if tokens else (*a.shape[:-1], weight.shape[0])
    return torch.empty(shape, dtype=out_dtype or a.dtype, device=a.device)
