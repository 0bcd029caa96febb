"""bn_relu_conv against float64 PyTorch on CPU, over the roles it plays in DenseNet."""

import pytest
import torch
import torch.nn.functional as F
from densetriton.kernels import bn_relu_conv, pack_conv_weight
from helpers import (
    DOT_DTYPES,
    KERNEL_TOL,
    NONFINITE_OK,
    GuardBand,
    assert_close,
    assert_nonfinite_like,
    nan_surrounded,
    plant_nonfinite,
    randn,
    rel_err,
)

DTYPES = DOT_DTYPES
SMALL_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def reference(x, w_oikk, *, stride, padding, scale=None, shift=None, bias=None, relu_out=False):
    """float64 NHWC reference; padding applied to the *activated* tensor, as F.conv2d does."""
    a = x.double().cpu().permute(0, 3, 1, 2)
    if scale is not None:
        a = F.relu(a * scale.double().cpu()[None, :, None, None] + shift.double().cpu()[None, :, None, None])
    y = F.conv2d(
        a, w_oikk.double().cpu(), bias=None if bias is None else bias.double().cpu(), stride=stride, padding=padding
    )
    if relu_out:
        y = F.relu(y)
    return y.permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,h,w,c_in,c_out,k,stride,pad,prologue,bias,relu_out",
    [
        # 1x1 bottleneck: BN1-ReLU prologue, BN2 folded into bias, ReLU epilogue.
        (3, 7, 7, 37, 19, 1, 1, 0, True, True, True),
        # 3x3 over the bottleneck scratch: plain conv, pad 1.
        (2, 9, 5, 13, 5, 3, 1, 1, False, False, False),
        # plain dense layer's 3x3 with the BN-ReLU prologue.
        (2, 7, 7, 37, 19, 3, 1, 1, True, False, False),
        # CIFAR-style stem 3x3 pad 1 with bias + ReLU, three input channels.
        (1, 8, 8, 3, 16, 3, 1, 1, False, True, True),
        # few input channels: K walked flat over (kh, kw, ci), with the prologue and padding.
        (2, 7, 5, 5, 19, 3, 1, 1, True, False, False),
        # strided, unpadded, odd size: rows and taps that stop short of the border.
        (2, 9, 7, 13, 19, 3, 2, 0, True, True, False),
    ],
)
def test_conv_matches_torch(device, gen, dtype, n, h, w, c_in, c_out, k, stride, pad, prologue, bias, relu_out):
    x = nan_surrounded(randn(gen, n, h, w, c_in, dtype=dtype, device=device))
    w_oikk = randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    weight = pack_conv_weight(w_oikk, dtype, device)
    scale = randn(gen, c_in, device=device) if prologue else None
    shift = randn(gen, c_in, device=device) if prologue else None
    b = randn(gen, c_out, device=device) if bias else None
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    band = GuardBand((n, oh, ow, c_out), dtype=dtype, device=device)

    bn_relu_conv(
        x,
        weight,
        band.view,
        kernel_size=k,
        stride=stride,
        padding=pad,
        in_scale=scale,
        in_shift=shift,
        bias=b,
        relu_out=relu_out,
        **SMALL_BLOCKS,
    )

    ref = reference(
        x, w_oikk.to(dtype), stride=stride, padding=pad, scale=scale, shift=shift, bias=b, relu_out=relu_out
    )
    assert_close(band.view, ref, dtype)
    band.assert_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_layer_in_place_concat(device, gen, dtype):
    """Reads the channel prefix buf[..., :c] and writes buf[..., c:c+g] of the same buffer."""
    n, h, w, c, g, c_total = 2, 7, 7, 21, 19, 48
    band = GuardBand((n, h, w, c_total), dtype=dtype, device=device)
    buf = band.view
    buf[..., :c] = randn(gen, n, h, w, c, dtype=dtype, device=device)
    before = buf.clone()
    w_oikk = randn(gen, g, c, 3, 3) / (9 * c) ** 0.5
    weight = pack_conv_weight(w_oikk, dtype, device)
    scale, shift = randn(gen, c, device=device), randn(gen, c, device=device)

    bn_relu_conv(
        buf[..., :c],
        weight,
        buf[..., c : c + g],
        kernel_size=3,
        padding=1,
        in_scale=scale,
        in_shift=shift,
        **SMALL_BLOCKS,
    )

    ref = reference(before[..., :c], w_oikk.to(dtype), stride=1, padding=1, scale=scale, shift=shift)
    assert_close(buf[..., c : c + g], ref, dtype)
    assert torch.equal(buf[..., :c], before[..., :c]), "input channels were modified"
    assert torch.isnan(buf[..., c + g :]).all(), "kernel wrote past its output slice"
    band.assert_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_slice_in_middle_of_wider_buffer(device, gen, dtype):
    """Input: prefix of a wider buffer; output: a middle channel slice; nothing else touched."""
    n, h, w, c_in, c_out = 3, 5, 6, 37, 19
    src = randn(gen, n, h, w, 40, dtype=dtype, device=device)
    band = GuardBand((n, h, w, 30), dtype=dtype, device=device)
    dst = band.view
    w_oikk = randn(gen, c_out, c_in, 1, 1) / c_in**0.5
    weight = pack_conv_weight(w_oikk, dtype, device)
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device)
    bias = randn(gen, c_out, device=device)

    bn_relu_conv(
        src[..., :c_in],
        weight,
        dst[..., 5 : 5 + c_out],
        kernel_size=1,
        in_scale=scale,
        in_shift=shift,
        bias=bias,
        relu_out=True,
        **SMALL_BLOCKS,
    )

    ref = reference(
        src[..., :c_in], w_oikk.to(dtype), stride=1, padding=0, scale=scale, shift=shift, bias=bias, relu_out=True
    )
    assert_close(dst[..., 5 : 5 + c_out], ref, dtype)
    assert torch.isnan(dst[..., :5]).all() and torch.isnan(dst[..., 5 + c_out :]).all()
    band.assert_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w", [(2, 9, 9), (1, 8, 5)])
