"""max_pool2d: the backbone's 3 x 3 / stride 2 / pad 1 max pool, without the indices nobody reads.

    out[n, c, i, j] = max over (u, v) in [0, k)^2 of x[n, c, i * s - p + u, j * s - p + v]   (padding: -inf)

PyTorch's CUDA max pool always computes max_pool2d_with_indices and writes an int64 index per output beside
it: at the paper's shape, four times the bytes of the fp16 output (411 MB of 925 MB moved at batch 64). Here
one program takes BLOCK_P output positions x BLOCK_C channels, reads the k * k taps of each and writes only
the maxima. Any strides: in channels_last (the program's layout) the channel axis is contiguous and every
load is coalesced. NaN propagates, as in PyTorch.

The exact statement: torch.nn.functional.max_pool2d (the reference, and the CPU path without the
interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .st_attention import HAS_TRITON, _log_cpu_fallback_once, device_guard, interpreting

BLOCK_P = 32  # output positions per program
BLOCK_C = 64  # channels per program (the stem's 64: one program row covers them)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _max_pool2d_kernel(X, OUT, C, H, W, OH, OW, positions,
                           stride_xn, stride_xc, stride_xh, stride_xw,
                           stride_on, stride_oc, stride_oh, stride_ow,
                           KERNEL: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, WIDE: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # 64-bit positions: n * stride_xn passes 2**31 from 5,350 frames of 64 x 112 x 112
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < positions
        c_ok = c < C
        n = p // (OH * OW)
        i = (p // OW) % OH
        j = p % OW
        x_base = X + n[:, None] * stride_xn + c[None, :] * stride_xc
        # the max of values is one of them: exact in float32 for 16-bit inputs, float64 kept for float64
        if WIDE:
            best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float64)
        else:
            best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
        for u in tl.static_range(KERNEL):
            row = i * STRIDE - PAD + u
            row_ok = p_ok & (row >= 0) & (row < H)
            for v in tl.static_range(KERNEL):
                col = j * STRIDE - PAD + v
                ok = row_ok & (col >= 0) & (col < W)
                tap = tl.load(x_base + (row * stride_xh + col * stride_xw)[:, None], mask=ok[:, None] & c_ok[None, :],
                              other=float("-inf"))
                best = tl.maximum(best, tap.to(best.dtype), propagate_nan=tl.PropagateNan.ALL)
        out = OUT + (n * stride_on + i * stride_oh + j * stride_ow)[:, None] + c[None, :] * stride_oc
        tl.store(out, best.to(OUT.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def max_pool2d_reference(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """PyTorch's max pool (its indices dropped): the statement the kernel is tested against."""
    return F.max_pool2d(x, kernel, stride, padding)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def planned_grid(frames: int, channels: int, out_h: int, out_w: int) -> tuple[int, int, int]:
    """(programs, longest, total) as stt_fast.launch_plan models the launch: the k * k taps are independent
    reads, issued together (one round trip)."""
    programs = -(-frames * out_h * out_w // BLOCK_P) * -(-channels // BLOCK_C)
    return programs, 1, programs


def max_pool2d(x: torch.Tensor, kernel: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Max pool of x [N, C, H, W] (any strides) -> [N, C, H', W'] in x's dtype and memory format; no indices.
    Triton on CUDA and through the interpreter; F.max_pool2d on a CPU without it."""
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got {tuple(x.shape)}")
    if kernel < 1 or stride < 1 or not 0 <= padding <= kernel // 2:
        raise ValueError(f"kernel >= 1, stride >= 1 and 0 <= padding <= kernel // 2 needed, got {kernel}, {stride}, "
                         f"{padding}")
    if torch.compiler.is_compiling() or is_fake(x):
        return torch.ops.stt_fast.max_pool2d(x, kernel, stride, padding)
    return _max_pool2d(x, kernel, stride, padding)


def _max_pool2d(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    if x.device.type == "cpu" and not interpreting():
        _log_cpu_fallback_once()
        return max_pool2d_reference(x, kernel, stride, padding)
    if not HAS_TRITON:
        raise RuntimeError("max_pool2d on a GPU needs the 'triton' package")
    frames, channels, height, width = x.shape
    out_h, out_w = (output_size(s, kernel, stride, padding) for s in (height, width))
    out = _empty_output(x, out_h, out_w)
    positions = frames * out_h * out_w
    with device_guard(x):
        _max_pool2d_kernel[(triton.cdiv(positions, BLOCK_P), triton.cdiv(channels, BLOCK_C))](
            x, out, channels, height, width, out_h, out_w, positions, *x.stride(), *out.stride(),
            KERNEL=kernel, STRIDE=stride, PAD=padding, WIDE=x.dtype == torch.float64, BLOCK_P=BLOCK_P,
            BLOCK_C=BLOCK_C)
    return out


def _empty_output(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(x.shape[0], x.shape[1], out_h, out_w, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.custom_op("stt_fast::max_pool2d", mutates_args=())
def _max_pool2d_op(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """torch.ops.stt_fast.max_pool2d: one op for torch.compile, torch.export and fake-tensor tracing."""
    return _max_pool2d(x, kernel, stride, padding)


@_max_pool2d_op.register_fake
def _(x, kernel, stride, padding):
    height, width = x.shape[2:]
    return _empty_output(x, output_size(height, kernel, stride, padding), output_size(width, kernel, stride, padding))
