"""Small builders shared by the tests."""

import torch

from stt_fast import STT


def trained_looking(config, seed=0):
    """A model whose BatchNorm statistics and weights are not at their initial values."""
    torch.manual_seed(seed)
    model = STT(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        for p in model.parameters():
            if p.dim() == 1 and p.numel() > 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def clips(config, batch=2, dtype=torch.float32):
    return torch.rand(batch, config.num_frames, 3, config.image_size, config.image_size).to(dtype)