@pytest.mark.parametrize("c_in", [3, 1], ids=["rgb", "grayscale"])
def test_imagenet_stem_7x7_s2_p3_from_nchw(device, gen, dtype, n, h, w, c_in):
    """The stem reads the caller's NCHW image through a permuted (non-contiguous) view."""
    c_out = 19
    x_nchw = nan_surrounded(randn(gen, n, c_in, h, w, dtype=dtype, device=device))
    w_oikk = randn(gen, c_out, c_in, 7, 7) / (c_in * 49) ** 0.5
    weight = pack_conv_weight(w_oikk, dtype, device)
    bias = randn(gen, c_out, device=device)
    oh, ow = (h + 6 - 7) // 2 + 1, (w + 6 - 7) // 2 + 1
    band = GuardBand((n, oh, ow, c_out), dtype=dtype, device=device)

    x = x_nchw.permute(0, 2, 3, 1)
    assert c_in == 1 or not x.is_contiguous()  # one channel: NCHW and NHWC are the same memory
    bn_relu_conv(
        x,
        weight,
        band.view,
        kernel_size=7,
        stride=2,
        padding=3,
        bias=bias,
        relu_out=True,
        BLOCK_M=16,
        BLOCK_N=16,
        BLOCK_K=16,
    )

    ref = reference(x, w_oikk.to(dtype), stride=2, padding=3, bias=bias, relu_out=True)
    assert_close(band.view, ref, dtype)
    band.assert_untouched()


