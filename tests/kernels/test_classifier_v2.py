"""classifier_v2 (float32 logits from split TF32 products) against a float64 reference."""

import pytest
import torch
from densetriton.kernels import pack_conv_weight
from densetriton.kernels.classifier_v2 import classifier_v2
from helpers import NONFINITE_OK, GuardBand, assert_close, assert_nonfinite_like, nan_surrounded, plant_nonfinite, randn

FLOAT32_TOL = 1e-5  # what float32 arithmetic gives; one TF32 dot is ~1e-3


def packed(w_classes_c):
    """[classes, C] -> the [C, classes] operand the plan folds (pack_conv_weight of a 1x1 conv)."""
    return pack_conv_weight(w_classes_c[:, :, None, None], torch.float32)


def features_like_the_heads(gen, n, c, device):
    """Non-negative pooled activations over a few decades, with full float32 mantissas."""
    return (torch.rand(n, c, generator=gen) * 10.0 ** torch.randint(-2, 2, (n, c), generator=gen)).to(device)


def run(features, w, bias, **tiles):
    band = GuardBand((features.shape[0], w.shape[0]), device=features.device)
    classifier_v2(features, packed(w).to(features.device), band.view, bias=bias, **tiles)
    band.assert_untouched()
    return band.view


def reference(features, w, bias):
    return features.double().cpu() @ w.double().cpu().T + bias.double().cpu()


@pytest.mark.parametrize(
    "n,c,classes,tiles",
    [
        (1, 64, 1000, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=32)),  # ImageNet's classes, batch 1
        (5, 64, 1000, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16)),  # batch 5: rows past it are masked
        (5, 37, 14, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),  # odd classes and features: tails on N and K
        (3, 40, 18, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)),
        (2, 16, 100_003, dict(BLOCK_M=16, BLOCK_N=16384, BLOCK_K=16)),  # 100,000-ish classes
    ],
)
def test_logits_are_float32_accurate(device, gen, n, c, classes, tiles):
    """Each logit within 1e-5 of float64, relative to the size of its terms. Fails if any of the
    three split products is dropped (the lo parts carry the mantissa bits past TF32's 10: ~1e-4)."""
    if device != "cpu":  # 16384 columns keep the interpreter quick; a GPU has shared memory for 128
        tiles = dict(tiles, BLOCK_N=min(tiles["BLOCK_N"], 128))
    features = nan_surrounded(features_like_the_heads(gen, n, c, device))
    w = randn(gen, classes, c) / c**0.5
    bias = randn(gen, classes, device=device)
    out = run(features, w, bias, **tiles)
    ref = reference(features, w, bias)
    assert_close(out, ref, FLOAT32_TOL)
    scale = features.double().cpu().abs() @ w.double().abs().T + bias.double().cpu().abs()
    worst = ((out.double().cpu() - ref).abs() / scale).max().item()
    assert worst < FLOAT32_TOL, f"a logit is off by {worst:.1e} of its terms' size"
    again = run(features, w, bias, **tiles)
    assert torch.equal(again.view(torch.int32), out.view(torch.int32)), "two calls differ"


@NONFINITE_OK
def test_nan_and_inf_in_the_features_reach_the_logits_as_torchs_do(device, gen):
    n, c, classes = 4, 48, 40
    features = features_like_the_heads(gen, n, c, "cpu")
    plant_nonfinite(features[:2], gen, nan=1, posinf=1, neginf=1)
    features = nan_surrounded(features.to(device))
    w, bias = randn(gen, classes, c) / c**0.5, randn(gen, classes, device=device)
    assert_nonfinite_like(
        run(features, w, bias, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16), reference(features, w, bias), FLOAT32_TOL
    )


@NONFINITE_OK
def test_an_infinite_feature_gives_infinite_logits_with_tf32_exact_weights(device, gen):
    """Weights that TF32 holds exactly (bfloat16 checkpoints, 0.5) have lo = 0: Inf * 0 in a cross
    term would make every logit NaN where torch has +-Inf. Fails without the cross terms' Inf guard."""
    n, c, classes = 2, 32, 24
    features = features_like_the_heads(gen, n, c, "cpu")
    features[0, 5] = float("inf")
    features = features.to(device)
    w = (randn(gen, classes, c) / c**0.5).bfloat16().float()
    bias = randn(gen, classes, device=device)
    out, ref = run(features, w, bias, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), reference(features, w, bias)
    assert ref[0].isinf().all() and not ref.isnan().any()
    assert torch.equal(out.cpu().isposinf(), ref.isposinf()) and torch.equal(out.cpu().isneginf(), ref.isneginf())
    assert_close(out[1:], ref[1:], FLOAT32_TOL)


def test_bad_arguments_are_one_clear_error(device, gen):
    features, w = randn(gen, 2, 16, device=device), packed(randn(gen, 10, 16)).to(device)
    out, bias = torch.full((2, 10), float("nan"), device=device), randn(gen, 10, device=device)
    with pytest.raises(ValueError, match="features must be a 2-D float32 tensor"):
        classifier_v2(features.half(), w, out, bias=bias)
    with pytest.raises(ValueError, match=r"must be \[N, C\], \[C, classes\] and \[N, classes\]"):
        classifier_v2(features[:, :15], w, out, bias=bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        classifier_v2(features, w, out, bias=bias[:9])
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        classifier_v2(features, w, out, bias=bias, BLOCK_N=24)
    assert torch.isnan(out).all(), "a refused launch wrote its output"
