"""bn_relu_global_avgpool (the DenseNet head) against float64 PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from densetriton.kernels import bn_relu_global_avgpool
from helpers import GuardBand, assert_close, assert_nonfinite_like, nan_surrounded, plant_nonfinite, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot: bfloat16 is fine in the interpreter


def reference(x, scale, shift):
    a = F.relu(x.double().cpu() * scale.double().cpu() + shift.double().cpu())
    return a.mean(dim=(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,h,w,c",
    [
        (3, 7, 7, 37),  # 49 pixels = 3 full BLOCK_HW=16 chunks + a 1-pixel tail
        (2, 9, 5, 13),
        (2, 1, 1, 40),  # single pixel
    ],
)
def test_head_matches_torch(device, gen, dtype, n, h, w, c):
    x = nan_surrounded(randn(gen, n, h, w, c, dtype=dtype, device=device))
    scale = randn(gen, c, device=device)
    # Positive shift: masked tail pixels would add relu(shift) if they leaked into the sum.
    shift = randn(gen, c, device=device).abs() + 0.5
    band = GuardBand((n, c), device=device)
    bn_relu_global_avgpool(x, scale, shift, band.view, BLOCK_C=16, BLOCK_HW=16)
    # Only the input is rounded; the float32 sum and mean are nearly exact.
    assert_close(band.view, reference(x, scale, shift), 1e-5)
    band.assert_untouched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_reach_the_output_where_torchs_do(device, gen, dtype):
    """A NaN makes its channel's mean NaN, an Inf that survives the ReLU makes it Inf, as in torch.
    Fails when the ReLU drops NaN (tl.maximum(x, 0.0) in kernels/_math.py's _relu)."""
    n, h, w, c = 2, 5, 5, 21
    x = plant_nonfinite(randn(gen, n, h, w, c, dtype=dtype, device=device), gen, nan=2, posinf=3, neginf=3)
    scale, shift = randn(gen, c, device=device), randn(gen, c, device=device)
    band = GuardBand((n, c), device=device)
    bn_relu_global_avgpool(x, scale, shift, band.view, BLOCK_C=16, BLOCK_HW=16)
    assert_nonfinite_like(band.view, reference(x, scale, shift), 1e-5)
    band.assert_untouched()


def test_strided_input_and_output(device, gen):
    """x: channel prefix of a wider buffer, NCHW-permuted; out: a non-contiguous column view."""
    n, h, w, c = 2, 7, 6, 37
    x = randn(gen, n, 40, h, w, device=device).permute(0, 2, 3, 1)[..., :c]
    scale, shift = randn(gen, c, device=device), randn(gen, c, device=device)
    band = GuardBand((c, 2 * n), device=device)
    big = band.view
    out = big.T[::2]  # [n, c] with strides (2, 2n + 4)
    bn_relu_global_avgpool(x, scale, shift, out, BLOCK_C=16, BLOCK_HW=16)
    assert_close(out, reference(x, scale, shift), 1e-5)
    assert torch.isnan(big.T[1::2]).all(), "kernel wrote outside its output view"
    band.assert_untouched()


def test_default_block_sizes(device, gen):
    x = randn(gen, 2, 7, 7, 13, device=device)
    scale, shift = randn(gen, 13, device=device), randn(gen, 13, device=device)
    band = GuardBand((2, 13), device=device)
    bn_relu_global_avgpool(x, scale, shift, band.view)
    assert_close(band.view, reference(x, scale, shift), 1e-5)
    band.assert_untouched()


def test_validation_errors(device, gen):
    x = randn(gen, 2, 7, 7, 13, device=device)
    scale, shift = randn(gen, 13, device=device), randn(gen, 13, device=device)
    out = torch.empty(2, 13, device=device)
    with pytest.raises(ValueError, match="out must have shape"):
        bn_relu_global_avgpool(x, scale, shift, torch.empty(2, 12, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        bn_relu_global_avgpool(x, scale, shift, torch.empty(2, 1, 1, 13, device=device))
    with pytest.raises(ValueError, match="out must be float32"):
        bn_relu_global_avgpool(x, scale, shift, out.half())
    with pytest.raises(ValueError, match="scale must have shape"):
        bn_relu_global_avgpool(x, scale[:12], shift, out)
    with pytest.raises(ValueError, match="shift must be float32"):
        bn_relu_global_avgpool(x, scale, shift.half(), out)
    with pytest.raises(ValueError, match="4-D"):
        bn_relu_global_avgpool(x.flatten(1, 2), scale, shift, out)
    with pytest.raises(ValueError, match="BLOCK_C"):
        bn_relu_global_avgpool(x, scale, shift, out, BLOCK_C=20)
