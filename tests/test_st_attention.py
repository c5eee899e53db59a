"""st_attention (Triton) against independent references, on the GPU where there is one, else through
Triton's interpreter (TRITON_INTERPRET=1): the kernel_device fixture makes sure it is the kernel that runs.

The interpreter runs float32, float16 and bfloat16. bfloat16 products are formed there from the
bfloat16-rounded operands widened to float32 (numpy has no bfloat16): the same products as on a GPU's
tensor cores; the bfloat16 tensor-core path itself runs only on a GPU. The launch code (autotuner key,
candidate pruning, grid(meta), batch chunking, the precision asked for) runs under the interpreter as on
a GPU; only the timing of candidates is skipped there.
"""

import importlib
import math

import pytest
import torch
from stt_fast.kernels import st_attention, st_attention_reference
from stt_fast.kernels.st_attention_configs import candidate_table, fitting

from stt_fast.accuracy import assert_kernel_close
from tests.independent import loop_st_attention

impl = importlib.import_module("stt_fast.kernels.st_attention")  # the module, not the function

MODES = ["joint", "spatial", "temporal"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, T, N, H): odd sizes on purpose; N = 1 (a 1 x 1 grid); T = 1 (one frame)
SMALL_SHAPES = {"B2-T3-N5-H2": (2, 3, 5, 2), "B2-T4-N1-H1": (2, 4, 1, 1), "B1-T1-N7-H3": (1, 1, 7, 3)}


def packed_qkv(batch, frames, patches, heads, head_dim, dtype, device="cpu"):
    """q, k, v as strided views into one [B, L, 3, H, Dh] tensor, as the model's qkv projection gives."""
    qkv = torch.randn(batch, 1 + frames * patches, 3, heads, head_dim, dtype=dtype).to(device)
    return qkv.unbind(2)


