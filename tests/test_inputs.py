"""Bad input to the model raises ValueError naming the problem."""

import pytest
import torch

from stt_fast import STT, STTConfig, get_config

CONFIG = get_config("tiny")
T, S = CONFIG.num_frames, CONFIG.image_size

BAD_INPUTS = {
    "wrong-rank": (torch.rand(T, 3, S, S), "5-D"),
    "wrong-frame-count": (torch.rand(1, T + 1, 3, S, S), "frames"),
    "wrong-image-size": (torch.rand(1, T, 3, S + 16, S + 16), f"{S}x{S}"),
    "not-3-channels": (torch.rand(1, T, 1, S, S), r"3 \(RGB\) channels"),
    "nan": (torch.full((1, T, 3, S, S), float("nan")), "NaN"),
    "inf": (torch.rand(1, T, 3, S, S).index_put_((torch.tensor(0),), torch.tensor(float("inf"))), "infinite"),
    "empty-batch": (torch.rand(0, T, 3, S, S), "empty batch"),
    "int32": (torch.zeros(1, T, 3, S, S, dtype=torch.int32), "uint8 or floating"),
    "bool": (torch.zeros(1, T, 3, S, S, dtype=torch.bool), "uint8 or floating"),
    "not-a-tensor": ([[0.0]], "torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error(name):
    clips, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        STT(CONFIG).eval()(clips)


@pytest.mark.parametrize("changes,message", [
    ({"attention": "axial"}, "attention"),
    ({"embed_dim": 30, "num_heads": 4}, "divisible"),
    ({"depth": 0}, "depth"),
    ({"drop_path_rate": 1.0}, "drop_path_rate"),
], ids=["unknown-attention", "heads-do-not-divide", "zero-depth", "drop-path-1"])
def test_bad_config_raises_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        STTConfig(**changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
