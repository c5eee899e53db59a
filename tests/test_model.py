"""The reference model: shapes, determinism, both attention variants against independent code."""

import pytest
import torch
from stt_fast.kernels import st_attention_reference

from stt_fast import STT, get_config
from tests.independent import full_attention_joint_block, loop_st_attention, timesformer_divided_block

VARIANTS = ["tiny", "tiny-joint"]


def _clips(config, batch=2):
    return torch.rand(batch, config.num_frames, 3, config.image_size, config.image_size)


@pytest.mark.parametrize("preset", VARIANTS)
def test_logits_shape_and_dtype(preset):
    config = get_config(preset)
    logits = STT(config).eval()(_clips(config, batch=3))
    assert logits.shape == (3, config.num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("preset", VARIANTS)
def test_eval_is_deterministic_and_batch_independent(preset):
    config = get_config(preset)
    model = STT(config).eval()
    clips = _clips(config, batch=3)
    with torch.no_grad():
        first, second = model(clips), model(clips)
        alone = model(clips[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[1:2], rtol=1e-5, atol=1e-6)


def test_training_mode_is_stochastic_with_drop_path():
    config = get_config("tiny").replace(drop_path_rate=0.5)
    model = STT(config).train()
    clips = _clips(config, batch=4)
    outs = [model(clips) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("mode", ["temporal", "spatial", "joint"])
@pytest.mark.parametrize("frames,patches", [(4, 4), (3, 5), (2, 1)], ids=["T4-N4", "T3-N5", "T2-N1"])
def test_reference_attention_matches_group_loops(mode, frames, patches):
    b, h, dh = 2, 3, 8
    qkv = torch.randn(b, 1 + frames * patches, 3, h, dh, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    out = st_attention_reference(q, k, v, num_frames=frames, mode=mode)
    expected = loop_st_attention(q, k, v, frames, mode)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


def test_divided_block_matches_timesformer_formulation():
    config = get_config("tiny").replace(num_frames=3, image_size=80)  # N = 25 positions, L = 76
    model = STT(config).double().eval()
    x = torch.randn(2, config.num_tokens, config.embed_dim, dtype=torch.float64)
    for block in model.blocks:
        with torch.no_grad():
            torch.testing.assert_close(block(x), timesformer_divided_block(block, x, config.num_frames),
                                       rtol=1e-10, atol=1e-10)


def test_joint_block_matches_full_attention():
    config = get_config("tiny-joint")
    model = STT(config).double().eval()
    x = torch.randn(2, config.num_tokens, config.embed_dim, dtype=torch.float64)
    for block in model.blocks:
        with torch.no_grad():
            torch.testing.assert_close(block(x), full_attention_joint_block(block, x), rtol=1e-10, atol=1e-10)


def test_temporal_attention_reaches_across_frames_only_by_position():
    """Changing one patch token of frame 0 changes, after one temporal attention, only its position."""
    frames, patches = 3, 4
    qkv = torch.randn(1, 1 + frames * patches, 3, 2, 8, dtype=torch.float64)
    base = st_attention_reference(*qkv.unbind(2), num_frames=frames, mode="temporal")
    qkv[0, 1 + 2] += 1.0  # frame 0, position 2
    moved = st_attention_reference(*qkv.unbind(2), num_frames=frames, mode="temporal")
    changed = (moved - base).abs().amax(dim=(0, 2, 3)) > 0
    expected = torch.zeros(1 + frames * patches, dtype=torch.bool)
    expected[[1 + t * patches + 2 for t in range(frames)]] = True
    assert torch.equal(changed, expected)


def test_uint8_clips_equal_float_clips_over_255():
    config = get_config("tiny")
    model = STT(config).eval()
    raw = torch.randint(0, 256, (2, config.num_frames, 3, config.image_size, config.image_size),
                        dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(raw), model(raw.float() / 255), rtol=1e-6, atol=1e-6)


def test_a_few_optimizer_steps_reduce_the_loss():
    from stt_fast import CompactSoftmaxCrossEntropy

    config = get_config("tiny")
    model = STT(config).train()
    clips = _clips(config, batch=8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    loss_fn = CompactSoftmaxCrossEntropy(lambda_compact=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = loss_fn(model(clips), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_paper_config_counts():
    from stt_fast.flops import model_cost

    config = get_config("paper")
    assert (config.grid_size, config.num_patches, config.num_tokens, config.head_dim) == (7, 49, 785, 64)
    cost = model_cost(config)
    # ResNet-18 conv1..layer3 alone is 2.8 M parameters (torchvision's resnet18 minus layer4 and fc);
    # the transformer adds depth x (17 D^2 + ...) for divided attention.
    backbone = sum(p.numel() for p in STT(config).backbone.parameters())
    assert backbone == 2_782_784
    assert 20e6 < cost.parameters < 22e6
    assert 38e9 < cost.flops_per_clip < 42e9
