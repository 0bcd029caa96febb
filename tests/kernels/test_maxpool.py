"""max_pool_3x3_s2 against F.max_pool2d(kernel_size=3, stride=2, padding=1) in float64."""

import pytest
import torch
import torch.nn.functional as F
from densetriton.kernels import max_pool_3x3_s2
from helpers import GuardBand, assert_nonfinite_like, nan_surrounded, plant_nonfinite, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot: bfloat16 is fine in the interpreter


def reference(x):
    y = F.max_pool2d(x.double().cpu().permute(0, 3, 1, 2), kernel_size=3, stride=2, padding=1)
    return y.permute(0, 2, 3, 1)


def out_size(s):
    return (s + 2 - 3) // 2 + 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,c", [(3, 7, 7, 37), (2, 9, 5, 13), (1, 8, 8, 16), (2, 1, 2, 5)])
def test_maxpool_matches_torch(device, gen, dtype, n, h, w, c):
    x = nan_surrounded(randn(gen, n, h, w, c, dtype=dtype, device=device))
    band = GuardBand((n, out_size(h), out_size(w), c), dtype=dtype, device=device)
    out = band.view
    max_pool_3x3_s2(x, out, BLOCK_M=16, BLOCK_C=16)
    assert not torch.isnan(out).any()
    # A max selects one input element, so the result is exact in every dtype.
    assert torch.equal(out.double().cpu(), reference(x))
    band.assert_untouched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_reach_the_output_where_torchs_do(device, gen, dtype):
    """NaN wins every window it is in, as in torch. Fails when the kernel's max drops NaN
    (`v > result` alone, or tl.maximum(result, v))."""
    n, h, w, c = 2, 7, 6, 5
    x = plant_nonfinite(randn(gen, n, h, w, c, dtype=dtype, device=device), gen, nan=2, posinf=2, neginf=2)
    band = GuardBand((n, out_size(h), out_size(w), c), dtype=dtype, device=device)
    max_pool_3x3_s2(x, band.view, BLOCK_M=16, BLOCK_C=16)
    assert_nonfinite_like(band.view, reference(x), 0.0)
    band.assert_untouched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_is_minus_infinity(device, gen, dtype):
    """All inputs negative: a zero-padded pool would return 0 on every border output."""
    n, h, w, c = 2, 7, 6, 13
    x = (-(randn(gen, n, h, w, c).abs()) - 1.0).to(dtype).to(device)
    band = GuardBand((n, out_size(h), out_size(w), c), dtype=dtype, device=device)
    out = band.view
    max_pool_3x3_s2(x, out, BLOCK_M=16, BLOCK_C=16)
    assert (out < 0).all()
    assert torch.equal(out.double().cpu(), reference(x))
    band.assert_untouched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_views_nchw_input_and_middle_output_slice(device, gen, dtype):
    """Input: an NCHW tensor permuted to NHWC (not contiguous); output: middle channel slice."""
    n, h, w, c = 2, 9, 7, 19
    x = randn(gen, n, c, h, w, dtype=dtype, device=device).permute(0, 2, 3, 1)
    band = GuardBand((n, out_size(h), out_size(w), 32), dtype=dtype, device=device)
    dst = band.view
    max_pool_3x3_s2(x, dst[..., 4 : 4 + c], BLOCK_M=16, BLOCK_C=16)
    assert torch.equal(dst[..., 4 : 4 + c].double().cpu(), reference(x))
    assert torch.isnan(dst[..., :4]).all() and torch.isnan(dst[..., 4 + c :]).all()
    band.assert_untouched()


def test_prefix_input_slice_default_blocks(device, gen):
    buf = randn(gen, 2, 8, 8, 40, device=device)
    x = buf[..., :37]
    band = GuardBand((2, 4, 4, 37), device=device)
    max_pool_3x3_s2(x, band.view)
    assert torch.equal(band.view.double().cpu(), reference(x))
    band.assert_untouched()


def test_validation_errors(device, gen):
    x = randn(gen, 2, 7, 7, 13, device=device)
    with pytest.raises(ValueError, match="out must have shape"):
        max_pool_3x3_s2(x, torch.empty(2, 3, 3, 13, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        max_pool_3x3_s2(x, torch.empty(2, 4, 4, 12, device=device))
    with pytest.raises(ValueError, match="4-D"):
        max_pool_3x3_s2(x[0], torch.empty(4, 4, 13, device=device))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        max_pool_3x3_s2(x.double(), torch.empty(2, 4, 4, 13, device=device))
    with pytest.raises(ValueError, match="BLOCK_C"):
        max_pool_3x3_s2(x, torch.empty(2, 4, 4, 13, device=device), BLOCK_C=12)
