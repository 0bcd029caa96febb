"""bn_relu_conv_v2 (the 1x1 without the padding select, the flattened (tap, channel) K loop)
against float64 PyTorch, over the roles it plays in DenseNet and the shapes that reach its edges.

Every input is a channel prefix of a wider buffer whose other channels are NaN, and the packed
weights, scale and shift are views whose elements past their ends are NaN: a load that is not
masked to C_in (or K) brings a NaN into the output, so these tests fail if the 1x1's dropped
select was relied on for anything but rows that are never stored.
"""

import pytest
import torch
import torch.nn.functional as F
from densetriton.kernels import bn_relu_conv_v2, pack_conv_weight
from helpers import DOT_DTYPES, NONFINITE_OK, GuardBand, assert_close, assert_nonfinite_like, plant_nonfinite, randn

NAN = float("nan")


def reference(x, w_oikk, *, stride, padding, scale=None, shift=None, bias=None, relu_out=False):
    """float64 NHWC reference; padding applied to the *activated* tensor, as F.conv2d does."""
    a = x.double().cpu().permute(0, 3, 1, 2)
    if scale is not None:
        a = F.relu(a * scale.double().cpu()[None, :, None, None] + shift.double().cpu()[None, :, None, None])
    y = F.conv2d(
        a, w_oikk.double().cpu(), bias=None if bias is None else bias.double().cpu(), stride=stride, padding=padding
    )
    return (F.relu(y) if relu_out else y).permute(0, 2, 3, 1)


def nan_tailed(values: torch.Tensor, extra: int) -> torch.Tensor:
    """`values` as a view of a longer 1-D tensor whose trailing `extra` elements are NaN."""
    big = torch.full((values.shape[0] + extra,), NAN, dtype=values.dtype, device=values.device)
    big[: values.shape[0]] = values
    return big[: values.shape[0]]


def nan_tailed_weight(w_oikk, dtype, device) -> torch.Tensor:
    """pack_conv_weight's [K, Cout] operand, as rows of a larger tensor whose 16 extra rows are NaN."""
    packed = pack_conv_weight(w_oikk, dtype, device)
    big = torch.full((packed.shape[0] + 16, packed.stride(0)), NAN, dtype=dtype, device=device)
    big[: packed.shape[0], : packed.shape[1]] = packed
    return big[: packed.shape[0], : packed.shape[1]]


def layer(gen, device, dtype, n, h, w, c_in, c_out, k, prologue, bias):
    """Random inputs: x as the channel prefix of a NaN-tailed buffer, NaN-tailed weight/scale/shift."""
    buf = torch.full((n, h, w, c_in + 19), NAN, dtype=dtype, device=device)
    buf[..., :c_in] = randn(gen, n, h, w, c_in, dtype=dtype, device=device)
    w_oikk = randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    weight = nan_tailed_weight(w_oikk, dtype, device)
    scale = nan_tailed(randn(gen, c_in, device=device), 16) if prologue else None
    shift = nan_tailed(randn(gen, c_in, device=device) + 0.5, 16) if prologue else None  # relu(shift) > 0 mostly
    b = randn(gen, c_out, device=device) if bias else None
    return buf[..., :c_in], w_oikk.to(dtype), weight, scale, shift, b


