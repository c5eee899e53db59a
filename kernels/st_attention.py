"""st_attention: STT's three attention groupings fused with their softmax in one Triton kernel.

For each group of tokens (stt_fast.layout): O = softmax(scale * Q K^T) V, computed FlashAttention-style:
the score matrix stays in registers, the softmax is computed online in float32 (running max m, running
sum l, exp2 with log2(e) folded into the scale), and only O is written. q, k and v are read where they
lie, through their strides, typically as views of the packed [B, L, 3, H, Dh] qkv projection: no
permute, no contiguous copy, no repeated cls token. The output is a new contiguous [B, L, H, Dh] tensor
(or ``out``), exactly what the output projection reads.

How each mode maps onto programs (grid = (programs per (batch, head), B * H)), and why. The facts
quoted are ahead-of-time compiles at the paper's shape (H = 8, T = 16, N = 49, Dh = 64, packed qkv),
fp16, from `stt-fast kernels aot` (benchmarks/results/kernels-aot/); no GPU has timed any of this yet.

- joint: one group of L tokens per (b, h) (L = 785 at the paper's shape). Program i takes query rows
  [i * BLOCK_M, (i + 1) * BLOCK_M) and streams all L keys in BLOCK_N steps: the FlashAttention-2
  regime, where the long key loop is what the pipeline overlaps. 128 x 64 tiles, 8 warps, 3 stages:
  120 registers and wgmma on sm_90, 144-146 registers and mma.sync on sm_80-89, 48-64 KiB of shared
  memory, no spills anywhere; 7 programs per head.
- spatial: T groups of 1 + N keys per (b, h) (cls + one frame; 50 keys). Program t * tiles + i
  takes frame t's patch rows [i * BLOCK_M, ...) against the cls key and the frame's N keys; the row
  of key j is 0 for j = 0 and 1 + t * N + (j - 1) otherwise, so the cls token is read in place for
  every frame, never copied. The cls row is the mean over frames of the cls query attending each
  frame: a frame's first tile also attends the cls query to its keys (a 16-row tile of the repeated
  cls query, CLS_BLOCK_M; the keys are already in cache) and writes that share in float32, and a
  second launch of B * H programs averages the T shares (_spatial_cls_mean_kernel). The first plan
  gave the cls row a program of its own that visited the 16 frames one after another: a chain of 16
  dependent reads, 2-3x any other program's time (issue 31). One 64 x 64 tile covers a frame's 49
  queries and 50 keys, so the online softmax runs once: 4 warps, 1 stage (nothing to pipeline).
- temporal: N groups of T keys per (b, h) (one grid position across frames; 16 keys). A tile of
  BLOCK_M >= T_PAD rows (T rounded up to a power of two) packs BLOCK_M // T_PAD grid positions: row r is
  frame r % T_PAD of position pid * PACK + r // T_PAD, a gather with stride N rows, and the score tile
  is masked block-diagonally, so one softmax pass serves PACK groups. Longer groups (T > BLOCK_M) take
  position-major tiles that stream their keys like the other modes. Program 0 also writes the zero cls
  row. The first plan gave each position its own 16-row tile: 49 programs per head of one warp, 16 x 16
  mma.sync tiles everywhere (no wgmma on sm_90, which needs 64 rows and 4 warps), 64-78 registers. The
  packed plan (64 rows = 4 positions, 4 warps) gives 13 programs per head and wgmma on sm_90 at 78
  registers (64-71 and mma.sync on sm_80-89), 24 KiB of shared memory, for 4x the attention FLOPs
  (16 x 64 instead of 16 x 16 scores per query: a few MFLOP per clip against a memory-bound gather).
  Both plans stay candidates; the autotuner chooses on the GPU.

Precision: float32 accumulation and softmax for every input dtype. float32 inputs use IEEE products
(input_precision="ieee"), not TF32, so float32 results match the float64 reference to ~1e-7.
Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests) has no bfloat16 arithmetic (numpy
has no bfloat16), so there the bfloat16 operands, already rounded to bfloat16, are widened to float32
before each product: the same products the tensor cores form, accumulated in float32.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
from torch._subclasses.fake_tensor import is_fake

from .contract import check_attention_inputs
from .st_attention_configs import CLS_BLOCK_M, LaunchConfig, candidate_table, candidates
from .st_attention_reference import st_attention_reference

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux x86-64 only
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MODE_IDS = {"joint": 0, "spatial": 1, "temporal": 2}
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension, which holds B * H
# What the autotuner keys its choice on: the group shape and the batch size's bucket (batch_bucket).
AUTOTUNE_KEY = ("L", "T", "N", "MODE", "HEAD_DIM", "BATCH_BUCKET")
LOG2_E = 1.4426950408889634

log = logging.getLogger(__name__)
_cpu_fallback_logged = False


def _log_cpu_fallback_once() -> None:
    global _cpu_fallback_logged
    if not _cpu_fallback_logged:
        _cpu_fallback_logged = True
        log.warning("stt_fast.kernels: CPU tensors without TRITON_INTERPRET=1 run the plain-PyTorch references, "
                 "not the Triton kernels")


def interpreting() -> bool:
    """True when this module's kernels were made for Triton's CPU interpreter: TRITON_INTERPRET=1 was
    set before triton was imported (setting it later changes nothing, hence the look at the kernel)."""
    return HAS_TRITON and type(_st_attention_kernel).__name__ == "InterpretedFunction"


if HAS_TRITON:

    @triton.jit
    def _key_rows(j, first, step, HAS_CLS: tl.constexpr):
        # Row of the j-th key of a group. With HAS_CLS (spatial), key 0 is the cls token (row 0).
        if HAS_CLS:
            return tl.where(j == 0, 0, first + (j - 1) * step)
        else:
            return first + j * step

    @triton.jit
    def _attend_group(q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                      key_first, key_step, key_count, qk_scale,
                      HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """softmax(q K^T * scale) V over one group's keys, online: q [BLOCK_M, HEAD_DIM] -> fp32."""
        offs_d = tl.arange(0, HEAD_DIM)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, key_count, BLOCK_N):
            offs_j = start + tl.arange(0, BLOCK_N)
            valid = offs_j < key_count
            rows = _key_rows(offs_j, key_first, key_step, HAS_CLS)
            k_t = tl.load(k_base + rows[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                          mask=valid[None, :], other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                        mask=valid[:, None], other=0.0)
            if DOT_FP32:
                k_t = k_t.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v.dtype)
            if DOT_FP32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        return acc / l_i[:, None]

    @triton.jit
    def _attend_tile(q_base, k_base, v_base, o_base, stride_ql, stride_qd, stride_kl, stride_kd,
                     stride_vl, stride_vd, stride_ol, q_rows, q_valid, key_first, key_step, key_count,
                     qk_scale, HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Load one tile of query rows, attend it to its group's keys, store its output rows."""
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_base + q_rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=q_valid[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        out = _attend_group(q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                            key_first, key_step, key_count, qk_scale,
                            HAS_CLS, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_FP32, PRECISION)
        tl.store(o_base + q_rows[:, None] * stride_ol + offs_d[None, :], out.to(o_base.dtype.element_ty),
                 mask=q_valid[:, None])

    @triton.jit
    def _spatial_cls_frame(q_base, k_base, v_base, c_frame, stride_ql, stride_qd, stride_kl, stride_kd,
                           stride_vl, stride_vd, frame, N, qk_scale,
                           CLS_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                           DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """The cls query attending {cls} + frame `frame`, stored in float32 at c_frame [HEAD_DIM] (the
        frame's share of the cls row; _spatial_cls_mean_kernel averages them). tl.dot needs 16 rows: the
        cls query is repeated CLS_BLOCK times and row 0 is stored."""
        offs_d = tl.arange(0, HEAD_DIM)
        rows = tl.arange(0, CLS_BLOCK)
        q = tl.load(q_base + (rows * 0)[:, None] * stride_ql + offs_d[None, :] * stride_qd)
        if DOT_FP32:
            q = q.to(tl.float32)
        out = _attend_group(q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                            1 + frame * N, 1, N + 1, qk_scale,
                            True, CLS_BLOCK, BLOCK_N, HEAD_DIM, DOT_FP32, PRECISION)
        tl.store(c_frame + (rows * 0)[:, None] + offs_d[None, :], out, mask=(rows == 0)[:, None])

    @triton.jit
    def _spatial_cls_mean_kernel(C, O, stride_ob, stride_oh, H, T,
                                 HEAD_DIM: tl.constexpr, T_PAD: tl.constexpr):
        """The spatial cls row of one (batch, head): the mean over frames of C [B * H, T, HEAD_DIM] (float32,
        written by the frames' first tiles), in one read."""
        bh = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, T_PAD)
        d = tl.arange(0, HEAD_DIM)
        parts = tl.load(C + (bh * T + t[:, None]) * HEAD_DIM + d[None, :], mask=(t < T)[:, None], other=0.0)
        o = O + (bh // H) * stride_ob + (bh % H) * stride_oh
        tl.store(o + d, (tl.sum(parts, 0) / T).to(O.dtype.element_ty))

    @triton.jit
    def _temporal_packed(q_base, k_base, v_base, o_base, stride_ql, stride_qd, stride_kl, stride_kd,
                         stride_vl, stride_vd, stride_ol, pid, T, N, qk_scale,
                         BLOCK_M: tl.constexpr, T_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Temporal attention of BLOCK_M // T_PAD grid positions at once: row r of the tile is frame
        r % T_PAD of position pid * PACK + r // T_PAD. Queries and keys are the same rows; the score tile
        is masked block-diagonally (a row sees only its own position's frames), so the tensor cores work
        on one BLOCK_M x BLOCK_M tile instead of PACK tiles of T_PAD x T_PAD."""
        PACK: tl.constexpr = BLOCK_M // T_PAD
        r = tl.arange(0, BLOCK_M)
        slot = r // T_PAD
        frame = r % T_PAD
        position = pid * PACK + slot
        valid = (frame < T) & (position < N)
        rows = 1 + frame * N + position
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=valid[:, None], other=0.0)
        k_t = tl.load(k_base + rows[None, :] * stride_kl + offs_d[:, None] * stride_kd, mask=valid[None, :],
                      other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            k_t = k_t.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        s = tl.where((slot[:, None] == slot[None, :]) & valid[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padding rows of an empty position: no NaN from -inf - -inf
        p = tl.math.exp2(s - m[:, None])
        l_sum = tl.sum(p, 1)
        p = p.to(v.dtype)
        if DOT_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        out = tl.dot(p, v, input_precision=PRECISION) / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
        tl.store(o_base + rows[:, None] * stride_ol + offs_d[None, :], out.to(o_base.dtype.element_ty),
                 mask=valid[:, None])

    @triton.jit(do_not_specialize=["BATCH_BUCKET"])
    def _st_attention_kernel(
        Q, K, V, O, C,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_ob, stride_ol, stride_oh,
        H, L, T, N, qk_scale,
        MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CLS_BLOCK: tl.constexpr, T_PAD: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BATCH_BUCKET,
    ):
        # BATCH_BUCKET is read by no instruction: it is in the autotuner's key (batch_bucket), so that the
        # configuration timed at batch 2 is not reused at batch 64, and is never specialised on.
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        # 64-bit: b * stride_qb passes 2**31 from batch 1,782 with packed qkv at the paper's shape
        # (stride 785 * 3 * 512); within a clip every offset stays far below it.
        b = (bh // H).to(tl.int64)
        h = bh % H
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        o_base = O + b * stride_ob + h * stride_oh
        offs_m = tl.arange(0, BLOCK_M)

        if MODE == 1:  # spatial: frame-major query tiles; a frame's first tile also takes the cls query
            tiles = tl.cdiv(N, BLOCK_M)
            frame = pid // tiles
            tile = pid % tiles
            i = tile * BLOCK_M + offs_m
            _attend_tile(q_base, k_base, v_base, o_base, stride_ql, stride_qd, stride_kl, stride_kd,
                         stride_vl, stride_vd, stride_ol, 1 + frame * N + i, i < N,
                         1 + frame * N, 1, N + 1, qk_scale,
                         True, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_FP32, PRECISION)
            if tile == 0:
                _spatial_cls_frame(q_base, k_base, v_base, C + (bh.to(tl.int64) * T + frame) * HEAD_DIM,
                                   stride_ql, stride_qd, stride_kl, stride_kd, stride_vl, stride_vd, frame, N,
                                   qk_scale, CLS_BLOCK, BLOCK_N, HEAD_DIM, DOT_FP32, PRECISION)
        elif MODE == 2:  # temporal
            if BLOCK_M >= T_PAD:  # BLOCK_M // T_PAD whole grid positions per tile, one softmax pass
                _temporal_packed(q_base, k_base, v_base, o_base, stride_ql, stride_qd, stride_kl, stride_kd,
                                 stride_vl, stride_vd, stride_ol, pid, T, N, qk_scale,
                                 BLOCK_M, T_PAD, HEAD_DIM, DOT_FP32, PRECISION)
            else:  # long groups: position-major query tiles, rows strided by N, keys streamed
                tiles = tl.cdiv(T, BLOCK_M)
                position = pid // tiles
                i = (pid % tiles) * BLOCK_M + offs_m
                _attend_tile(q_base, k_base, v_base, o_base, stride_ql, stride_qd, stride_kl, stride_kd,
                             stride_vl, stride_vd, stride_ol, 1 + i * N + position, i < T,
                             1 + position, N, T, qk_scale,
                             False, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_FP32, PRECISION)
            if pid == 0:  # the cls token takes no part: its row is zero
                offs_d = tl.arange(0, HEAD_DIM)
                tl.store(o_base + offs_d, tl.zeros([HEAD_DIM], tl.float32).to(O.dtype.element_ty))
        else:  # joint: one sequence of L tokens
            i = pid * BLOCK_M + offs_m
            _attend_tile(q_base, k_base, v_base, o_base, stride_ql, stride_qd, stride_kl, stride_kd,
                         stride_vl, stride_vd, stride_ol, i, i < L,
                         0, 1, L, qk_scale,
                         False, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_FP32, PRECISION)

    def _prune(configs, named_args, **kwargs):
        # The autotuner passes positional arguments in named_args and keyword arguments (all of ours
        # but the tensors and strides) in kwargs.
        args = {**named_args, **kwargs}
        name = {0: "joint", 1: "spatial", 2: "temporal"}[args["MODE"]]
        q = args.get("Q")
        allowed = candidates(name, args["L"], args["T"], args["N"], _capability(q), _dtype_name(q))
        kept = [c for c in configs if _launch_config(c) in allowed]
        kept = kept or configs[-1:]
        # The interpreter runs programs one by one in Python: it takes the preferred candidate (the
        # table lists it first) without timing; a single candidate left is what makes the autotuner skip
        # benchmarking, and everything else (key, pruning, grid(meta)) runs as on a GPU.
        return kept[:1] if interpreting() else kept

    # Timings kept on disk (Triton's cache folder) where this Triton can, so that a new process does not
    # time every candidate again; Triton turns it off under the interpreter, which times nothing.
    _DISK_CACHE = ({"cache_results": True}
                   if "cache_results" in inspect.signature(triton.autotune).parameters else {})

    def _untimed(kernel_call, quantiles=None):
        """The interpreter's stand-in for timing: nothing runs, every candidate takes 0. Triton 3.6 times even
        a single candidate left after pruning (it needs a GPU driver for that), 3.9 does not; with this the
        autotuner's key, pruning and choice (the first candidate: _prune keeps one) run the same on both."""
        return [0.0, 0.0, 0.0]

    def _autotuned(mode: str, dtype_name: str = "fp16"):
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                                 num_stages=c.num_stages) for c in candidate_table(dtype_name)[mode]]
        timing = {"do_bench": _untimed} if interpreting() else {}
        return triton.autotune(configs=configs, key=list(AUTOTUNE_KEY),
                               prune_configs_by={"early_config_prune": _prune}, **_DISK_CACHE,
                               **timing)(_st_attention_kernel)

    _TUNED = {}


def _launch_config(config) -> LaunchConfig:
    return LaunchConfig(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _dtype_name(t) -> str:
    """Which candidate table a tensor's dtype uses ("fp32" has its own: smaller tiles)."""
    return "fp32" if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else "fp16"


def _tuned(mode: str, dtype_name: str):
    key = (mode, dtype_name)
    if key not in _TUNED:
        _TUNED[key] = _autotuned(mode, dtype_name)
    return _TUNED[key]


def _capability(t) -> tuple[int, int] | None:
    """The compute capability of the GPU holding tensor t; None under the interpreter (no GPU)."""
    if t is None or not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(t.device)


def frames_padded(frames: int) -> int:
    """T rounded up to a power of two: the rows one grid position takes in a packed temporal tile."""
    return triton.next_power_of_2(frames)


def programs_per_head(mode: str, length: int, frames: int, patches: int, block_m: int) -> int:
    """Grid axis 0: the programs of one (batch, head) for a tile of block_m query rows."""
    if mode == "joint":
        return triton.cdiv(length, block_m)
    if mode == "spatial":
        return frames * triton.cdiv(patches, block_m)
    if block_m >= frames_padded(frames):  # packed: block_m // T_PAD positions per program
        return triton.cdiv(patches, block_m // frames_padded(frames))
    return patches * triton.cdiv(frames, block_m)


def planned_grid(mode: str, batch: int, heads: int, length: int, frames: int, patches: int, dtype_name: str,
                 capability: tuple[int, int]) -> tuple[int, int, int]:
    """(programs, longest, total) of the attention launch as stt_fast.launch_plan models it: the grid of the
    launch table's first candidate on that target (the autotuner may take another on the GPU), and the chains
    of dependent memory reads: the longest in one program and their sum over programs. A streamed key loop is
    software-pipelined (one); a spatial frame's first tile also attends the cls query to the frame (two).
    Spatial mode adds the cls mean (spatial_cls_mean_launch)."""
    config = candidates(mode, length, frames, patches, capability, dtype_name)[0]
    per_head = programs_per_head(mode, length, frames, patches, config.block_m)
    if mode == "spatial":
        return per_head * batch * heads, 2, (per_head + frames) * batch * heads
    return per_head * batch * heads, 1, per_head * batch * heads


def spatial_cls_mean_launch(batch: int, heads: int, frames: int, head_dim: int, element_size: int) -> dict:
    """The second launch of spatial mode (the mean of the frames' float32 shares of the cls row), as
    stt_fast.launch_plan models it."""
    return dict(programs=batch * heads, serial=1, flops=batch * heads * frames * head_dim,
                bytes_read=batch * heads * frames * head_dim * 4, bytes_written=batch * heads * head_dim * element_size)


def batch_bucket(batch: int) -> int:
    """The batch size as the autotuner sees it: rounded up to a power of two. The best tile changes with
    the number of programs in flight (B * H * programs per head against the GPU's SMs), so batch 1 and
    batch 64 are timed apart, while 33..64 share one choice and a new batch size rarely re-tunes."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


def device_guard(t: torch.Tensor):
    """The context in which a kernel on t's device is launched: Triton launches on the current CUDA
    device, so a tensor on cuda:1 needs cuda:1 made current (a no-op when it already is)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def batch_chunks(batch: int, heads: int, max_grid_y: int | None = None) -> list[tuple[int, int]]:
    """[b0, b1) ranges of whole clips whose B * H programs fit grid axis 1 (CUDA's limit: 65535)."""
    per_launch = max(1, (max_grid_y or MAX_GRID_Y) // heads)
    return [(b0, min(batch, b0 + per_launch)) for b0 in range(0, batch, per_launch)]


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int, mode: str):
    """The contract (kernels/contract.py) plus the kernel's own limits on dtype and head dim."""
    shape = check_attention_inputs(q, k, v, num_frames=num_frames, mode=mode)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"st_attention supports {[str(d) for d in SUPPORTED_DTYPES]}, got {q.dtype}")
    if shape.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"st_attention supports head dims {SUPPORTED_HEAD_DIMS}, got {shape.head_dim}")
    return shape


def kernel_arguments(shape, mode: str, dtype: torch.dtype, scale: float, *, interpreted: bool) -> dict:
    """The scalar and constexpr arguments of a launch (all but the tensors, their strides and the
    autotuned BLOCK_M / BLOCK_N). Shared by the launcher and the ahead-of-time compiles (kernels/aot.py)."""
    return dict(
        H=shape.heads, L=shape.length, T=shape.num_frames, N=shape.num_patches, qk_scale=scale * LOG2_E,
        MODE=MODE_IDS[mode], HEAD_DIM=shape.head_dim, CLS_BLOCK=CLS_BLOCK_M, T_PAD=frames_padded(shape.num_frames),
        DOT_FP32=interpreted and dtype == torch.bfloat16,
        # IEEE float32 products for float32 inputs: TF32 would cost ~1e-3 of relative error
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BATCH_BUCKET=batch_bucket(shape.batch),
    )


def tensor_arguments(q, k, v, out, cls_frames=None) -> list:
    """The tensors and their strides, in the kernel's order. cls_frames: spatial mode's float32 [B * H, T, Dh]
    (each frame's share of the cls row); other modes read none (out stands in)."""
    return [q, k, v, out, out if cls_frames is None else cls_frames, *(s for t in (q, k, v) for s in t.stride()),
            *out.stride()[:3]]


def _launch(q, k, v, out, shape, mode: str, scale: float, config: LaunchConfig | None = None) -> None:
    """Launch the kernel over q, k, v into out: autotuned, or with one given launch configuration
    (config, as the tests force each candidate of the tables once)."""
    args = kernel_arguments(shape, mode, q.dtype, scale, interpreted=q.device.type == "cpu")
    if config is None:
        kernel = _tuned(mode, _dtype_name(q))
    else:
        kernel = _st_attention_kernel
        args.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                    num_stages=config.num_stages)
    # B * H rides on grid axis 1 (limit 65535): very large batches go in chunks of whole clips.
    cls_frames = (torch.empty(shape.batch * shape.heads, shape.num_frames, shape.head_dim, dtype=torch.float32,
                              device=q.device) if mode == "spatial" else None)
    with device_guard(q):
        for b0, b1 in batch_chunks(shape.batch, shape.heads):
            bh = (b1 - b0) * shape.heads
            chunk_frames = None if cls_frames is None else cls_frames[b0 * shape.heads:b1 * shape.heads]

            def grid(meta, bh=bh):
                return (programs_per_head(mode, shape.length, shape.num_frames, shape.num_patches, meta["BLOCK_M"]),
                        bh)

            kernel[grid](*tensor_arguments(*(t[b0:b1] for t in (q, k, v, out)), chunk_frames),
                         **{**args, "BATCH_BUCKET": batch_bucket(b1 - b0)})
            if chunk_frames is not None:  # the cls row: the mean of the frames' shares, once they are all written
                _spatial_cls_mean_kernel[(bh,)](chunk_frames, out[b0:b1], out.stride(0), out.stride(2), shape.heads,
                                                shape.num_frames, HEAD_DIM=shape.head_dim,
                                                T_PAD=frames_padded(shape.num_frames))


def st_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int, mode: str,
                 scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused spatio-temporal attention (see the module docstring and docs/design.md).

    q, k, v: [B, L, H, Dh], any strides, same dtype (float16, bfloat16, float32) and device;
    L = 1 + num_frames * N; Dh in (16, 32, 64, 128). mode: "joint", "spatial" or "temporal".
    scale defaults to Dh ** -0.5. out: optional contiguous [B, L, H, Dh] tensor of q's dtype to write
    into (every element is written). Returns the contiguous [B, L, H, Dh] result.

    Runs the Triton kernel on CUDA; on the CPU it runs through Triton's interpreter when
    TRITON_INTERPRET=1 was set before triton was imported, and otherwise falls back to
    st_attention_reference. Bad input raises ValueError naming the problem.
    """
    shape = check_kernel_inputs(q, k, v, num_frames=num_frames, mode=mode)
    scale = shape.head_dim**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}")
    if torch.compiler.is_compiling() or is_fake(q):
        # torch.compile / torch.export and fake-tensor tracing see one opaque op (its fake kernel), not a launch
        result = torch.ops.stt_fast.st_attention(q, k, v, num_frames, mode, scale)
        return result if out is None else out.copy_(result)
    if q.device.type == "cpu" and not interpreting():
        _log_cpu_fallback_once()
        result = st_attention_reference(q, k, v, num_frames=num_frames, mode=mode, scale=scale)
        return result if out is None else out.copy_(result)
    if not HAS_TRITON:
        raise RuntimeError("st_attention on a GPU needs the 'triton' package")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"st_attention runs on CUDA (or the CPU), got device {q.device}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    _launch(q, k, v, out, shape, mode, scale)
    return out


@torch.library.custom_op("stt_fast::st_attention", mutates_args=())
def _st_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, mode: str,
                     scale: float) -> torch.Tensor:
    """torch.ops.stt_fast.st_attention: st_attention as one op for torch.compile and torch.export."""
    return st_attention(q, k, v, num_frames=num_frames, mode=mode, scale=scale)


@_st_attention_op.register_fake
def _(q, k, v, num_frames, mode, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
