"""stem_conv_v2 (the stem through a packed copy of the caller's image) against float64 PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from densetriton.kernels import pack_conv_weight
from densetriton.kernels.stem_v2 import (
    bind_stem_conv_v2,
    pack_stem_weight,
    stem_conv_v2,
    stem_layout,
    stem_workspace_numel,
)
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

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def reference(x_nchw, w_oikk, bias, *, stride, padding, relu_out):
    """float64 NHWC reference of the stem on the caller's NCHW image."""
    y = F.conv2d(
        x_nchw.double().cpu(),
        w_oikk.double().cpu(),
        None if bias is None else bias.double().cpu(),
        stride=stride,
        padding=padding,
    )
    return (F.relu(y) if relu_out else y).permute(0, 2, 3, 1)


def run_stem(x_nchw, w_oikk, bias, dtype, *, kernel_size, stride, padding, relu_out=True, c_out=None, **tiles):
    """The stem as the plan runs it: x read in place through an NHWC view, the output in a GuardBand,
    a NaN-poisoned workspace. Returns (band, workspace)."""
    n, c_in, h, w = x_nchw.shape
    weight = pack_stem_weight(pack_conv_weight(w_oikk, dtype, x_nchw.device), c_in, kernel_size)
    oh, ow = (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1
    band = GuardBand((n, oh, ow, w_oikk.shape[0]), dtype=dtype, device=x_nchw.device)
    workspace = torch.full(
        (stem_workspace_numel(n, c_in, kernel_size, padding, h, w),), float("nan"), dtype=dtype, device=x_nchw.device
    )
    stem_conv_v2(
        x_nchw.permute(0, 2, 3, 1),
        weight,
        band.view,
        workspace,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        bias=bias,
        relu_out=relu_out,
        **tiles,
    )
    band.assert_untouched()
    return band, workspace


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(
    "n,h,w,c_in,c_out,k,stride,pad,relu_out,tiles",
    [
        # ImageNet stem on RGB, odd size; 16-row tiles leave a row tail, 16 columns a channel tail.
        (2, 13, 11, 3, 24, 7, 2, 3, True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
        # grayscale (CPAD 2: one 16-element K step per kernel row); BLOCK_K capped at the row.
        (2, 12, 9, 1, 16, 7, 2, 3, True, dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128)),
        # five channels (CPAD 8, 64-element rows walked in two K steps each).
        (1, 9, 10, 5, 20, 7, 2, 3, True, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)),
        # a CIFAR stem: 3x3, stride 1, pad 1, no bias, no ReLU (KWP 4, CPAD 4).
        (2, 7, 6, 3, 16, 3, 1, 1, False, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)),
    ],
)
def test_stem_v2_matches_torch(device, gen, dtype, n, h, w, c_in, c_out, k, stride, pad, relu_out, tiles):
    """Fails if a load or store mask is one row/channel/tap too wide (NaN from the surrounding input,
    or a write into the guard band), if the pack leaves part of the workspace unwritten (its NaN
    poison reaches the output), or if the K walk misses a kernel row."""
    x = nan_surrounded(randn(gen, n, c_in, h, w, dtype=dtype, device=device))
    x_bits = x.cpu().view(_BITS[dtype]).clone()
    w_oikk = randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    bias = randn(gen, c_out, device=device) if k == 7 else None
    band, _ = run_stem(x, w_oikk, bias, dtype, kernel_size=k, stride=stride, padding=pad, relu_out=relu_out, **tiles)
    ref = reference(x, w_oikk.to(dtype), bias, stride=stride, padding=pad, relu_out=relu_out)
    assert_close(band.view, ref, dtype)
    assert torch.equal(x.cpu().view(_BITS[dtype]), x_bits), "the caller's image was written"

    again, _ = run_stem(x, w_oikk, bias, dtype, kernel_size=k, stride=stride, padding=pad, relu_out=relu_out, **tiles)
    assert torch.equal(again.view.cpu().view(_BITS[dtype]), band.view.cpu().view(_BITS[dtype])), "two calls differ"


def test_the_workspace_holds_the_padded_nhwc_image(device, gen):
    """Padding and padded channels are written as zeros, the image as it is (NCHW in, NHWC out)."""
    n, c_in, h, w = 2, 3, 5, 6
    x = randn(gen, n, c_in, h, w, device=device)
    _, workspace = run_stem(
        x,
        randn(gen, 16, c_in, 7, 7),
        None,
        torch.float32,
        kernel_size=7,
        stride=2,
        padding=3,
        BLOCK_M=64,
        BLOCK_N=16,
        BLOCK_K=32,
    )
    layout = stem_layout(c_in, 7, 3, h, w)
    assert (layout.kwp, layout.cpad, layout.height) == (8, 4, 11) and layout.width >= w + 7 and layout.width % 4 == 0
    packed = workspace[: layout.numel(n)].view(n, layout.height, layout.width, layout.cpad).cpu()
    expected = torch.zeros_like(packed)
    expected[:, 3 : 3 + h, 3 : 3 + w, :c_in] = x.cpu().permute(0, 2, 3, 1)
    assert torch.equal(packed, expected)


