"""add_layer_norm: the residual add and the LayerNorm that follows it, in one pass over the rows.

    y = x + delta     (rows r with r % cls_period == 0 keep x, when cls_period > 0)
    z = LayerNorm(y) * weight + bias,   statistics in float32

In a pre-norm block every sub-layer ends in ``x = x + f(...)`` and the next one starts with
``LayerNorm(x)``: unfused that is two launches and five passes over [rows, D] (read x, read delta,
write y; read y, write z), fused one launch and four (y is still written: it is the next residual).
cls_period serves STT's temporal branch, whose output must not reach the cls token: pass L and the
cls row of every clip keeps x. One program normalises one row of D <= 8192 elements.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .add_layer_norm_reference import add_layer_norm_reference
from .st_attention import HAS_TRITON, _log_cpu_fallback_once, device_guard, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_layer_norm_kernel(X, DELTA, W, B, Y, Z, stride_x, stride_d, stride_y, stride_z,
                               D, eps, cls_period,
                               HAS_DELTA: tl.constexpr, SKIP_CLS: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 above 4.19 M rows of D = 512
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        y = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            delta = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            if SKIP_CLS:
                delta = tl.where(row % cls_period != 0, delta, 0.0)
            y = y + delta
            tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        mean = tl.sum(y, axis=0) / D
        centered = tl.where(mask, y - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
        w = tl.load(W + cols, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Z + row * stride_z + cols, (centered * rstd * w + b).to(Z.dtype.element_ty), mask=mask)


MAX_DIM = 8192


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., D] -> [R, D] view; ValueError if that needs a copy (the last dim must be contiguous)."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{name} must be viewable as [rows, D] (rows evenly strided)") from None


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6, *, cls_period: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + LayerNorm. x, delta [..., D]; weight, bias [D] -> (y, z) in x's dtype.

    delta None: no add, y is x itself. Runs the Triton kernel on CUDA (and on the CPU through
    TRITON_INTERPRET=1); otherwise on the CPU, add_layer_norm_reference. Under torch.compile, torch.export
    and fake-tensor tracing it is one op, torch.ops.stt_fast.add_layer_norm.
    """
    dim = x.shape[-1]
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta must match x: {tuple(delta.shape)} {delta.dtype} vs {tuple(x.shape)} {x.dtype}")
    if weight.shape != (dim,) or bias.shape != (dim,):
        raise ValueError(f"weight and bias must be [{dim}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if dim > MAX_DIM:
        raise ValueError(f"add_layer_norm supports D <= {MAX_DIM}, got {dim}")
    if cls_period < 0:
        raise ValueError(f"cls_period must be >= 0, got {cls_period}")
    if torch.compiler.is_compiling() or is_fake(x):
        # torch.compile / torch.export and fake-tensor tracing (the launch plan, the hot-path checks) see one
        # opaque op, as a GPU runs one launch
        y, z = torch.ops.stt_fast.add_layer_norm(x, delta, weight, bias, float(eps), int(cls_period))
        return (x if delta is None else y), z
    return _add_layer_norm(x, delta, weight, bias, eps, cls_period)


def _add_layer_norm(x, delta, weight, bias, eps: float, cls_period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch (or, on the CPU without the interpreter, the reference), after the checks."""
    dim = x.shape[-1]
    if x.device.type == "cpu" and not interpreting():
        _log_cpu_fallback_once()
        return add_layer_norm_reference(x, delta, weight, bias, eps, cls_period=cls_period)
    if not HAS_TRITON:
        raise RuntimeError("add_layer_norm on a GPU needs the 'triton' package")
    x2 = _rows(x, "x")
    d2 = x2 if delta is None else _rows(delta, "delta")
    y = x if delta is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    z = torch.empty_like(x, memory_format=torch.contiguous_format)
    y2, z2 = y.view(-1, dim) if delta is not None else x2, z.view(-1, dim)
    args, options = launch_arguments(x2, d2, weight, bias, y2, z2, eps, cls_period, has_delta=delta is not None)
    with device_guard(x):
        _add_layer_norm_kernel[(x2.shape[0],)](*args, **options)
    return y, z


def launch_arguments(x2, d2, weight, bias, y2, z2, eps: float, cls_period: int, *, has_delta: bool):
    """(positional, keyword) arguments of one launch over [R, D] row views; shared by the launcher and the
    ahead-of-time compiles (kernels/aot.py). One program per row; 4 warps per 1024 columns, so that each
    thread holds 8 values of the row."""
    dim = x2.shape[-1]
    block, warps = launch_shape(dim)
    args = [x2, d2, weight, bias, y2, z2, x2.stride(0), d2.stride(0), y2.stride(0), z2.stride(0), dim, eps,
            max(cls_period, 1)]
    return args, dict(HAS_DELTA=has_delta, SKIP_CLS=cls_period > 0, BLOCK_D=block, num_warps=warps)


def launch_shape(dim: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of dim elements."""
    block = triton.next_power_of_2(dim)
    return block, min(max(block // 256, 1), 16)


@torch.library.custom_op("stt_fast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float, cls_period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.stt_fast.add_layer_norm: (y, z) as one op; without delta y is empty (the caller keeps x:
    an op's outputs may not alias its inputs)."""
    y, z = _add_layer_norm(x, delta, weight, bias, eps, cls_period)
    return (x.new_empty(0) if delta is None else y), z


@_add_layer_norm_op.register_fake
def _(x, delta, weight, bias, eps, cls_period):
    z = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return (x.new_empty(0) if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)), z