@pytest.mark.parametrize("w_dtype", DTYPES)
def test_classifier_float32_logits(device, gen, w_dtype):
    """Classifier: pooled features as [N, 1, 1, C], 16-bit weights, float32 logits."""
    n, c, classes = 3, 37, 10
    feats = nan_surrounded(randn(gen, n, c, device=device))
    w_oikk = randn(gen, classes, c, 1, 1) / c**0.5
    weight = pack_conv_weight(w_oikk, w_dtype, device)
    bias = randn(gen, classes, device=device)
    band = GuardBand((n, classes), device=device)

    bn_relu_conv(
        feats.view(n, 1, 1, c), weight, band.view.view(n, 1, 1, classes), kernel_size=1, bias=bias, **SMALL_BLOCKS
    )

    ref = feats.double().cpu() @ w_oikk.to(w_dtype).double()[:, :, 0, 0].T + bias.double().cpu()
    assert_close(band.view, ref, w_dtype)
    band.assert_untouched()


def test_default_block_sizes(device, gen):
    n, h, w, c_in, c_out = 2, 6, 6, 13, 5
    x = randn(gen, n, h, w, c_in, device=device)
    w_oikk = randn(gen, c_out, c_in, 3, 3)
    band = GuardBand((n, h, w, c_out), device=device)
    bn_relu_conv(x, pack_conv_weight(w_oikk, torch.float32, device), band.view, kernel_size=3, padding=1)
    assert_close(band.view, reference(x, w_oikk, stride=1, padding=1), torch.float32)
    band.assert_untouched()


@pytest.mark.parametrize("c_in", [13, 37], ids=["flat-k", "per-tap"])  # FLAT_K below 16 input channels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_is_zero_after_activation(device, gen, dtype, c_in):
    """With a strongly positive shift, relu(0*scale + shift) > 0; padded taps must still add 0."""
    n, h, w, c_out = 2, 5, 5, 5
    x = nan_surrounded(randn(gen, n, h, w, c_in, dtype=dtype, device=device))
    w_oikk = randn(gen, c_out, c_in, 3, 3).abs()  # all-positive: wrong padding can't cancel out
    weight = pack_conv_weight(w_oikk, dtype, device)
    scale = randn(gen, c_in, device=device) * 0.1
    shift = torch.full((c_in,), 5.0, device=device)
    band = GuardBand((n, h, w, c_out), dtype=dtype, device=device)
    out = band.view

    bn_relu_conv(x, weight, out, kernel_size=3, padding=1, in_scale=scale, in_shift=shift, **SMALL_BLOCKS)

    ref = reference(x, w_oikk.to(dtype), stride=1, padding=1, scale=scale, shift=shift)
    assert_close(out, ref, dtype)
    band.assert_untouched()
    # The wrong answer (pad the raw input, then activate) differs by far more than the tolerance.
    xd = x.double().cpu()
    x_padded = F.pad(xd.permute(0, 3, 1, 2), (1, 1, 1, 1))
    a_wrong = F.relu(x_padded * scale.double().cpu()[None, :, None, None] + 5.0)
    wrong = F.conv2d(a_wrong, w_oikk.to(dtype).double()).permute(0, 2, 3, 1)
    assert rel_err(out, wrong) > 10 * KERNEL_TOL[dtype]


