"""The stem and classifier v2 variants through the engine: DENSETRITON_KERNELS=stem=v2,classifier=v2
against v1 and the float32 reference network."""

import pytest
import torch
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton import DenseNetSpec, kernels
from densetriton.reference import ReferenceDenseNet
from densetriton.tiles import LayerKey
from densetriton.tuning import check_candidate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def engines(spec, size, dtype, monkeypatch):
    """The reference network and engines under v1 and stem=v2,classifier=v2, on the same random weights."""
    torch.manual_seed(5)
    model = randomize_batchnorm(ReferenceDenseNet(spec), seed=6, image_size=size, in_channels=spec.in_channels)
    state = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    weights = densetriton.weights.Weights(spec, state)
    made = {}
    for name, choice in (("v1", "v1"), ("v2", "stem=v2,classifier=v2")):
        monkeypatch.setenv("DENSETRITON_KERNELS", choice)
        made[name] = densetriton.Engine(
            weights, device=torch.device(DEVICE), dtype=dtype, backend="triton", pretrained=False
        )
    return model.eval(), made


def count_v2_calls(monkeypatch):
    """Counts of stem and classifier v2 launches, through the names the plan binds."""
    calls = {"stem": 0, "classifier": 0}
    bind, classify = kernels.bind_stem_conv_v2, kernels.classifier_v2

    def bind_spy(*args, **kwargs):
        launch = bind(*args, **kwargs)

        def counted(x):
            calls["stem"] += 1
            return launch(x)

        return counted

    def classify_spy(*args, **kwargs):
        calls["classifier"] += 1
        return classify(*args, **kwargs)

    monkeypatch.setattr(kernels, "bind_stem_conv_v2", bind_spy)
    monkeypatch.setattr(kernels, "classifier_v2", classify_spy)
    return calls


@pytest.mark.parametrize(
    "in_channels,size,dtype,tol",
    [
        (3, 37, torch.float16, 1e-2),  # RGB, odd size
        (1, 24, torch.float32, 1e-4),  # grayscale
    ],
    ids=["rgb-fp16", "gray-fp32"],
)
def test_v2_stem_and_classifier_match_v1_and_the_reference(in_channels, size, dtype, tol, monkeypatch):
    """Fails if the engine ignores stem=v2/classifier=v2 (no v2 launch), runs them under v1, writes
    the caller's image, or if v2 changes the logits beyond the dtype's tolerance."""
    spec = DenseNetSpec(4, (2,), 8, 2, 0.5, 7, "imagenet", in_channels=in_channels)
    model, made = engines(spec, size, dtype, monkeypatch)
    calls = count_v2_calls(monkeypatch)
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        expected = model(x)
    x_dev = x.to(device=DEVICE, dtype=dtype)
    x_before = x_dev.clone()
    v2 = made["v2"](x_dev)
    assert calls["stem"] >= 1 and calls["classifier"] >= 1, f"the v2 engine did not run the v2 kernels: {calls}"
    seen = dict(calls)
    v1 = made["v1"](x_dev)
    assert calls == seen, "the v1 engine ran v2 kernels"
    assert torch.equal(x_dev, x_before), "the caller's image was written"
    assert rel_err(v2, expected) < tol and rel_err(v2, v1) < tol
    assert torch.equal(made["v2"](x_dev), v2), "two v2 calls differ"


def test_a_nan_pixel_gives_nan_logits_for_its_image_only(monkeypatch):
    spec = DenseNetSpec(4, (2,), 8, 2, 0.5, 5, "imagenet")
    _, made = engines(spec, 24, torch.float32, monkeypatch)
    x = torch.randn(2, 3, 24, 24)
    x[1, 2, 23, 23] = float("nan")  # the last pixel: only the last stem windows reach it
    logits = made["v2"](x.to(DEVICE)).cpu()
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()


@pytest.mark.parametrize(
    "key,tol",
    [
        (LayerKey("stem", "v2", "float16", 1, 6, 5, 1, 16, 7), 1e-2),
        (LayerKey("stem", "v2", "float32", 2, 5, 4, 3, 16, 3), 1e-5),  # a CIFAR stem
        (LayerKey("classifier", "v2", "float32", 3, 1, 1, 40, 18, 1), 1e-5),
    ],
)
def test_a_tune_candidate_of_the_v2_stem_and_classifier_runs_their_kernels(key, tol, monkeypatch):
    """densetriton tune's check: the v2 kernels with other tiles against v1. Fails if the candidate
    runs another launcher (the spies count the v2 ones)."""
    calls = count_v2_calls(monkeypatch)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=2)
    assert check_candidate(key, tiles, device=DEVICE) < tol
    assert calls[key.op] == 1
