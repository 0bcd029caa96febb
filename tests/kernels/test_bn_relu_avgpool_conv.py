"""bn_relu_avgpool_conv (DenseNet transition) against torchvision's order of operations.

The reference is avgpool(conv1x1(relu(bn(x)))) in float64, i.e. what torchvision's
_Transition computes; the kernel pools first, so agreement also checks the commutation.
"""

import pytest
import torch
import torch.nn.functional as F
from densetriton.kernels import bn_relu_avgpool_conv, pack_conv_weight
from helpers import (
    DOT_DTYPES,
    NONFINITE_OK,
    GuardBand,
    assert_close,
    assert_nonfinite_like,
    nan_surrounded,
    plant_nonfinite,
    randn,
)

DTYPES = DOT_DTYPES
SMALL_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def reference(x, w_oikk, scale, shift):
    a = x.double().cpu().permute(0, 3, 1, 2)
    a = F.relu(a * scale.double().cpu()[None, :, None, None] + shift.double().cpu()[None, :, None, None])
    y = F.avg_pool2d(F.conv2d(a, w_oikk.double().cpu()), kernel_size=2, stride=2)
    return y.permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,h,w,c_in,c_out",
    [
        (2, 8, 8, 37, 19),  # even size, channel tails in K and N
        (3, 7, 7, 13, 5),  # odd size: last row/column dropped (floor), as nn.AvgPool2d(2, 2)
        (1, 9, 5, 40, 16),  # odd and non-square; Cout exactly one block
    ],
)
def test_transition_matches_torchvision_order(device, gen, dtype, n, h, w, c_in, c_out):
    x = nan_surrounded(randn(gen, n, h, w, c_in, dtype=dtype, device=device))
    w_oikk = randn(gen, c_out, c_in, 1, 1) / c_in**0.5
    weight = pack_conv_weight(w_oikk, dtype, device)
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device)
    band = GuardBand((n, h // 2, w // 2, c_out), dtype=dtype, device=device)

    bn_relu_avgpool_conv(x, weight, band.view, in_scale=scale, in_shift=shift, **SMALL_BLOCKS)

    assert_close(band.view, reference(x, w_oikk.to(dtype), scale, shift), dtype)
    band.assert_untouched()


@NONFINITE_OK
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_reach_the_output_where_torchs_do(device, gen, dtype):
    """NaN and Inf in the input give NaN and Inf at torchvision's output positions (the ReLU keeps
    NaN, turns -Inf to 0; Infs of both signs meeting in a sum give NaN). Fails when the ReLU drops
    NaN (tl.maximum(x, 0.0) in kernels/_math.py's _relu)."""
    n, h, w, c_in, c_out = 2, 7, 6, 13, 5
    x = plant_nonfinite(randn(gen, n, h, w, c_in, dtype=dtype, device=device), gen, nan=2, posinf=3, neginf=3)
    w_oikk = randn(gen, c_out, c_in, 1, 1) / c_in**0.5
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device)
    band = GuardBand((n, h // 2, w // 2, c_out), dtype=dtype, device=device)
    bn_relu_avgpool_conv(
        x, pack_conv_weight(w_oikk, dtype, device), band.view, in_scale=scale, in_shift=shift, **SMALL_BLOCKS
    )
    assert_nonfinite_like(band.view, reference(x, w_oikk.to(dtype), scale, shift), dtype)
    band.assert_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_input_and_middle_output_slices(device, gen, dtype):
    """Input is buf[..., :37] of a 40-channel buffer; output is the middle of a wider buffer."""
    n, h, w, c_in, c_out = 2, 7, 9, 37, 19
    src = randn(gen, n, h, w, 40, dtype=dtype, device=device)
    band = GuardBand((n, h // 2, w // 2, 32), dtype=dtype, device=device)
    dst = band.view
    w_oikk = randn(gen, c_out, c_in, 1, 1) / c_in**0.5
    weight = pack_conv_weight(w_oikk, dtype, device)
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device).abs()

    bn_relu_avgpool_conv(
        src[..., :c_in], weight, dst[..., 6 : 6 + c_out], in_scale=scale, in_shift=shift, **SMALL_BLOCKS
    )

    assert_close(dst[..., 6 : 6 + c_out], reference(src[..., :c_in], w_oikk.to(dtype), scale, shift), dtype)
    assert torch.isnan(dst[..., :6]).all() and torch.isnan(dst[..., 6 + c_out :]).all()
    band.assert_untouched()


def test_default_block_sizes(device, gen):
    n, h, w, c_in, c_out = 2, 6, 6, 13, 5
    x = randn(gen, n, h, w, c_in, device=device)
    w_oikk = randn(gen, c_out, c_in, 1, 1)
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device)
    band = GuardBand((n, 3, 3, c_out), device=device)
    bn_relu_avgpool_conv(x, pack_conv_weight(w_oikk, torch.float32, device), band.view, in_scale=scale, in_shift=shift)
    assert_close(band.view, reference(x, w_oikk, scale, shift), torch.float32)
    band.assert_untouched()


def test_validation_errors(device, gen):
    x = randn(gen, 2, 7, 7, 13, device=device)
    weight = pack_conv_weight(randn(gen, 5, 13, 1, 1), torch.float32, device)
    out = torch.empty(2, 3, 3, 5, device=device)
    scale, shift = randn(gen, 13, device=device), randn(gen, 13, device=device)
    ok = dict(in_scale=scale, in_shift=shift)

    with pytest.raises(ValueError, match="out must have shape"):
        bn_relu_avgpool_conv(x, weight, torch.empty(2, 4, 4, 5, device=device), **ok)  # ceil, not floor
    with pytest.raises(ValueError, match="weight must be a prepacked"):
        bn_relu_avgpool_conv(x, pack_conv_weight(randn(gen, 5, 13, 3, 3), torch.float32), out, **ok)
    with pytest.raises(ValueError, match="unit column stride"):
        bn_relu_avgpool_conv(x, weight.T.contiguous().T, out, **ok)
    with pytest.raises(ValueError, match="in_scale must have shape"):
        bn_relu_avgpool_conv(x, weight, out, in_scale=scale[:5], in_shift=shift)
    with pytest.raises(ValueError, match="in_shift must be float32"):
        bn_relu_avgpool_conv(x, weight, out, in_scale=scale, in_shift=shift.double())
    with pytest.raises(ValueError, match="4-D"):
        bn_relu_avgpool_conv(x.flatten(1, 2), weight, out, **ok)
    with pytest.raises(ValueError, match="too small"):
        bn_relu_avgpool_conv(x[:, :1], weight, out[:, :0], **ok)
    with pytest.raises(ValueError, match="BLOCK_N"):
        bn_relu_avgpool_conv(x, weight, out, BLOCK_N=24, **ok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_and_dense_weight_rows_give_the_same_result(device, gen, dtype):
    n, h, w, c_in, c_out = 2, 6, 6, 21, 19
    x = nan_surrounded(randn(gen, n, h, w, c_in, dtype=dtype, device=device))
    padded = pack_conv_weight(randn(gen, c_out, c_in, 1, 1) / c_in**0.5, dtype, device)
    dense = padded.contiguous()
    assert padded.stride(0) == 32 and dense.stride(0) == c_out
    # The padding columns are never read: poison them.
    torch.as_strided(padded, (c_in, 32 - c_out), (32, 1), padded.storage_offset() + c_out).fill_(float("nan"))
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device)
    outs = []
    for weight in (padded, dense):
        band = GuardBand((n, h // 2, w // 2, c_out), dtype=dtype, device=device)
        bn_relu_avgpool_conv(x, weight, band.view, in_scale=scale, in_shift=shift, **SMALL_BLOCKS)
        band.assert_untouched()
        outs.append(band.view)
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])