def test_validation_errors(device, gen):
    x = randn(gen, 2, 7, 7, 13, device=device)
    weight = pack_conv_weight(randn(gen, 5, 13, 3, 3), torch.float32, device)
    out = torch.empty(2, 7, 7, 5, device=device)
    vec13, vec5 = randn(gen, 13, device=device), randn(gen, 5, device=device)
    ok = dict(kernel_size=3, padding=1)

    with pytest.raises(ValueError, match="out must have shape"):
        bn_relu_conv(x, weight, torch.empty(2, 6, 7, 5, device=device), **ok)
    with pytest.raises(ValueError, match="out must have shape"):
        bn_relu_conv(x, weight, out, kernel_size=3, padding=0)  # out is 7x7 but OH would be 5
    with pytest.raises(ValueError, match="weight must have shape"):
        bn_relu_conv(x, weight, out, kernel_size=1)
    with pytest.raises(ValueError, match="weight must have shape"):
        bn_relu_conv(x, torch.zeros(117, 6, device=device), out, **ok)  # Cout 6 vs out's 5
    with pytest.raises(ValueError, match="unit column stride"):
        bn_relu_conv(x, weight.T.contiguous().T, out, **ok)
    with pytest.raises(ValueError, match="4-D"):
        bn_relu_conv(x[0], weight, out, **ok)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        bn_relu_conv(x.to(torch.int32), weight, out, **ok)
    with pytest.raises(ValueError, match="together"):
        bn_relu_conv(x, weight, out, in_scale=vec13, **ok)
    with pytest.raises(ValueError, match=r"in_scale must have shape \[13\]"):
        bn_relu_conv(x, weight, out, in_scale=vec5, in_shift=vec13, **ok)
    with pytest.raises(ValueError, match="in_shift must be float32"):
        bn_relu_conv(x, weight, out, in_scale=vec13, in_shift=vec13.half(), **ok)
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        bn_relu_conv(x, weight, out, bias=vec13, **ok)
    with pytest.raises(ValueError, match="BLOCK_K"):
        bn_relu_conv(x, weight, out, BLOCK_K=8, **ok)
    with pytest.raises(ValueError, match="BLOCK_M"):
        bn_relu_conv(x, weight, out, BLOCK_M=48, **ok)
    with pytest.raises(ValueError, match="too small"):
        bn_relu_conv(x[:, :2, :2], weight, out, **dict(ok, padding=0))


