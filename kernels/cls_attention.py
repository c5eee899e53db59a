"""cls_attention: the last block's attention for its one query that reaches the head, the cls token, from
the un-normalised tokens, flash-decoding style: the token set is split across many programs, every program
serving all heads, and a combine step merges the splits.

Only the cls row leaves STT's last block, so its attention is needed for one query. Per clip and head, with
h = LayerNorm(x) computed on the fly:

    q   = W_q h_0 + b_q                       (the head's slice of the qkv projection)
    u   = scale * W_k^T q                     [D]: the key projection absorbed into the query
    s_j = u . h_j                             (= scale * q . k_j less q . b_k, the same for every j:
                                               it cancels in the softmax)
    out = W_v (sum_j p_j h_j) + b_v           (the p_j of a softmax sum to 1)

so the keys and values of the L tokens are never formed (2 D^2 multiply-adds per token saved, against
2 H D per token). Joint mode takes one softmax over all L tokens; spatial mode one per frame over {cls} + the
frame's N tokens, and the mean of the T results (then W_v, which is linear).

Three launches (a GPU has no barrier between programs):

    cls_query     grid (B, H)         h_0, u and the cls key's score s_0 per clip and head
    cls_partials  grid (B, G * S)     the G softmax groups (T frames, or 1) each cut into S splits of whole
                                      token tiles; a program normalises its tokens once for all H heads and
                                      keeps an online softmax per head (running max m, sum l, and the
                                      weighted sum acc [H, D]), written out as its partial
    cls_combine   grid (B, H)         per group, the cls key and the group's S partials merged (rescaled to
                                      one max), normalised, averaged over groups; then W_v and b_v. The
                                      partials are read 16 at a time (across groups in spatial mode, across
                                      splits in joint mode): a chain of few dependent reads

S is chosen at launch so that B * G * S programs cover the GPU about twice (split_plan): at batch 1 on an
H100 the paper model's spatial block runs 112 partials programs (paper-joint's joint block 98), where one
program per (clip, head) ran 8, each re-reading and re-normalising every token in 64 passes. Everything is
float32 inside (nothing here feeds a tensor-core product: products and sums on the FMA units); the output
is rounded once.

The exact statement, computed the long way: cls_attention_reference.py. The torch op sets run the same
absorption in PyTorch ops (stt_fast/compiler/cls_attention.py).
"""

from __future__ import annotations

import functools
import math

import torch
from torch._subclasses.fake_tensor import is_fake

from .cls_attention_reference import cls_attention_reference
from .st_attention import HAS_TRITON, LOG2_E, _log_cpu_fallback_once, device_guard, interpreting

