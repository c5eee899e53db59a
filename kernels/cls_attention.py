"""cls_attention: the last block's attention for its one query that reaches the head, the cls token, in
one launch from the un-normalised tokens.

Only the cls row leaves STT's last block, so its attention is needed for one query. Per (clip, head), with
h = LayerNorm(x) computed on the fly for each token tile:

    q   = W_q h_0 + b_q                       (the head's slice of the qkv projection)
    u   = scale * W_k^T q                     [D]: the key projection absorbed into the query
    s_j = u . h_j                             (= scale * q . k_j less q . b_k, the same for every j:
                                               it cancels in the softmax)
    out = W_v (sum_j p_j h_j) + b_v           (the p_j of a softmax sum to 1)

so the keys and values of the L tokens are never formed (2 D^2 multiply-adds per token saved, against
2 D per token and head). The softmax is online (running max, running sum, float32, exp2), started from
the cls key: joint mode takes one softmax over all L tokens; spatial mode one per frame over {cls} + the
frame's N tokens, and the mean of the T results (then W_v, which is linear). Unfused, the same function
is 16 launches (the query projection, absorbed key, scores, casts, per-frame softmax, weighted sums,
value product, bias); here one, reading each clip's tokens once per head.

The exact statement, computed the long way: cls_attention_reference.py. The torch op sets run the same
absorption in PyTorch ops (stt_fast/compiler/cls_attention.py).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .cls_attention_reference import cls_attention_reference
from .st_attention import HAS_TRITON, LOG2_E, _log_cpu_fallback_once, device_guard, interpreting

CLS_MODES = {"joint": 0, "spatial": 1}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _normalised(x, col_ok, g, b, D, eps):
        """LayerNorm of the rows of x [R, BLOCK_D], in float32. Kept in float32: nothing here feeds a
        tensor-core product, and rounding the normalised tokens to fp16/bf16 (as a separate LayerNorm
        would store them) was a second rounding that put bf16 errors at 0.8-1.1x the kernel bound."""
        mean = tl.sum(x, 1) / D
        centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
        return centred * rstd[:, None] * g[None, :] + b[None, :]

    @triton.jit
    def _cls_attention_kernel(X, NORM_W, NORM_B, QKV_W, QKV_B, OUT, stride_xb, stride_xl, stride_ob,
                              L, T, N, D, eps, qk_scale,
                              MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
                              BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
        clip = tl.program_id(0).to(tl.int64)  # clip * stride_xb passes 2**31 from batch 5,344 at 785 x 512
        head = tl.program_id(1)
        x_base = X + clip * stride_xb
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(NORM_W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(NORM_B + cols, mask=col_ok, other=0.0).to(tl.float32)
        one = tl.arange(0, 1)
        h0 = _normalised(tl.load(x_base + one[:, None] * 0 + cols[None, :], mask=col_ok[None, :],
                                 other=0.0).to(tl.float32), col_ok, g, b, D, eps)  # [1, BLOCK_D]
        # u = scale * log2(e) * W_k^T (W_q h_0 + b_q), CHUNK head dims at a time
        u = tl.zeros([1, BLOCK_D], tl.float32)
        for c in range(0, HEAD_DIM, CHUNK):
            w_rows = head * HEAD_DIM + c + tl.arange(0, CHUNK)
            w_q = tl.load(QKV_W + w_rows[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
            q = tl.sum(w_q.to(tl.float32) * h0, 1) + tl.load(QKV_B + w_rows).to(tl.float32)  # [CHUNK]
            w_k = tl.load(QKV_W + (D + w_rows)[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
            u += tl.sum(w_k.to(tl.float32) * q[:, None], 0)[None, :]
        u = u * qk_scale
        s0 = tl.sum(tl.sum(u * h0, 1), 0)
        if MODE == 1:  # spatial: per frame, {cls} + the frame's N tokens
            groups = T
            count = N
        else:  # joint: one group, the cls key then the L - 1 others
            groups = 1
            count = L - 1
        offs_l = tl.arange(0, BLOCK_L)
        mixed = tl.zeros([1, BLOCK_D], tl.float32)
        for grp in range(0, groups):
            m_i = s0
            l_i = s0 * 0.0 + 1.0
            acc = h0
            for start in range(0, count, BLOCK_L):
                j = start + offs_l
                ok = j < count
                rows = 1 + grp * count + j
                x = tl.load(x_base + rows[:, None] * stride_xl + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32)
                h = _normalised(x, col_ok, g, b, D, eps)
                s = tl.where(ok, tl.sum(h * u, 1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new)
                l_i = l_i * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * h, 0)[None, :]
                m_i = m_new
            mixed += acc / l_i
        mixed = mixed / groups
        for c in range(0, HEAD_DIM, CHUNK):
            w_rows = head * HEAD_DIM + c + tl.arange(0, CHUNK)
            w_v = tl.load(QKV_W + (2 * D + w_rows)[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
            out = tl.sum(w_v.to(tl.float32) * mixed, 1) + tl.load(QKV_B + 2 * D + w_rows).to(tl.float32)
            tl.store(OUT + clip * stride_ob + w_rows, out.to(OUT.dtype.element_ty))


def launch_shape(dim: int, head_dim: int) -> dict:
    """The tile constants and warps for rows of dim: each [rows, BLOCK_D] tile holds 8,192 values (64 per
    thread at 4 warps, 32 at 8)."""
    block_d = 1 << max(0, (dim - 1).bit_length())
    return dict(BLOCK_D=block_d, BLOCK_L=max(2, min(32, 8192 // block_d)), CHUNK=max(1, min(head_dim, 8192 // block_d)),
                num_warps=min(8, max(1, block_d // 64)))


def launch_arguments(x, norm_weight, norm_bias, eps: float, qkv_weight, qkv_bias, out, *, num_heads: int,
                     num_frames: int, mode: str):
    """(positional, keyword) arguments of one launch over x [B, L, D] into out [B, D]; shared by the
    launcher and the ahead-of-time compiles (kernels/aot.py)."""
    _, length, dim = x.shape
    head_dim = dim // num_heads
    args = [x, norm_weight, norm_bias, qkv_weight, qkv_bias, out, x.stride(0), x.stride(1), out.stride(0),
            length, num_frames, (length - 1) // num_frames, dim, float(eps), head_dim**-0.5 * LOG2_E]
    return args, dict(MODE=CLS_MODES[mode], HEAD_DIM=head_dim, **launch_shape(dim, head_dim))


def _check(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads: int, num_frames: int, mode: str) -> None:
    if mode not in CLS_MODES:
        raise ValueError(f"cls_attention modes are {tuple(CLS_MODES)}, got {mode!r}")
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"x must be [B, L, D] with a contiguous last dim, got {tuple(x.shape)}")
    _, length, dim = x.shape
    if num_heads < 1 or dim % num_heads or (dim // num_heads) & (dim // num_heads - 1):
        raise ValueError(f"D = {dim} must split into {num_heads} heads of a power-of-two size")
    if num_frames < 1 or (length - 1) % num_frames or length < 2:
        raise ValueError(f"L = {length} must be 1 + num_frames * N with num_frames = {num_frames}")
    if tuple(qkv_weight.shape) != (3 * dim, dim) or not qkv_weight.is_contiguous() or tuple(qkv_bias.shape) != (
            3 * dim,):
        raise ValueError(f"qkv_weight must be a contiguous [{3 * dim}, {dim}] and qkv_bias [{3 * dim}]")
    if tuple(norm_weight.shape) != (dim,) or tuple(norm_bias.shape) != (dim,):
        raise ValueError(f"the norm's weight and bias must be [{dim}]")
    if any(t.dtype != x.dtype for t in (norm_weight, norm_bias, qkv_weight, qkv_bias)):
        raise ValueError("every tensor must have x's dtype")


def cls_attention(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                  qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, *, num_heads: int, num_frames: int,
                  mode: str) -> torch.Tensor:
    """The cls row of the attention of LayerNorm(x): x [B, L, D] (L = 1 + T * N) -> [B, D] (before the
    output projection). mode "joint" or "spatial"; qkv_weight [3D, D], qkv_bias [3D] (nn.Linear's).
    Triton on CUDA and through the interpreter; cls_attention_reference on a CPU without it."""
    _check(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, num_frames, mode)
    if torch.compiler.is_compiling() or is_fake(x):
        return torch.ops.stt_fast.cls_attention(x, norm_weight, norm_bias, float(eps), qkv_weight, qkv_bias,
                                                num_heads, num_frames, mode)
    return _cls_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads, num_frames, mode)


def _cls_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads, num_frames, mode):
    if x.device.type == "cpu" and not interpreting():
        _log_cpu_fallback_once()
        return cls_attention_reference(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads=num_heads,
                                       num_frames=num_frames, mode=mode)
    if not HAS_TRITON:
        raise RuntimeError("cls_attention on a GPU needs the 'triton' package")
    out = torch.empty(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
    args, kwargs = launch_arguments(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, out, num_heads=num_heads,
                                    num_frames=num_frames, mode=mode)
    with device_guard(x):
        _cls_attention_kernel[(x.shape[0], num_heads)](*args, **kwargs)
    return out


@torch.library.custom_op("stt_fast::cls_attention", mutates_args=())
def _cls_attention_op(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                      qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, num_heads: int, num_frames: int,
                      mode: str) -> torch.Tensor:
    """torch.ops.stt_fast.cls_attention: one op for torch.compile, torch.export and fake-tensor tracing."""
    return _cls_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads, num_frames, mode)


@_cls_attention_op.register_fake
def _(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads, num_frames, mode):
    return torch.empty(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
