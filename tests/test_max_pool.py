"""max_pool2d (Triton: on the GPU, else through the interpreter) against torch.nn.functional.max_pool2d, on
misaligned shapes, both memory formats, with padding taps and NaN."""

import pytest
import torch
from stt_fast.kernels import max_pool2d

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
@pytest.mark.parametrize("shape", [(3, 70, 9, 11), (2, 5, 14, 14)], ids=["C70-9x11", "C5-14x14"])
def test_equals_torchs_max_pool(kernel_device, dtype, channels_last, shape):
    """A max is exact: bit-equal to PyTorch's, channels beyond one block (70) and odd sides (padding taps),
    float64 included (the program's float64 checks run it)."""
    x = torch.randn(*shape, device=kernel_device).to(DTYPES[dtype])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = max_pool2d(x, 3, 2, 1)
    ref = torch.nn.functional.max_pool2d(x.cpu().double(), 3, 2, 1).to(x.dtype)  # independent of the fallback
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(out.cpu(), ref)


def test_nan_propagates_as_in_pytorch(kernel_device):
    x = torch.randn(1, 4, 6, 6, device=kernel_device)
    x[0, 1, 2, 3] = float("nan")
    out = max_pool2d(x, 3, 2, 1)
    ref = torch.nn.functional.max_pool2d(x.cpu(), 3, 2, 1)
    assert torch.equal(out.cpu().isnan(), ref.isnan()) and out.isnan().sum() > 0
    torch.testing.assert_close(out.cpu().nan_to_num(), ref.nan_to_num(), rtol=0, atol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="N, C, H, W"):
        max_pool2d(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="padding"):
        max_pool2d(torch.zeros(1, 1, 4, 4), 3, 2, 2)