def test_pack_conv_weight_layout(gen):
    w = randn(gen, 5, 3, 2, 4)
    packed = pack_conv_weight(w, torch.float16)
    assert packed.shape == (2 * 4 * 3, 5) and packed.dtype == torch.float16
    assert packed.stride() == (16, 1)  # rows padded to WEIGHT_ROW_ALIGN elements
    for kh, kw, ci, co in [(0, 0, 0, 0), (1, 3, 2, 4), (1, 0, 1, 2), (0, 2, 2, 1)]:
        assert packed[(kh * 4 + kw) * 3 + ci, co] == w[co, ci, kh, kw].half()
    with pytest.raises(ValueError):
        pack_conv_weight(w[0], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_padded_and_dense_weight_rows_give_the_same_result(device, gen, dtype, k):
    """The kernel walks weight rows by stride(0): packed rows padded to 16 elements (the default)
    and a dense copy must give bitwise the same output."""
    n, h, w, c_in, c_out = 2, 5, 6, 21, 19
    x = nan_surrounded(randn(gen, n, h, w, c_in, dtype=dtype, device=device))
    padded = pack_conv_weight(randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5, dtype, device)
    dense = padded.contiguous()
    assert padded.stride(0) == 32 and dense.stride(0) == c_out
    # The padding columns are never read: poison them.
    torch.as_strided(padded, (padded.shape[0], 32 - c_out), (32, 1), padded.storage_offset() + c_out).fill_(
        float("nan")
    )
    scale, shift = randn(gen, c_in, device=device), randn(gen, c_in, device=device)
    outs = []
    for weight in (padded, dense):
        band = GuardBand((n, h, w, c_out), dtype=dtype, device=device)
        bn_relu_conv(
            x, weight, band.view, kernel_size=k, padding=k // 2, in_scale=scale, in_shift=shift, **SMALL_BLOCKS
        )
        band.assert_untouched()
        outs.append(band.view)
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


def test_one_output_channel_weight_of_any_column_stride(device, gen):
    """A [K, 1] weight's column stride is never used (torch calls such a tensor contiguous)."""
    n, h, w, c_in = 2, 5, 5, 7
    x = randn(gen, n, h, w, c_in, device=device)
    w_oikk = randn(gen, 1, c_in, 3, 3)
    dense = pack_conv_weight(w_oikk, torch.float32, device).contiguous()
    weight = torch.as_strided(dense, (9 * c_in, 1), (1, 1000))  # a column stride nobody walks
    assert weight.shape == (9 * c_in, 1) and weight.stride(1) != 1
    band = GuardBand((n, h, w, 1), device=device)
    bn_relu_conv(x, weight, band.view, kernel_size=3, padding=1, **SMALL_BLOCKS)
    assert_close(band.view, reference(x, w_oikk, stride=1, padding=1), torch.float32)
    band.assert_untouched()


# (k, stride, pad, prologue, bias, relu_out, c_in): each role of the kernel in DenseNet.
NONFINITE_ROLES = {
    "bottleneck-1x1": (1, 1, 0, True, True, True, 21),
    "dense-3x3-prologue": (3, 1, 1, True, False, False, 21),
    "flat-k-3x3-prologue": (3, 1, 1, True, False, False, 5),
    "plain-3x3": (3, 1, 1, False, False, False, 13),
    "stem-7x7-s2": (7, 2, 3, False, True, True, 3),
}


@NONFINITE_OK
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("role", NONFINITE_ROLES)
def test_nan_and_inf_reach_the_output_where_torchs_do(device, gen, dtype, role):
    """NaN and Inf in the input reach exactly torch's output positions: the prologue's and the
    epilogue's ReLU keep NaN and zero -Inf, Infs of both signs meeting in a sum give NaN. Fails
    when the ReLU drops NaN (tl.maximum(x, 0.0) in kernels/_math.py's _relu) in every role with a
    ReLU; the plain 3x3 checks the GEMM and the padding alone."""
    k, stride, pad, prologue, bias, relu_out, c_in = NONFINITE_ROLES[role]
    n, h, w, c_out = 2, 8 if k == 7 else 5, 8 if k == 7 else 6, 19
    x = plant_nonfinite(randn(gen, n, h, w, c_in, dtype=dtype, device=device), gen, nan=1, posinf=2, neginf=2)
    w_oikk = randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    scale = randn(gen, c_in, device=device) if prologue else None
    shift = randn(gen, c_in, device=device) if prologue else None
    b = randn(gen, c_out, device=device) if bias else None
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    band = GuardBand((n, oh, ow, c_out), dtype=dtype, device=device)

    bn_relu_conv(
        x,
        pack_conv_weight(w_oikk, dtype, device),
        band.view,
        kernel_size=k,
        stride=stride,
        padding=pad,
        in_scale=scale,
        in_shift=shift,
        bias=b,
        relu_out=relu_out,
        **SMALL_BLOCKS,
    )

    ref = reference(
        x, w_oikk.to(dtype), stride=stride, padding=pad, scale=scale, shift=shift, bias=b, relu_out=relu_out
    )
    assert_nonfinite_like(band.view, ref, dtype)
    band.assert_untouched()


@NONFINITE_OK
def test_nan_and_inf_in_the_classifiers_features_reach_its_logits(device, gen):
    n, c, classes = 4, 37, 10
    feats = plant_nonfinite(randn(gen, n, c, device=device), gen, nan=1, posinf=1, neginf=1)
    w_oikk = randn(gen, classes, c, 1, 1) / c**0.5
    bias = randn(gen, classes, device=device)
    band = GuardBand((n, classes), device=device)

    bn_relu_conv(
        feats.view(n, 1, 1, c),
        pack_conv_weight(w_oikk, torch.float32, device),
        band.view.view(n, 1, 1, classes),
        kernel_size=1,
        bias=bias,
        **SMALL_BLOCKS,
    )

    ref = feats.double().cpu() @ w_oikk.double()[:, :, 0, 0].T + bias.double().cpu()
    assert_nonfinite_like(band.view, ref, torch.float32)
    band.assert_untouched()