CASES = [
    # n, h, w, c_in, c_out, k, stride, pad, prologue, bias, relu_out, blocks (M, N, K)
    # 1x1 bottleneck (BN1-ReLU prologue, BN2 folded into bias, ReLU): C_in tail in a 32-wide K step.
    (3, 7, 7, 37, 19, 1, 1, 0, True, True, True, (64, 16, 32)),
    # 1x1, C_in a multiple of the K step, several K steps, odd image, rows past the last pixel.
    (2, 5, 3, 64, 40, 1, 1, 0, True, True, True, (16, 32, 16)),
    # 1x1 without prologue (the classifier's role), one pixel per image.
    (5, 1, 1, 48, 21, 1, 1, 0, False, True, False, (16, 16, 16)),
    # 3x3 over the bottleneck scratch (no prologue), C_in over three K steps per tap.
    (2, 5, 5, 48, 12, 3, 1, 1, False, False, False, (64, 16, 16)),
    # 3x3, C_in = 13: one partly masked K step per tap.
    (2, 6, 7, 13, 5, 3, 1, 1, False, False, False, (64, 16, 16)),
    # plain dense layer's 3x3 with the prologue: padding must stay 0, not relu(shift); C_in tail.
    (2, 5, 6, 37, 19, 3, 1, 1, True, False, False, (64, 32, 32)),
    # strided, unpadded, odd size: taps that stop short of the border.
    (2, 9, 7, 13, 19, 3, 2, 0, True, True, False, (16, 32, 16)),
    # grayscale stem: 7x7/2, pad 3, one input channel, bias + ReLU.
    (2, 11, 9, 1, 16, 7, 2, 3, False, True, True, (64, 16, 16)),
]


# Called a second time, and bitwise the same: one case per kernel (the 1x1 and the tap loop).
REPEATED = {(1, 37), (3, 48)}


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("n,h,w,c_in,c_out,k,stride,pad,prologue,bias,relu_out,blocks", CASES)
def test_v2_matches_torch(device, gen, dtype, n, h, w, c_in, c_out, k, stride, pad, prologue, bias, relu_out, blocks):
    x, w_ref, weight, scale, shift, b = layer(gen, device, dtype, n, h, w, c_in, c_out, k, prologue, bias)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    band = GuardBand((n, oh, ow, c_out), dtype=dtype, device=device)
    kwargs = dict(
        kernel_size=k,
        stride=stride,
        padding=pad,
        in_scale=scale,
        in_shift=shift,
        bias=b,
        relu_out=relu_out,
        BLOCK_M=blocks[0],
        BLOCK_N=blocks[1],
        BLOCK_K=blocks[2],
    )

    bn_relu_conv_v2(x, weight, band.view, **kwargs)

    ref = reference(x, w_ref, stride=stride, padding=pad, scale=scale, shift=shift, bias=b, relu_out=relu_out)
    assert_close(band.view, ref, dtype)
    band.assert_untouched()
    if (k, c_in) in REPEATED:
        first = band.view.clone()
        band.view.fill_(NAN)
        bn_relu_conv_v2(x, weight, band.view, **kwargs)
        assert torch.equal(band.view, first), "two calls on the same inputs differ"


@NONFINITE_OK
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,pad,prologue,relu_out", [(1, 0, True, True), (3, 1, False, False), (3, 1, True, True)])
def test_nan_and_inf_go_where_torchs_go(device, gen, dtype, k, pad, prologue, relu_out):
    """NaN stays NaN through both ReLUs (tl.maximum without propagate_nan would make it 0), and
    +-Inf give +-Inf or NaN exactly where torch's convolution does."""
    n, h, w, c_in, c_out = 2, 5, 6, 21, 17  # C_in: one full and one partial K step of 16
    x, w_ref, weight, scale, shift, b = layer(gen, device, dtype, n, h, w, c_in, c_out, k, prologue, relu_out)
    if prologue:
        scale.copy_(scale.abs() + 0.1)  # a positive scale, so +Inf survives the ReLU
    plant_nonfinite(x, gen)
    band = GuardBand((n, h, w, c_out), dtype=dtype, device=device)

    bn_relu_conv_v2(
        x,
        weight,
        band.view,
        kernel_size=k,
        padding=pad,
        in_scale=scale,
        in_shift=shift,
        bias=b,
        relu_out=relu_out,
        BLOCK_M=64,
        BLOCK_N=32,
        BLOCK_K=16,
    )

    ref = reference(x, w_ref, stride=1, padding=pad, scale=scale, shift=shift, bias=b, relu_out=relu_out)
    assert_nonfinite_like(band.view, ref, dtype)
    band.assert_untouched()