CLS_MODES = ("joint", "spatial")
# tokens per tile: [8, D] float32 is 16 values a thread at 8 warps; 16 tokens spilled in float32 under
# Triton 3.6 (its compiles held 128 registers a thread at 8 warps), the ahead-of-time matrix
BLOCK_L = 8
# Programs the partials launch aims for per streaming multiprocessor: two, so that a program waiting on
# memory has a neighbour to hide it. The interpreter runs programs one after another: there, one program per
# group unless a test asks for splits.
PROGRAMS_PER_SM = 2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _normalised(x, col_ok, g, b, D, eps):
        """LayerNorm of the rows of x [R, BLOCK_D], in float32. Kept in float32: rounding the normalised
        tokens to fp16/bf16 (as a separate LayerNorm would store them) was a second rounding that put bf16
        errors at 0.8-1.1x the kernel bound."""
        mean = tl.sum(x, 1) / D
        centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
        return centred * rstd[:, None] * g[None, :] + b[None, :]

    @triton.jit
    def _cls_query_kernel(X, NORM_W, NORM_B, QKV_W, QKV_B, U, S0, H0, stride_xb, D, eps, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
        """Per (clip, head): u = qk_scale * W_k^T (W_q h_0 + b_q) into U [B, H, D], s_0 = u . h_0 into S0 [B, H];
        head 0 also writes h_0 into H0 [B, D] (all float32)."""
        clip = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        heads = tl.num_programs(1)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(NORM_W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(NORM_B + cols, mask=col_ok, other=0.0).to(tl.float32)
        one = tl.arange(0, 1)
        h0 = _normalised(tl.load(X + clip * stride_xb + one[:, None] * 0 + cols[None, :], mask=col_ok[None, :],
                                 other=0.0).to(tl.float32), col_ok, g, b, D, eps)  # [1, BLOCK_D]
        u = tl.zeros([1, BLOCK_D], tl.float32)
        for c in range(0, HEAD_DIM, CHUNK):  # CHUNK head dims at a time
            w_rows = head * HEAD_DIM + c + tl.arange(0, CHUNK)
            w_q = tl.load(QKV_W + w_rows[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
            q = tl.sum(w_q.to(tl.float32) * h0, 1) + tl.load(QKV_B + w_rows).to(tl.float32)  # [CHUNK]
            w_k = tl.load(QKV_W + (D + w_rows)[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
            u += tl.sum(w_k.to(tl.float32) * q[:, None], 0)[None, :]
        u = u * qk_scale
        tl.store(U + (clip * heads + head) * D + one[:, None] * 0 + cols[None, :], u, mask=col_ok[None, :])
        tl.store(S0 + clip * heads + head, tl.sum(tl.sum(u * h0, 1), 0))
        if head == 0:
            tl.store(H0 + clip * D + one[:, None] * 0 + cols[None, :], h0, mask=col_ok[None, :])

    @triton.jit
    def _cls_partials_kernel(X, NORM_W, NORM_B, U, M, LSUM, ACC, stride_xb, stride_xl, D, eps,
                             count, splits, chunk,
                             NUM_HEADS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_H: tl.constexpr):
        """Program (clip, group * splits + split): tokens [split * chunk, (split + 1) * chunk) of the group's
        count (rows 1 + group * count + j), all heads: the running max M and sum LSUM [B, P, H] of the head's
        exp2 scores and ACC [B, P, H, D], the exp2-weighted sum of the normalised tokens (P = groups * splits).

        A loop over the heads (NUM_HEADS), each head's state a row of [BLOCK_H] / [BLOCK_H, BLOCK_D] tensors
        updated where its row is: products and sums in registers, no tile product. The ahead-of-time matrix
        chose this form: a tl.dot form ([16, D] operands, IEEE float32) needed 128 KiB of shared memory in
        float32, more than sm_86 and sm_89 give a block; the heads unrolled took 200-255 registers a thread
        (80-117 as a loop)."""
        clip = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        parts = tl.num_programs(1)
        grp = part // splits
        begin = (part % splits) * chunk
        end = tl.minimum(begin + chunk, count)
        x_base = X + clip * stride_xb
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        heads = tl.arange(0, BLOCK_H)
        head_ok = heads < NUM_HEADS
        g = tl.load(NORM_W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(NORM_B + cols, mask=col_ok, other=0.0).to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        offs_l = tl.arange(0, BLOCK_L)
        for start in range(begin, end, BLOCK_L):
            j = start + offs_l
            ok = j < end
            rows = 1 + grp * count + j
            x = tl.load(x_base + rows[:, None] * stride_xl + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            h = _normalised(x, col_ok, g, b, D, eps)  # once for every head
            for head in range(NUM_HEADS):
                mine = heads == head
                # this head's absorbed query, [BLOCK_D]: re-read per tile from L1, not kept in registers
                u = tl.load(U + (clip * NUM_HEADS + head) * D + cols, mask=col_ok, other=0.0)
                s = tl.where(ok, tl.sum(h * u[None, :], 1), float("-inf"))  # [BLOCK_L]
                m_old = tl.max(tl.where(mine, m_i, float("-inf")), 0)
                m_new = tl.maximum(m_old, tl.max(s, 0))
                alpha = tl.math.exp2(m_old - m_new)
                p = tl.math.exp2(s - m_new)
                l_i = tl.where(mine, tl.sum(tl.where(mine, l_i, 0.0), 0) * alpha + tl.sum(p, 0), l_i)
                m_i = tl.where(mine, m_new, m_i)
                acc = tl.where(mine[:, None], acc * alpha + tl.sum(p[:, None] * h, 0)[None, :], acc)
        row = (clip * parts + part) * NUM_HEADS + heads
        tl.store(M + row, m_i, mask=head_ok)
        tl.store(LSUM + row, l_i, mask=head_ok)
        tl.store(ACC + row[:, None] * D + cols[None, :], acc, mask=head_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _cls_combine_kernel(H0, S0, M, LSUM, ACC, QKV_W, QKV_B, OUT, stride_ob, D, groups, splits,
                            ROWS_ARE_GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
        """Per (clip, head): each group's softmax from the cls key (s_0, h_0) and its splits' partials, the
        mean over groups, then out = W_v mixed + b_v into OUT [B, D].

        The partials form a [groups, splits] grid; BLOCK_R of them are read per step, so that the chain of
        dependent reads is short: ROWS_ARE_GROUPS (spatial: many groups, few splits) reads a split of
        BLOCK_R groups per step and merges row by row (ceil(groups / BLOCK_R) * splits steps); otherwise
        (joint: one group, many splits) BLOCK_R splits of one group per step, merged across rows
        (groups * ceil(splits / BLOCK_R) steps)."""
        clip = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        heads = tl.num_programs(1)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        r = tl.arange(0, BLOCK_R)
        h0 = tl.load(H0 + clip * D + cols, mask=col_ok, other=0.0)
        s0 = tl.load(S0 + clip * heads + head)
        first = clip * groups * splits  # this clip's first part
        mixed = tl.zeros([BLOCK_D], tl.float32)
        if ROWS_ARE_GROUPS:
            for g0 in range(0, groups, BLOCK_R):
                grp = g0 + r
                grp_ok = grp < groups
                m_i = tl.zeros([BLOCK_R], tl.float32) + s0  # every group starts from the cls key
                l_i = tl.full([BLOCK_R], 1.0, tl.float32)
                acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + h0[None, :]
                for split in range(0, splits):
                    row = (first + grp * splits + split) * heads + head
                    m_s = tl.load(M + row, mask=grp_ok, other=0.0)
                    m_new = tl.maximum(m_i, m_s)
                    alpha = tl.math.exp2(m_i - m_new)
                    beta = tl.math.exp2(m_s - m_new)
                    l_i = l_i * alpha + tl.load(LSUM + row, mask=grp_ok, other=0.0) * beta
                    part = tl.load(ACC + row[:, None] * D + cols[None, :], mask=grp_ok[:, None] & col_ok[None, :],
                                   other=0.0)
                    acc = acc * alpha[:, None] + part * beta[:, None]
                    m_i = m_new
                mixed += tl.sum(tl.where(grp_ok[:, None], acc / l_i[:, None], 0.0), 0)
        else:
            for grp in range(0, groups):
                m_g = s0
                l_g = s0 * 0.0 + 1.0
                acc_g = h0
                for s_first in range(0, splits, BLOCK_R):
                    split = s_first + r
                    split_ok = split < splits
                    row = (first + grp * splits + split) * heads + head
                    m_s = tl.load(M + row, mask=split_ok, other=float("-inf"))
                    m_new = tl.maximum(m_g, tl.max(m_s, 0))
                    alpha = tl.math.exp2(m_g - m_new)
                    beta = tl.math.exp2(m_s - m_new)  # 0 on rows past the last split
                    l_g = l_g * alpha + tl.sum(tl.load(LSUM + row, mask=split_ok, other=0.0) * beta, 0)
                    part = tl.load(ACC + row[:, None] * D + cols[None, :], mask=split_ok[:, None] & col_ok[None, :],
                                   other=0.0)
                    acc_g = acc_g * alpha + tl.sum(part * beta[:, None], 0)
                    m_g = m_new
                mixed += acc_g / l_g
        mixed = (mixed / groups)[None, :]
        for c in range(0, HEAD_DIM, CHUNK):
            w_rows = head * HEAD_DIM + c + tl.arange(0, CHUNK)
            w_v = tl.load(QKV_W + (2 * D + w_rows)[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
            out = tl.sum(w_v.to(tl.float32) * mixed, 1) + tl.load(QKV_B + 2 * D + w_rows).to(tl.float32)
            tl.store(OUT + clip * stride_ob + w_rows, out.to(OUT.dtype.element_ty))


COMBINE_ROWS = 16  # partials the combine step reads per step: [16, BLOCK_D] float32, 32 values a thread at 8 warps


def combine_steps(groups: int, splits: int) -> tuple[bool, int]:
    """(rows are groups, dependent read steps) of the combine: the order with the shorter chain."""
    by_groups = -(-groups // COMBINE_ROWS) * splits
    by_splits = groups * -(-splits // COMBINE_ROWS)
    return by_groups <= by_splits, min(by_groups, by_splits)


def launch_shape(dim: int, head_dim: int, num_heads: int) -> dict:
    """Tile constants and warps for rows of dim: BLOCK_D covers a row, a weight chunk [CHUNK, BLOCK_D] holds
    8,192 values (64 per thread at 4 warps, 32 at 8), BLOCK_H is the heads padded to a power of two."""
    block_d = 1 << max(0, (dim - 1).bit_length())
    return dict(BLOCK_D=block_d, BLOCK_H=1 << max(0, (num_heads - 1).bit_length()),
                CHUNK=max(1, min(head_dim, 8192 // block_d)), num_warps=min(8, max(4, block_d // 64)))


def split_plan(batch: int, groups: int, count: int, programs: int) -> tuple[int, int]:
    """(splits, chunk): each group of `count` tokens cut into `splits` runs of `chunk` tokens (whole BLOCK_L
    tiles; the last run may be shorter, none is empty): the longest runs that still give batch * groups * splits
    >= programs, or one tile each where the tiles run out."""
    if min(batch, groups, count, programs) < 1:
        raise ValueError(f"batch, groups, count and programs must be >= 1, got {(batch, groups, count, programs)}")
    tiles = -(-count // BLOCK_L)
    wanted = min(tiles, max(1, -(-programs // (batch * groups))))
    chunk = max(1, tiles // wanted) * BLOCK_L  # rounding down: at least the programs wanted
    return -(-count // chunk), chunk


@functools.cache
def _programs_for(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def groups_and_count(length: int, num_frames: int, mode: str) -> tuple[int, int]:
    """The softmax groups besides the cls key: spatial, one per frame of N = (L - 1) / T tokens; joint, one of
    L - 1."""
    return (num_frames, (length - 1) // num_frames) if mode == "spatial" else (1, length - 1)


def workspace(batch: int, dim: int, num_heads: int, parts: int, device) -> dict[str, torch.Tensor]:
    """The float32 buffers the three launches pass on: u [B, H, D], s_0 [B, H], h_0 [B, D], and per
    part M, LSUM [B, P, H] and ACC [B, P, H, D]; views of one allocation (one allocator call a forward, not
    six), each starting on a 64-byte boundary so that the kernels keep their aligned loads."""
    shapes = dict(u=(batch, num_heads, dim), s0=(batch, num_heads), h0=(batch, dim), m=(batch, parts, num_heads),
                  lsum=(batch, parts, num_heads), acc=(batch, parts, num_heads, dim))
    sizes = {name: -(-math.prod(shape) // 16) * 16 for name, shape in shapes.items()}
    buffer = torch.empty(sum(sizes.values()), dtype=torch.float32, device=device)
    views, start = {}, 0
    for name, shape in shapes.items():
        views[name] = buffer.narrow(0, start, math.prod(shape)).view(shape)
        start += sizes[name]
    return views


def launch_arguments(x, norm_weight, norm_bias, eps: float, qkv_weight, qkv_bias, out, *, num_heads: int,
                     num_frames: int, mode: str, splits: int | None = None, programs: int = 1):
    """[(kernel, grid, positional, keyword)] of the three launches over x [B, L, D] into out [B, D], with
    their workspace; shared by the launcher and the ahead-of-time compiles (kernels/aot.py). splits: per
    group, else split_plan's choice for `programs` programs."""
    batch, length, dim = x.shape
    head_dim = dim // num_heads
    groups, count = groups_and_count(length, num_frames, mode)
    if splits is None:
        splits, chunk = split_plan(batch, groups, count, programs)
    else:
        chunk = -(-count // splits)
        splits = -(-count // chunk)
    shape = launch_shape(dim, head_dim, num_heads)
    warps = shape["num_warps"]
    w = workspace(batch, dim, num_heads, groups * splits, x.device)
    return [
        (_cls_query_kernel, (batch, num_heads),
         [x, norm_weight, norm_bias, qkv_weight, qkv_bias, w["u"], w["s0"], w["h0"], x.stride(0), dim, float(eps),
          head_dim**-0.5 * LOG2_E],
         dict(HEAD_DIM=head_dim, BLOCK_D=shape["BLOCK_D"], CHUNK=shape["CHUNK"], num_warps=warps)),
        (_cls_partials_kernel, (batch, groups * splits),
         [x, norm_weight, norm_bias, w["u"], w["m"], w["lsum"], w["acc"], x.stride(0), x.stride(1), dim, float(eps),
          count, splits, chunk],
         dict(NUM_HEADS=num_heads, BLOCK_L=BLOCK_L, BLOCK_D=shape["BLOCK_D"], BLOCK_H=shape["BLOCK_H"],
              num_warps=warps)),
        (_cls_combine_kernel, (batch, num_heads),
         [w["h0"], w["s0"], w["m"], w["lsum"], w["acc"], qkv_weight, qkv_bias, out, out.stride(0), dim, groups,
          splits],
         dict(ROWS_ARE_GROUPS=combine_steps(groups, splits)[0], BLOCK_R=COMBINE_ROWS, HEAD_DIM=head_dim,
              BLOCK_D=shape["BLOCK_D"], CHUNK=shape["CHUNK"], num_warps=warps)),
    ]


def planned_launches(batch: int, length: int, dim: int, num_heads: int, num_frames: int, mode: str,
                     element_size: int, programs: int) -> list[dict]:
    """The three launches as stt_fast.launch_plan models them: name, programs (the grid), serial (the chain of
    dependent memory reads in one program, the same in each: the loops here are not software-pipelined),
    FLOPs and bytes read and written (each operand once)."""
    head_dim = dim // num_heads
    groups, count = groups_and_count(length, num_frames, mode)
    splits, chunk = split_plan(batch, groups, count, programs)
    parts = batch * groups * splits
    chunks = -(-head_dim // launch_shape(dim, head_dim, num_heads)["CHUNK"])
    partial_bytes = parts * num_heads * (dim + 2) * 4
    return [
        dict(name="cls_query", programs=batch * num_heads, serial=1 + chunks,
             flops=2 * batch * num_heads * 2 * head_dim * dim,
             bytes_read=(batch * dim + 2 * dim * dim + 2 * dim) * element_size,
             bytes_written=(batch * num_heads * (dim + 1) + batch * dim) * 4),
        dict(name="cls_partials", programs=parts, serial=1 + -(-chunk // BLOCK_L),
             flops=2 * 2 * batch * (length - 1) * dim * num_heads,
             bytes_read=batch * (length - 1) * dim * element_size + parts * num_heads * dim * 4,
             bytes_written=partial_bytes),
        dict(name="cls_combine", programs=batch * num_heads, serial=combine_steps(groups, splits)[1] + chunks,
             flops=2 * batch * num_heads * head_dim * dim,
             bytes_read=partial_bytes + batch * (num_heads + dim) * 4 + (dim * dim + dim) * element_size,
             bytes_written=batch * dim * element_size),
    ]


def _check(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads: int, num_frames: int, mode: str) -> None:
    if mode not in CLS_MODES:
        raise ValueError(f"cls_attention modes are {CLS_MODES}, got {mode!r}")
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
                  mode: str, splits: int | None = None) -> torch.Tensor:
    """The cls row of the attention of LayerNorm(x): x [B, L, D] (L = 1 + T * N) -> [B, D] (before the
    output projection). mode "joint" or "spatial"; qkv_weight [3D, D], qkv_bias [3D] (nn.Linear's). splits:
    programs per softmax group (default: enough to cover the GPU, split_plan). Triton on CUDA and through
    the interpreter; cls_attention_reference on a CPU without it."""
    _check(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, num_frames, mode)
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if torch.compiler.is_compiling() or is_fake(x):
        return torch.ops.stt_fast.cls_attention(x, norm_weight, norm_bias, float(eps), qkv_weight, qkv_bias,
                                                num_heads, num_frames, mode)
    return _cls_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads, num_frames, mode, splits)


def _cls_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads, num_frames, mode, splits=None):
    if x.device.type == "cpu" and not interpreting():
        _log_cpu_fallback_once()
        return cls_attention_reference(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, num_heads=num_heads,
                                       num_frames=num_frames, mode=mode)
    if not HAS_TRITON:
        raise RuntimeError("cls_attention on a GPU needs the 'triton' package")
    out = torch.empty(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
    launches = launch_arguments(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, out, num_heads=num_heads,
                                num_frames=num_frames, mode=mode, splits=splits, programs=_programs_for(x.device))
    with device_guard(x):
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)
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
