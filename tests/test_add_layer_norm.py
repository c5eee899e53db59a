"""add_layer_norm (Triton: on the GPU, else through the interpreter; never its fallback, see the
kernel_device fixture) against an independent float64 formulation."""

import pytest
import torch
import torch.nn.functional as F
from stt_fast.kernels import add_layer_norm

from stt_fast.accuracy import assert_kernel_close

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def expected(x, delta, w, b, eps, cls_period):
    """Independent float64 formulation: explicit mean and variance, cls rows restored afterwards."""
    x64 = x.cpu().double()
    y = x64 + (0 if delta is None else delta.cpu().double())
    if cls_period:
        flat_x, flat_y = x64.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1]).clone()
        flat_y[::cls_period] = flat_x[::cls_period]
        y = flat_y.view_as(x64)
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    return y, (y - mean) / torch.sqrt(var + eps) * w.cpu().double() + b.cpu().double()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("dim", [48, 512], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("cls_period", [0, 21], ids=["all-rows", "cls-rows-kept"])
def test_matches_reference(kernel_device, dtype, dim, cls_period):
    dt = DTYPES[dtype]
    x, delta = (torch.randn(3, 21, dim, dtype=dt, device=kernel_device) for _ in range(2))
    w, b = (torch.randn(dim, dtype=dt, device=kernel_device) for _ in range(2))
    y, z = add_layer_norm(x, delta, w, b, 1e-6, cls_period=cls_period)
    y_ref, z_ref = expected(x, delta, w, b, 1e-6, cls_period)
    assert_kernel_close(y, y_ref, dt, "sum")
    assert_kernel_close(z, z_ref, dt, "normalised")
    if cls_period:
        assert torch.equal(y[:, 0], x[:, 0])


def test_without_delta_is_plain_layer_norm(kernel_device):
    x, w, b = (torch.randn(*shape, device=kernel_device) for shape in ((7, 33), (33,), (33,)))
    y, z = add_layer_norm(x, None, w, b, 1e-5)
    assert y is x
    torch.testing.assert_close(z, F.layer_norm(x, (33,), w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_strided_rows(kernel_device):
    """Rows of a wider buffer (the cls row of every clip sliced off): evenly strided, read in place."""
    base = torch.randn(4, 10, 64, device=kernel_device)
    x = base[:, 1:]
    with pytest.raises(ValueError, match="viewable"):
        add_layer_norm(x, torch.randn_like(x), torch.ones(64, device=kernel_device),
                       torch.zeros(64, device=kernel_device))
    x = base[:, :, :32]  # rows of stride 64
    w, b = torch.randn(32, device=kernel_device), torch.randn(32, device=kernel_device)
    _, z = add_layer_norm(x, None, w, b)
    torch.testing.assert_close(z, F.layer_norm(x, (32,), w, b, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(delta=torch.randn(2, 5)), "delta must match"),
    (dict(weight=torch.ones(3)), "weight and bias"),
    (dict(cls_period=-1), "cls_period"),
], ids=["delta-shape", "weight-shape", "negative-period"])
def test_bad_input(kwargs, message):
    args = dict(x=torch.randn(2, 4), delta=torch.randn(2, 4), weight=torch.ones(4), bias=torch.zeros(4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        add_layer_norm(**args)