def test_same_arguments_and_errors_as_v1(device, gen):
    x = randn(gen, 1, 4, 4, 8, device=device)
    weight = pack_conv_weight(randn(gen, 4, 8, 3, 3), torch.float32, device)
    out = torch.empty(1, 4, 4, 4, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        bn_relu_conv_v2(x, weight, out, kernel_size=1)
    with pytest.raises(ValueError, match="BLOCK_K must be a power of two >= 16"):
        bn_relu_conv_v2(x, weight, out, kernel_size=3, padding=1, BLOCK_K=24)
    with pytest.raises(ValueError, match="kernels up to 31x31, got 33x1"):
        bn_relu_conv_v2(
            randn(gen, 1, 40, 4, 1, device=device),
            pack_conv_weight(randn(gen, 4, 1, 33, 1), torch.float32, device),
            torch.empty(1, 8, 4, 4, device=device),
            kernel_size=(33, 1),
        )
    with pytest.raises(ValueError, match="in_scale and in_shift must be given together"):
        bn_relu_conv_v2(x, weight, out, kernel_size=3, padding=1, in_scale=randn(gen, 8, device=device))


SPLIT_CASES = [
    # n, h, w, c_in, c_out, k, pad, prologue, bias, relu_out, blocks (M, N, K), split_k
    # 1x1 bottleneck at batch 1: 5 channel blocks in 2 splits (3 + 2), the last one partly masked.
    (1, 3, 3, 70, 24, 1, 0, True, True, True, (16, 16, 16), 2),
    # 1x1, more splits than the 3 channel blocks: the fourth split adds nothing and stays right.
    (2, 2, 3, 40, 19, 1, 0, True, False, False, (16, 16, 16), 4),
    # 3x3 over the scratch: 9 taps x 2 channel blocks = 18 steps in 4 splits, each starting mid-tap.
    (1, 4, 5, 24, 12, 3, 1, False, False, False, (16, 16, 16), 4),
    # plain dense layer's 3x3 with the prologue and padding, 3 splits of 9 taps x 1 block.
    (2, 3, 3, 13, 7, 3, 1, True, True, True, (16, 16, 16), 3),
]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("n,h,w,c_in,c_out,k,pad,prologue,bias,relu_out,blocks,split_k", SPLIT_CASES)
def test_split_k_matches_torch_and_repeats_bit_for_bit(
    device, gen, dtype, n, h, w, c_in, c_out, k, pad, prologue, bias, relu_out, blocks, split_k
):
    """Partials in a NaN-poisoned workspace, reduced in split order: float64 PyTorch's result, the
    same bits on a second call, nothing written outside the output or past the workspace's need."""
    from densetriton.kernels import split_k_workspace_numel

    x, w_ref, weight, scale, shift, b = layer(gen, device, dtype, n, h, w, c_in, c_out, k, prologue, bias)
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    band = GuardBand((n, oh, ow, c_out), dtype=dtype, device=device)
    need = split_k_workspace_numel(n * oh * ow, c_out, split_k)
    workspace = torch.full((need + 64,), NAN, dtype=torch.float32, device=device)
    kwargs = dict(kernel_size=k, padding=pad, in_scale=scale, in_shift=shift, bias=b, relu_out=relu_out)
    tiles = dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2], SPLIT_K=split_k, workspace=workspace)

    bn_relu_conv_v2(x, weight, band.view, **kwargs, **tiles)

    ref = reference(x, w_ref, stride=1, padding=pad, scale=scale, shift=shift, bias=b, relu_out=relu_out)
    assert_close(band.view, ref, dtype)
    band.assert_untouched()
    assert torch.isnan(workspace[need:]).all()
    first = band.view.clone()
    band.view.fill_(NAN)
    workspace[:need].fill_(NAN)
    bn_relu_conv_v2(x, weight, band.view, **kwargs, **tiles)
    assert torch.equal(band.view, first), "two calls on the same inputs differ"


