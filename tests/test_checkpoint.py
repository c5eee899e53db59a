"""Checkpoints round-trip with their config; torchvision ResNet-18 weights load; bad files say why."""

import json

import pytest
import torch

from stt_fast import STT, CheckpointError, get_config, load_checkpoint, load_torchvision_resnet18, save_checkpoint
from stt_fast.checkpoint import read_checkpoint
from tests.helpers import trained_looking


def torchvision_resnet18_state(width=64, classes=1000):
    """A state dict with torchvision's resnet18 names and shapes, built from its published structure."""
    state = {}

    def bn(prefix, c):
        state.update({f"{prefix}.weight": torch.rand(c) + 0.5, f"{prefix}.bias": torch.randn(c),
                      f"{prefix}.running_mean": torch.randn(c), f"{prefix}.running_var": torch.rand(c) + 0.5,
                      f"{prefix}.num_batches_tracked": torch.tensor(123)})

    state["conv1.weight"] = torch.randn(width, 3, 7, 7)
    bn("bn1", width)
    c_in = width
    for layer, c in enumerate([width, 2 * width, 4 * width, 8 * width], start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            state[f"{p}.conv1.weight"] = torch.randn(c, c_in if block == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            state[f"{p}.conv2.weight"] = torch.randn(c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if block == 0 and layer > 1:
                state[f"{p}.downsample.0.weight"] = torch.randn(c, c_in, 1, 1)
                bn(f"{p}.downsample.1", c)
        c_in = c
    state["fc.weight"] = torch.randn(classes, 8 * width)
    state["fc.bias"] = torch.randn(classes)
    return state


def test_round_trip_keeps_weights_config_and_outputs(tmp_path):
    config = get_config("tiny-joint").replace(num_classes=5)
    model = STT(config).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"epoch": 3})
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    clips = torch.rand(2, config.num_frames, 3, config.image_size, config.image_size)
    with torch.no_grad():
        assert torch.equal(model(clips), loaded(clips))


def test_torchvision_weights_load_into_the_backbone(tmp_path):
    state = torchvision_resnet18_state(width=8)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = STT(get_config("tiny"))
    head_before = model.head.weight.clone()
    load_torchvision_resnet18(model, path)
    own = model.backbone.state_dict()
    for key, value in state.items():
        if key.startswith(("layer4.", "fc.")):
            assert key not in own
        else:
            assert torch.equal(own[key], value), key
    assert torch.equal(model.head.weight, head_before)


def test_torchvision_weights_with_module_prefix_and_wrapper():
    state = {"state_dict": {f"module.{k}": v for k, v in torchvision_resnet18_state(width=8).items()}}
    model = load_torchvision_resnet18(STT(get_config("tiny")), state)
    assert torch.equal(model.backbone.conv1.weight, state["state_dict"]["module.conv1.weight"])


def test_torchvision_weights_of_the_wrong_width_are_refused():
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_torchvision_resnet18(STT(get_config("tiny")), torchvision_resnet18_state(width=16))


def test_torchvision_weights_missing_a_key_are_refused():
    state = torchvision_resnet18_state(width=8)
    del state["layer2.0.downsample.0.weight"]
    with pytest.raises(CheckpointError, match=r"missing: layer2\.0\.downsample\.0\.weight"):
        load_torchvision_resnet18(STT(get_config("tiny")), state)


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(STT(get_config("tiny")), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable stt_fast checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("where", [0.5, 0.99], ids=["middle-of-the-weights", "last-bytes"])
def test_a_flipped_byte_in_the_weights_is_refused(tmp_path, where):
    path = save_checkpoint(trained_looking(get_config("tiny")), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, tensor bytes
    position = header + int(where * (len(data) - header - 1))
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_foreign_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)


def test_safetensors_file_that_is_not_ours(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not an stt_fast checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(STT(get_config("tiny")), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def _forged(path, config_json: str, tensors: dict, sha: str | None):
    """A checkpoint written by hand: the header says what the caller wants."""
    import safetensors.torch

    from stt_fast.checkpoint import FORMAT

    header = {"format": FORMAT, "config": config_json, "metadata": "{}"} | ({"tensors_sha256": sha} if sha else {})
    safetensors.torch.save_file(tensors, str(path), metadata=header)
    return path


def test_a_checkpoint_without_the_hash_of_its_weights_is_refused(tmp_path):
    from stt_fast.checkpoint import tensors_fingerprint

    model = STT(get_config("tiny"))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = _forged(tmp_path / "m.safetensors", model.config.to_json(), tensors, None)
    with pytest.raises(CheckpointError, match="carries no hash of its weights"):
        load_checkpoint(path)
    _forged(path, model.config.to_json(), tensors, tensors_fingerprint(tensors))
    assert isinstance(load_checkpoint(path), STT)


def test_a_forged_config_is_refused_before_anything_is_built(tmp_path):
    """A header declaring a huge model (depth 100,000) with tiny tensors: refused by the bounds, so never built; a
    plausible config whose tensors do not fit it: refused by the shapes, before the weights are read."""
    model = STT(get_config("tiny"))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    huge = json.loads(model.config.to_json()) | {"depth": 100_000}
    with pytest.raises(CheckpointError, match=r"beyond stt_fast's bounds \(depth 100000 > 64\)"):
        read_checkpoint(_forged(tmp_path / "huge.safetensors", json.dumps(huge), tensors, "0" * 64))
    deeper = json.loads(model.config.to_json()) | {"depth": 3}
    with pytest.raises(CheckpointError, match="do not fit the model its config describes"):
        read_checkpoint(_forged(tmp_path / "deeper.safetensors", json.dumps(deeper), tensors, "0" * 64))
