"""cls_attention (Triton: on the GPU, else through the interpreter; never its fallback) against the cls
row of the full attention computed the long way (every token's q, k and v; stt_fast.kernels'
st_attention_reference), in float64, on misaligned shapes."""

import pytest
import torch
from stt_fast.kernels import cls_attention, cls_attention_reference
from stt_fast.kernels.cls_attention import BLOCK_L, COMBINE_ROWS, combine_steps, split_plan

from stt_fast.accuracy import assert_kernel_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _case(device, dt, batch, frames, patches, dim):
    length = 1 + frames * patches
    x = (torch.randn(batch, length, dim, device=device) * 2 + 0.5).to(dt)  # un-normalised tokens
    g = (torch.rand(dim, device=device) + 0.5).to(dt)
    b = (torch.randn(dim, device=device) * 0.1).to(dt)
    w = (torch.randn(3 * dim, dim, device=device) * dim**-0.5 * 2).to(dt)
    bias = torch.randn(3 * dim, device=device).to(dt)
    return x, g, b, w, bias


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("mode", ["spatial", "joint"])
@pytest.mark.parametrize("frames,patches,dim,heads", [(3, 5, 64, 4), (2, 37, 32, 2), (2, 40, 48, 3)],
                         ids=["T3-N5-D64-H4", "T2-N37-D32-H2", "T2-N40-D48-H3"])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "three-splits"])
def test_matches_the_full_attentions_cls_row(kernel_device, dtype, mode, frames, patches, dim, heads, splits):
    """N = 37 spans more than one token tile per frame (the online softmax across tiles); D = 48 and H = 3
    pad the row and the heads; three splits per group are merged in the combine step (runs of 2, 2 and 1
    tokens at N = 5, 13, 13 and 11 at N = 37)."""
    dt = DTYPES[dtype]
    x, g, b, w, bias = _case(kernel_device, dt, 3, frames, patches, dim)
    out = cls_attention(x, g, b, 1e-6, w, bias, num_heads=heads, num_frames=frames, mode=mode, splits=splits)
    ref = cls_attention_reference(*(t.cpu().double() for t in (x, g, b)), 1e-6, w.cpu().double(),
                                  bias.cpu().double(), num_heads=heads, num_frames=frames, mode=mode)
    assert out.shape == (3, dim) and out.dtype == dt
    assert_kernel_close(out, ref, dt)


@pytest.mark.parametrize("batch,groups,count,programs,expected", [
    (1, 1, 784, 264, (98, 8)),  # paper-joint at batch 1 on an H100: every 8-token tile its own program
    (1, 16, 49, 264, (7, 8)),  # paper, spatial: seven tiles per frame, seven programs (112 in all)
    (64, 16, 49, 264, (1, 56)),  # batch 64 covers the GPU with one program per frame
    (8, 1, 784, 132, (20, 40)),  # five tiles per program: 20 splits of 40 tokens (the last 24)
    (1, 1, 5, 1000, (1, 8)),  # never an empty split
])
def test_split_plan_covers_the_gpu_with_whole_tiles(batch, groups, count, programs, expected):
    splits, chunk = split_plan(batch, groups, count, programs)
    assert (splits, chunk) == expected
    assert chunk % BLOCK_L == 0 and (splits - 1) * chunk < count <= splits * chunk
    assert batch * groups * splits >= programs or chunk == BLOCK_L, "fewer programs only when tiles run out"


@pytest.mark.parametrize("frames,patches,mode,splits", [(20, 3, "spatial", 2), (2, 300, "joint", 20)],
                         ids=["groups-past-one-block", "splits-past-one-block"])
def test_the_combine_reads_partials_in_blocks(kernel_device, frames, patches, mode, splits):
    """More groups (20) or splits (20) than the combine reads at once (16): two blocks, in each order."""
    assert combine_steps(frames if mode == "spatial" else 1, splits)[0] == (mode == "spatial")
    assert max(frames, splits) > COMBINE_ROWS
    x, g, b, w, bias = _case(kernel_device, torch.float32, 2, frames, patches, 32)
    out = cls_attention(x, g, b, 1e-6, w, bias, num_heads=2, num_frames=frames, mode=mode, splits=splits)
    ref = cls_attention_reference(*(t.cpu().double() for t in (x, g, b)), 1e-6, w.cpu().double(),
                                  bias.cpu().double(), num_heads=2, num_frames=frames, mode=mode)
    assert_kernel_close(out, ref, torch.float32)


def test_the_reference_is_the_models_own_attention():
    """The reference against the model's STAttention module on normalised tokens (its cls row, before proj)."""
    from stt_fast.model import STAttention

    for mode in ("spatial", "joint"):
        attn = STAttention(32, 4, mode).double().eval()
        x, g, b, _, _ = _case("cpu", torch.float64, 2, 3, 5, 32)
        h = torch.nn.functional.layer_norm(x, (32,), g, b, 1e-6)
        with torch.no_grad():
            full = attn(h, 3)[:, 0]
            ref = attn.proj(cls_attention_reference(x, g, b, 1e-6, attn.qkv.weight, attn.qkv.bias, num_heads=4,
                                                    num_frames=3, mode=mode))
        torch.testing.assert_close(ref, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "mode": "temporal"}, "modes"),
    (lambda a: {**a, "num_frames": 4}, "1 \\+ num_frames"),
    (lambda a: {**a, "num_heads": 3}, "heads"),
    (lambda a: {**a, "qkv_weight": a["qkv_weight"][:-1]}, "qkv_weight"),
], ids=["temporal-mode", "frames", "heads", "qkv-shape"])
def test_bad_input_is_named(change, message):
    x, g, b, w, bias = _case("cpu", torch.float32, 1, 3, 5, 32)
    args = dict(x=x, norm_weight=g, norm_bias=b, eps=1e-6, qkv_weight=w, qkv_bias=bias, num_heads=4, num_frames=3,
                mode="spatial")
    args = change(args)
    with pytest.raises(ValueError, match=message):
        cls_attention(**args)


@pytest.mark.parametrize("mode", ["spatial", "joint"])
def test_bf16_rounds_once_at_the_output(kernel_device, mode):
    """Every intermediate stays in float32 (nothing here feeds a tensor-core product): the bf16 result is the
    float32 computation on the same values, rounded once at the store, within one bf16 step. Rounding the
    normalised tokens as well put bf16 errors at 0.8-1.1x the kernel bound."""
    x, g, b, w, bias = _case(kernel_device, torch.bfloat16, 3, 3, 5, 64)
    kwargs = dict(num_heads=4, num_frames=3, mode=mode)
    once = cls_attention(x, g, b, 1e-6, w, bias, **kwargs)
    wide = cls_attention(*(t.float() for t in (x, g, b)), 1e-6, w.float(), bias.float(), **kwargs)
    torch.testing.assert_close(once.float(), wide.to(torch.bfloat16).float(), rtol=2**-8, atol=0)


def test_the_interpreter_rounds_bf16_as_a_gpu_does():
    """Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even); stt_fast.kernels
    makes it round (kernels/interpreter.py). A kernel's cast against torch's, bit for bit; on a GPU, the
    hardware's."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < n).to(tl.bfloat16), mask=i < n)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-30, 30, (5000,)),
                   torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8])]).to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    cast[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int16).cpu(), x.to(torch.bfloat16).view(torch.int16).cpu())