def poisoned_out(q):
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def check(out, q, k, v, frames, mode, dtype, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert not torch.isnan(out).any(), "some output elements were not written"
    expected = loop_st_attention(q.cpu(), k.cpu(), v.cpu(), frames, mode, scale)
    assert_close_rows(out, expected, dtype)


def assert_close_rows(out, expected, dtype):
    """The whole output, its worst token row and every clip's cls row (the one the head reads) within
    the tolerance table's bounds: a norm over the whole tensor alone would hide one wrong row."""
    assert_kernel_close(out, expected, dtype, row_dims=2, cls_rows=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [16, 32, 64], ids=lambda d: f"Dh{d}")
@pytest.mark.parametrize("shape", list(SMALL_SHAPES), ids=list(SMALL_SHAPES))
def test_small_shapes(kernel_device, mode, dtype, head_dim, shape):
    b, t, n, h = SMALL_SHAPES[shape]
    q, k, v = packed_qkv(b, t, n, h, head_dim, DTYPES[dtype], kernel_device)
    out = st_attention(q, k, v, num_frames=t, mode=mode, out=poisoned_out(q))
    check(out, q, k, v, t, mode, DTYPES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_paper_shape(kernel_device, mode, dtype):
    """The model's own shape: T = 16 frames of N = 49 tokens, L = 785, head dim 64, B = 1."""
    q, k, v = packed_qkv(1, 16, 49, 2, 64, DTYPES[dtype], kernel_device)
    out = st_attention(q, k, v, num_frames=16, mode=mode, out=poisoned_out(q))
    expected = st_attention_reference(*(t.cpu().double() for t in (q, k, v)), num_frames=16, mode=mode)
    assert not torch.isnan(out).any()
    assert_close_rows(out, expected, DTYPES[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_head_dim_128(kernel_device, mode):
    q, k, v = packed_qkv(1, 3, 5, 1, 128, torch.float16, kernel_device)
    check(st_attention(q, k, v, num_frames=3, mode=mode, out=poisoned_out(q)), q, k, v, 3, mode, torch.float16)


# (T, N) per mode such that one group has more keys than one key block of the first candidate (64), so
# the online softmax runs across blocks; temporal T = 70 also takes the unpacked (long group) path.
LONG_GROUPS = {"joint": (5, 37), "spatial": (2, 70), "temporal": (70, 3)}


@pytest.mark.parametrize("mode", MODES)
def test_longer_groups_take_several_key_blocks(kernel_device, mode):
    frames, patches = LONG_GROUPS[mode]
    q, k, v = packed_qkv(1, frames, patches, 1, 16, torch.float32, kernel_device)
    check(st_attention(q, k, v, num_frames=frames, mode=mode, out=poisoned_out(q)), q, k, v, frames, mode,
          torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_unusual_strides(kernel_device, mode):
    """Separate tensors in [B, H, L, Dh] storage, and a last-dim stride of 2: read in place, no copy."""
    b, t, n, h, d = 2, 3, 5, 2, 16
    q = torch.randn(b, h, 1 + t * n, d, device=kernel_device).transpose(1, 2)
    k = torch.randn(b, 1 + t * n, h, 2 * d, device=kernel_device)[..., ::2]
    v = torch.randn(1 + t * n, b, h, d, device=kernel_device).transpose(0, 1)
    check(st_attention(q, k, v, num_frames=t, mode=mode, out=poisoned_out(q)), q, k, v, t, mode, torch.float32)


def test_default_output_and_custom_scale(kernel_device):
    q, k, v = packed_qkv(2, 3, 5, 2, 32, torch.float32, kernel_device)
    out = st_attention(q, k, v, num_frames=3, mode="spatial", scale=0.05)
    check(out, q, k, v, 3, "spatial", torch.float32, scale=0.05)


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the real kernel, recorded: (grid, keyword arguments) as the kernel received them."""
    recorded = []
    kernel = impl._st_attention_kernel  # the one function every mode's autotuner runs
    run = kernel.run

    def recording_run(*args, grid, warmup, **kwargs):
        recorded.append((grid, kwargs))
        return run(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    return recorded


@pytest.mark.parametrize("mode", MODES)
def test_batches_beyond_grid_axis_1_go_in_chunks_of_whole_clips(kernel_device, launches, monkeypatch, mode):
    """B * H rides on grid axis 1 (65535 on CUDA); with the limit lowered to 5, B = 5 clips of H = 2
    heads go in 3 launches of 2, 2 and 1 clips, every row written."""
    monkeypatch.setattr(impl, "MAX_GRID_Y", 5)
    q, k, v = packed_qkv(5, 3, 5, 2, 16, torch.float32, kernel_device)
    check(st_attention(q, k, v, num_frames=3, mode=mode, out=poisoned_out(q)), q, k, v, 3, mode, torch.float32)
    assert [kwargs["H"] for _, kwargs in launches] == [2, 2, 2]
    assert [grid(kwargs)[1] for grid, kwargs in launches] == [4, 4, 2]


def test_batch_chunks_respect_cuda_grid_limit():
    chunks = impl.batch_chunks(20000, 8)
    assert chunks[0] == (0, 65535 // 8) and chunks[-1][1] == 20000
    assert all((b1 - b0) * 8 <= 65535 for b0, b1 in chunks)
    assert [b for c in chunks for b in range(*c)] == list(range(20000))


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float16, "tf32")],
                         ids=["fp32-ieee", "fp16"])
def test_float32_asks_for_ieee_products_not_tf32(kernel_device, launches, dtype, precision):
    """The interpreter computes float32 products exactly whatever is asked, so what the kernel is asked
    for is checked here (and the PTX of float32 compiles is checked for TF32 instructions in
    tests/test_kernels_aot.py)."""
    q, k, v = packed_qkv(1, 3, 5, 2, 16, dtype, kernel_device)
    st_attention(q, k, v, num_frames=3, mode="joint")
    assert [kwargs["PRECISION"] for _, kwargs in launches] == [precision]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("mode,block_m", [("joint", 128), ("spatial", 128), ("temporal", 128)])
def test_candidates_fit_the_groups(mode, block_m, dtype):
    paper = impl.candidates(mode, 785, 16, 49, capability=(9, 0), dtype_name=dtype)
    assert paper and all(c.block_m <= block_m for c in paper)
    # a group of 3 x 5 tokens: joint and spatial tiles of 16; temporal packs at most 8 positions (N = 5 -> 8)
    tiny = impl.candidates(mode, 16, 3, 5, capability=(9, 0), dtype_name=dtype)
    if mode == "temporal":
        assert tiny and all(c.block_m // 4 <= 8 for c in tiny)
    else:
        assert tiny and all(c.block_m == 16 and c.block_n == 16 for c in tiny)


def test_spatial_programs_are_frame_tiles_only():
    """No program of its own for the cls row (it visited every frame in turn): each frame's tiles, the first
    of which also attends the cls query (the mean over frames is a second launch)."""
    assert impl.programs_per_head("spatial", 785, 16, 49, 64) == 16
    assert impl.programs_per_head("spatial", 785, 16, 49, 32) == 32


@pytest.mark.parametrize("frames,patches,block_m,programs", [
    (16, 49, 64, 13),  # the paper's temporal plan: 4 positions per 64-row tile
    (16, 49, 16, 49),  # one position per tile
    (3, 5, 64, 1),     # T = 3 rounds up to 4 rows: 16 positions in one tile
    (70, 3, 64, 6),    # T = 70 > 64: 2 tiles per position, keys streamed
])
def test_temporal_programs_per_head(frames, patches, block_m, programs):
    assert impl.programs_per_head("temporal", 1 + frames * patches, frames, patches, block_m) == programs


@pytest.mark.parametrize("mode", MODES)
def test_autotune_key_holds_the_batch_bucket(kernel_device, launches, monkeypatch, mode):
    """Batch 3 and 4 share one choice (bucket 4), batch 1 gets its own: the tile timed at the validation
    probe's batch is not reused at batch 64. (Mutation: drop BATCH_BUCKET from AUTOTUNE_KEY and the cache
    holds one entry.)"""
    tuner = impl._tuned(mode, "fp32")
    assert tuple(tuner.keys) == impl.AUTOTUNE_KEY and "BATCH_BUCKET" in tuner.keys
    monkeypatch.setattr(tuner, "cache", {})
    for batch in (3, 4, 1):
        q, k, v = packed_qkv(batch, 3, 5, 2, 16, torch.float32, kernel_device)
        st_attention(q, k, v, num_frames=3, mode=mode)
    assert len(tuner.cache) == 2, "batch 3 and 4 share a bucket, batch 1 has its own"
    assert [kwargs["BATCH_BUCKET"] for _, kwargs in launches] == [4, 4, 1]
    first = impl.candidates(mode, 16, 3, 5, None, "fp32")[0]
    assert {(kwargs["BLOCK_M"], kwargs["BLOCK_N"]) for _, kwargs in launches} == {(first.block_m, first.block_n)}


@pytest.mark.parametrize("batch,bucket", [(1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (33, 64), (64, 64), (65, 128)])
def test_batch_bucket(batch, bucket):
    assert impl.batch_bucket(batch) == bucket


def test_batch_bucket_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="batch"):
        impl.batch_bucket(0)


def test_autotuned_timings_are_kept_on_disk_where_triton_can():
    import inspect

    import triton

    tuner = impl._tuned("joint", "fp16")
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        # Triton itself turns the disk cache off under its interpreter; what was asked for is on the tuner
        assert impl._DISK_CACHE == {"cache_results": True}
    else:
        assert impl._DISK_CACHE == {} and not getattr(tuner, "cache_results", False)


def test_launches_happen_on_the_tensors_device():
    """Triton launches on the current CUDA device: the guard makes the tensor's device current (cuda:1
    here, on a fake tensor: no GPU is needed to see which device would be entered)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        on_second = torch.empty(2, 3, device="cuda:1")
    guard = impl.device_guard(on_second)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(impl.device_guard(torch.empty(2)), torch.cuda.device)


def _shape_where_it_fits(mode, dtype, config):
    """(T, N) of a small group shape that the candidate fits (st_attention_configs.fitting), so that each
    candidate of the tables runs once at least."""
    for frames, patches in ((3, 5), (4, 9), (3, 40), (16, 9), (2, 70), (16, 33), (8, 130)):
        if config in fitting(mode, 1 + frames * patches, frames, patches, dtype):
            return frames, patches
    raise AssertionError(f"no test shape fits {mode} {config}")


CANDIDATE_CASES = [(mode, dtype, config) for dtype in ("fp16", "fp32")
                   for mode, table in candidate_table(dtype).items() for config in table]


@pytest.mark.parametrize("mode,dtype,config", CANDIDATE_CASES,
                         ids=[f"{m}-{d}-{c.block_m}x{c.block_n}-w{c.num_warps}-s{c.num_stages}"
                              for m, d, c in CANDIDATE_CASES])
def test_every_candidate_of_the_launch_tables(kernel_device, mode, dtype, config):
    """Not only the autotuner's winner: each candidate launched once, forced, at a shape it fits."""
    frames, patches = _shape_where_it_fits(mode, dtype, config)
    q, k, v = packed_qkv(1, frames, patches, 1, 16, DTYPES[dtype], kernel_device)
    out = poisoned_out(q)
    shape = impl.check_kernel_inputs(q, k, v, num_frames=frames, mode=mode)
    impl._launch(q, k, v, out, shape, mode, 16**-0.5, config=config)
    check(out, q, k, v, frames, mode, DTYPES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_paper_shape_batch_2_with_8_heads_at_the_production_tiles(kernel_device, mode):
    """Batch > 1 and the model's 8 heads (grid axis 1 = B * H = 16) at the tiles the paper's shape uses."""
    q, k, v = packed_qkv(2, 16, 49, 8, 64, torch.float16, kernel_device)
    out = st_attention(q, k, v, num_frames=16, mode=mode, out=poisoned_out(q))
    expected = st_attention_reference(*(t.cpu().double() for t in (q, k, v)), num_frames=16, mode=mode)
    assert_close_rows(out, expected, torch.float16)


def test_cpu_fallback_without_interpreter_is_the_reference(monkeypatch, caplog):
    monkeypatch.setattr(impl, "interpreting", lambda: False)
    monkeypatch.setattr(impl, "_cpu_fallback_logged", False)
    q, k, v = packed_qkv(2, 3, 5, 2, 16, torch.float32)
    with caplog.at_level("WARNING", logger="stt_fast.kernels.st_attention"):
        out = impl.st_attention(q, k, v, num_frames=3, mode="temporal")
        impl.st_attention(q, k, v, num_frames=3, mode="temporal")
    assert torch.equal(out, st_attention_reference(q, k, v, num_frames=3, mode="temporal"))
    assert len([r for r in caplog.records if "plain-PyTorch references" in r.getMessage()]) == 1


def test_traced_as_one_op_by_torch_export():
    class Attn(torch.nn.Module):
        def forward(self, qkv):
            q, k, v = qkv.unbind(2)
            return st_attention(q, k, v, num_frames=3, mode="spatial")

    qkv = torch.randn(2, 16, 3, 2, 16)
    program = torch.export.export(Attn(), (qkv,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "stt_fast.st_attention.default" in targets
    q, k, v = qkv.unbind(2)
    torch.testing.assert_close(program.module()(qkv), st_attention_reference(q, k, v, num_frames=3, mode="spatial"),
                               rtol=1e-5, atol=1e-6)


def _qkv(**over):
    args = dict(b=1, t=3, n=5, h=2, d=16, dtype=torch.float32)
    args.update(over)
    return packed_qkv(args["b"], args["t"], args["n"], args["h"], args["d"], args["dtype"])


BAD = {
    "L-not-1+T*N": (lambda: _qkv(), dict(num_frames=4, mode="joint"), "not 1 \\+ T\\*N"),
    "unknown-mode": (lambda: _qkv(), dict(num_frames=3, mode="axial"), "unknown attention mode"),
    "head-dim-24": (lambda: _qkv(d=24), dict(num_frames=3, mode="joint"), "head dims"),
    "head-dim-256": (lambda: _qkv(d=256), dict(num_frames=3, mode="joint"), "head dims"),
    "float64": (lambda: _qkv(dtype=torch.float64), dict(num_frames=3, mode="joint"), "supports"),
    "shapes-differ": (lambda: (_qkv()[0], _qkv(h=3)[1], _qkv()[2]), dict(num_frames=3, mode="joint"), "shapes differ"),
    "dtypes-differ": (lambda: (_qkv()[0], _qkv()[1].half(), _qkv()[2]), dict(num_frames=3, mode="joint"),
                      "dtypes differ"),
    "3-D-input": (lambda: tuple(t[0] for t in _qkv()), dict(num_frames=3, mode="joint"), "4-D"),
    "zero-frames": (lambda: _qkv(), dict(num_frames=0, mode="joint"), "num_frames"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        st_attention(*make(), **kwargs)


def test_bad_out_and_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="out must be"):
        st_attention(q, k, v, num_frames=3, mode="joint", out=torch.empty(1, 2, 3))
    with pytest.raises(ValueError, match="scale"):
        st_attention(q, k, v, num_frames=3, mode="joint", scale=math.inf)