def test_split_k_needs_the_callers_workspace(device, gen):
    x, _, weight, *_ = layer(gen, device, torch.float32, 1, 2, 2, 32, 16, 1, False, False)
    out = torch.empty(1, 2, 2, 16, device=device)
    with pytest.raises(ValueError, match="needs a float32 workspace"):
        bn_relu_conv_v2(x, weight, out, kernel_size=1, SPLIT_K=2)
    small = torch.empty(2 * 4 * 16 - 1, device=device)
    with pytest.raises(ValueError, match="at least 128 elements"):
        bn_relu_conv_v2(x, weight, out, kernel_size=1, SPLIT_K=2, workspace=small)
    with pytest.raises(ValueError, match="SPLIT_K must be a positive int"):
        bn_relu_conv_v2(x, weight, out, kernel_size=1, SPLIT_K=0)


@pytest.mark.parametrize("k,pad,split_k", [(1, 0, 1), (1, 0, 2), (3, 1, 1), (3, 1, 4)])
def test_programmatic_dependent_launch_gives_the_same_bits(device, gen, k, pad, split_k):
    """pdl=True: a producer conv (a long K loop) writes `mid`, a consumer conv (split or not, its
    reduction too) reads it; both PDL launches. On a GPU each round is queued behind a sleeping
    kernel, so every grid is launched while the one before it runs: a program that read before
    its wait would see the previous round's `mid` or partials (other inputs, NaN-refilled
    workspace) and differ from the same chain without PDL. The interpreter runs launches whole
    and in order: there it is one round of the same call."""
    cuda = device == "cuda"
    c_in, c_mid, c_out = (2048 if cuda else 40), 32, 24
    _, _, w_producer, scale, shift, b_producer = layer(gen, device, torch.float16, 2, 5, 6, c_in, c_mid, 1, True, True)
    _, w_ref, w_consumer, scale2, shift2, b = layer(gen, device, torch.float16, 2, 5, 6, c_mid, c_out, k, True, True)
    workspace = torch.empty(split_k * 2 * 5 * 6 * c_out + 64, dtype=torch.float32, device=device)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)

    def chain(x, mid, out, pdl):
        bn_relu_conv_v2(
            x,
            w_producer,
            mid,
            kernel_size=1,
            in_scale=scale,
            in_shift=shift,
            bias=b_producer,
            relu_out=True,
            pdl=pdl,
            **tiles,
        )
        bn_relu_conv_v2(
            mid,
            w_consumer,
            out,
            kernel_size=k,
            padding=pad,
            in_scale=scale2,
            in_shift=shift2,
            bias=b,
            relu_out=True,
            SPLIT_K=split_k,
            workspace=workspace,
            pdl=pdl,
            **tiles,
        )

    mids = [torch.full((2, 5, 6, c_mid), NAN, dtype=torch.float16, device=device) for _ in range(2)]
    outs = [torch.full((2, 5, 6, c_out), NAN, dtype=torch.float16, device=device) for _ in range(2)]
    for _ in range(20 if cuda else 1):
        x = randn(gen, 2, 5, 6, c_in, dtype=torch.float16, device=device)
        chain(x, mids[0], outs[0], pdl=False)
        workspace.fill_(NAN)
        if cuda:
            torch.cuda._sleep(2_000_000)  # ~1 ms: the chain's launches queue up behind it
        chain(x, mids[1], outs[1], pdl=True)
        assert torch.equal(outs[1], outs[0]) and torch.equal(mids[1], mids[0])
        workspace.fill_(NAN)
    ref = reference(mids[0], w_ref, stride=1, padding=pad, scale=scale2, shift=shift2, bias=b, relu_out=True)
    assert_close(outs[0], ref, torch.float16)
