"""st_attention (Triton; on the CPU through TRITON_INTERPRET=1) against independent references.

The interpreter runs float32, float16 and bfloat16. bfloat16 products are formed there from the
bfloat16-rounded operands widened to float32 (numpy has no bfloat16): the same products as on a GPU's
tensor cores; the bfloat16 tensor-core path itself runs only on a GPU.
"""

import importlib
import math

import pytest
import torch
from stt_fast.kernels import st_attention, st_attention_reference

from stt_fast.accuracy import relative_error, tolerance
from tests.independent import loop_st_attention

MODES = ["joint", "spatial", "temporal"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, T, N, H): odd sizes on purpose; N = 1 (a 1 x 1 grid); T = 1 (one frame)
SMALL_SHAPES = {"B2-T3-N5-H2": (2, 3, 5, 2), "B2-T4-N1-H1": (2, 4, 1, 1), "B1-T1-N7-H3": (1, 1, 7, 3)}


def packed_qkv(batch, frames, patches, heads, head_dim, dtype):
    """q, k, v as strided views into one [B, L, 3, H, Dh] tensor, as the model's qkv projection gives."""
    qkv = torch.randn(batch, 1 + frames * patches, 3, heads, head_dim, dtype=dtype)
    return qkv.unbind(2)


def poisoned_out(q):
    return torch.full(q.shape, float("nan"), dtype=q.dtype)


def check(out, q, k, v, frames, mode, dtype, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert not torch.isnan(out).any(), "some output elements were not written"
    expected = loop_st_attention(q, k, v, frames, mode, scale)
    err = relative_error(out, expected)
    assert err < tolerance(dtype).kernel, f"relative error {err:.2e}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [16, 32, 64], ids=lambda d: f"Dh{d}")
@pytest.mark.parametrize("shape", list(SMALL_SHAPES), ids=list(SMALL_SHAPES))
def test_small_shapes(mode, dtype, head_dim, shape):
    b, t, n, h = SMALL_SHAPES[shape]
    q, k, v = packed_qkv(b, t, n, h, head_dim, DTYPES[dtype])
    out = st_attention(q, k, v, num_frames=t, mode=mode, out=poisoned_out(q))
    check(out, q, k, v, t, mode, DTYPES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_paper_shape(mode, dtype):
    """The model's own shape: T = 16 frames of N = 49 tokens, L = 785, head dim 64, B = 1."""
    q, k, v = packed_qkv(1, 16, 49, 2, 64, DTYPES[dtype])
    out = st_attention(q, k, v, num_frames=16, mode=mode, out=poisoned_out(q))
    expected = st_attention_reference(q.double(), k.double(), v.double(), num_frames=16, mode=mode)
    assert not torch.isnan(out).any()
    assert relative_error(out, expected) < tolerance(DTYPES[dtype]).kernel


@pytest.mark.parametrize("mode", MODES)
def test_head_dim_128(mode):
    q, k, v = packed_qkv(1, 3, 5, 1, 128, torch.float16)
    check(st_attention(q, k, v, num_frames=3, mode=mode, out=poisoned_out(q)), q, k, v, 3, mode, torch.float16)


@pytest.mark.parametrize("mode", MODES)
def test_longer_groups_take_several_key_blocks(mode):
    """Groups longer than one key block exercise the online softmax across blocks (T = 40, N = 37)."""
    q, k, v = packed_qkv(1, 40, 37, 1, 16, torch.float32) if mode != "joint" else packed_qkv(1, 5, 37, 1, 16,
                                                                                            torch.float32)
    frames = 40 if mode != "joint" else 5
    check(st_attention(q, k, v, num_frames=frames, mode=mode, out=poisoned_out(q)), q, k, v, frames, mode,
          torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_unusual_strides(mode):
    """Separate tensors in [B, H, L, Dh] storage, and a last-dim stride of 2: read in place, no copy."""
    b, t, n, h, d = 2, 3, 5, 2, 16
    q = torch.randn(b, h, 1 + t * n, d).transpose(1, 2)
    k = torch.randn(b, 1 + t * n, h, 2 * d)[..., ::2]
    v = torch.randn(1 + t * n, b, h, d).transpose(0, 1)
    check(st_attention(q, k, v, num_frames=t, mode=mode, out=poisoned_out(q)), q, k, v, t, mode, torch.float32)


def test_default_output_and_custom_scale():
    q, k, v = packed_qkv(2, 3, 5, 2, 32, torch.float32)
    out = st_attention(q, k, v, num_frames=3, mode="spatial", scale=0.05)
    check(out, q, k, v, 3, "spatial", torch.float32, scale=0.05)


def test_cpu_fallback_without_interpreter_is_the_reference(monkeypatch):
    impl = importlib.import_module("stt_fast.kernels.st_attention")  # the module, not the function

    monkeypatch.setattr(impl, "interpreting", lambda: False)
    q, k, v = packed_qkv(2, 3, 5, 2, 16, torch.float32)
    out = impl.st_attention(q, k, v, num_frames=3, mode="temporal")
    assert torch.equal(out, st_attention_reference(q, k, v, num_frames=3, mode="temporal"))


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


@pytest.mark.parametrize("mode,max_block_m", [("joint", 128), ("spatial", 64), ("temporal", 16)])
def test_autotune_candidates_fit_the_groups_and_the_key_ignores_the_batch(mode, max_block_m):
    impl = importlib.import_module("stt_fast.kernels.st_attention")
    tuner = impl._autotuned(mode)
    assert "B" not in tuner.keys and set(tuner.keys) == {"L", "T", "N", "MODE", "HEAD_DIM"}
    # the autotuner passes positional arguments separately from keyword ones: both are looked at
    kept = impl._prune(tuner.configs, {"Q": None}, L=785, T=16, N=49, MODE=impl.MODE_IDS[mode], HEAD_DIM=64)
    assert kept and all(c.kwargs["BLOCK_M"] <= max_block_m for c in kept)
    tiny = impl._prune(tuner.configs, {}, L=1 + 3 * 5, T=3, N=5, MODE=impl.MODE_IDS[mode], HEAD_DIM=16)
    assert all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] == 16 for c in tiny)


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