@NONFINITE_OK
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_reach_the_output_where_torchs_do(device, gen, dtype):
    """Also a NaN in the column just right of an output's window (its phantom tap kw = 7): that
    output must stay finite. Fails if the phantom taps are loaded (0 * NaN is NaN)."""
    n, c_in, h, w, c_out = 2, 3, 12, 13, 16
    x = randn(gen, n, c_in, h, w, dtype=dtype)
    plant_nonfinite(x[0], gen)
    x[1, 1, 6, 6] = float("nan")  # padded column 9: phantom tap of output column 1 (window 2..8)
    x = nan_surrounded(x.to(device))
    w_oikk = randn(gen, c_out, c_in, 7, 7) / 12
    bias = randn(gen, c_out, device=device)
    band, _ = run_stem(x, w_oikk, bias, dtype, kernel_size=7, stride=2, padding=3, BLOCK_M=32, BLOCK_N=16, BLOCK_K=32)
    ref = reference(x, w_oikk.to(dtype), bias, stride=2, padding=3, relu_out=True)
    assert ref[1, :, 1].isfinite().all() and ref[1, :, 2].isnan().any()
    assert_nonfinite_like(band.view, ref, dtype)


def test_a_bound_stem_packs_the_weight_once_and_uses_the_given_workspace(device, gen):
    """What the plan binds: bn_relu_conv's weight in, the workspace a prefix of a larger buffer
    (the plan lends block 1's arena), nothing past it written."""
    n, c_in, h, w, c_out = 2, 1, 9, 8, 16
    x = randn(gen, n, c_in, h, w, device=device)
    w_oikk, bias = randn(gen, c_out, c_in, 7, 7) / 7, randn(gen, c_out, device=device)
    numel = stem_workspace_numel(n, c_in, 7, 3, h, w)
    arena = torch.full((numel + 5,), float("nan"), device=device)
    band = GuardBand((n, 5, 4, c_out), device=device)
    launch = bind_stem_conv_v2(
        pack_conv_weight(w_oikk, torch.float32, device),
        band.view,
        in_channels=c_in,
        height=h,
        width=w,
        kernel_size=7,
        stride=2,
        padding=3,
        bias=bias,
        relu_out=True,
        workspace=arena,
        BLOCK_M=32,
        BLOCK_N=16,
        BLOCK_K=16,
    )
    assert torch.isnan(band.view).all(), "binding launched a kernel"
    launch(x.permute(0, 2, 3, 1))
    band.assert_untouched()
    assert_close(band.view, reference(x, w_oikk, bias, stride=2, padding=3, relu_out=True), torch.float32)
    assert not torch.isnan(arena[:numel]).any() and torch.isnan(arena[numel:]).all()


def test_bad_arguments_are_one_clear_error(device, gen):
    n, c_in, h, w = 1, 3, 9, 9
    x = randn(gen, n, h, w, c_in, device=device)
    weight = pack_stem_weight(pack_conv_weight(randn(gen, 16, c_in, 7, 7), torch.float32, device), c_in, 7)
    out = torch.full((n, 5, 5, 16), float("nan"), device=device)
    enough = torch.empty(stem_workspace_numel(n, c_in, 7, 3, h, w), device=device)
    args = dict(kernel_size=7, stride=2, padding=3)
    with pytest.raises(ValueError, match="workspace must hold at least"):
        stem_conv_v2(x, weight, out, enough[:-1], **args)
    with pytest.raises(ValueError, match="workspace must hold at least"):
        stem_conv_v2(x, weight, out, enough.half(), **args)
    with pytest.raises(ValueError, match="pack_stem_weight"):
        stem_conv_v2(x, pack_conv_weight(randn(gen, 16, c_in, 7, 7), torch.float32, device), out, enough, **args)
    with pytest.raises(ValueError, match="out must have shape"):
        stem_conv_v2(x, weight, out[:, :4], enough, **args)
    with pytest.raises(ValueError, match="BLOCK_K must be a power of two"):
        stem_conv_v2(x, weight, out, enough, BLOCK_K=24, **args)
    with pytest.raises(ValueError, match="packed"):
        pack_stem_weight(weight, c_in, 7)
    assert torch.isnan(out).all(), "a refused launch wrote its output"
