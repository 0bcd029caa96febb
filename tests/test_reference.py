"""The reference path against torchvision and against an independent functional build."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton import DenseNetSpec, get_spec
from densetriton.cli import main
from densetriton.reference import ReferenceDenseNet

TORCHVISION = ["densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_converted_torchvision_model_matches_torchvision(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name), seed=1)
    ckpt, out = tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors"
    torch.save(model.state_dict(), ckpt)
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    engine = densetriton.load(out, device="cpu", backend="reference")
    assert engine.spec == get_spec(name) and engine.backend == "reference" and engine.dtype == torch.float32

    sizes = [(2, 64)] + ([(1, 224)] if name == "densenet121" else [])
    for batch, size in sizes:
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = model(x)
            expected_features = torch.flatten(F.adaptive_avg_pool2d(F.relu(model.features(x)), 1), 1)
        logits = engine(x)
        assert logits.dtype == torch.float32 and logits.shape == (batch, 1000)
        assert rel_err(logits, expected) < 1e-5
        assert rel_err(engine.features(x), expected_features) < 1e-5


def functional_densenet(sd: dict, spec: DenseNetSpec, x: torch.Tensor) -> torch.Tensor:
    """The same network written out with torch.nn.functional alone, from the state dict."""

    def bn_relu(t, p):
        return F.relu(
            F.batch_norm(
                t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5
            )
        )

    if spec.stem == "imagenet":
        x = F.max_pool2d(
            bn_relu(F.conv2d(x, sd["features.conv0.weight"], stride=2, padding=3), "features.norm0"), 3, 2, 1
        )
    else:
        x = F.conv2d(x, sd["features.conv0.weight"], padding=1)
    for b, layers in enumerate(spec.block_config, 1):
        for i in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            y = F.conv2d(bn_relu(x, f"{p}.norm1"), sd[f"{p}.conv1.weight"], padding=0 if spec.bn_size else 1)
            if spec.bn_size:
                y = F.conv2d(bn_relu(y, f"{p}.norm2"), sd[f"{p}.conv2.weight"], padding=1)
            x = torch.cat([x, y], 1)
        if b < len(spec.block_config):
            x = F.avg_pool2d(
                F.conv2d(bn_relu(x, f"features.transition{b}.norm"), sd[f"features.transition{b}.conv.weight"]), 2
            )
    x = bn_relu(x, "features.norm5").mean((2, 3))
    return F.linear(x, sd["classifier.weight"], sd["classifier.bias"])


@pytest.mark.parametrize(
    "spec,size",
    [
        (get_spec("densenet264"), 64),
        (get_spec("densenet_bc100_k12"), 32),
        (DenseNetSpec(4, (5,), 8, None, 1.0, 10, "cifar"), 16),  # the paper's Figure 1: a 5-layer block, k=4
        (DenseNetSpec(4, (5, 3), 8, None, 0.5, 10, "imagenet"), 40),
    ],
    ids=["densenet264", "cifar-bc100", "plain-k4-figure1", "plain-k4-imagenet-stem"],
)
def test_reference_matches_a_functional_build(spec, size):
    torch.manual_seed(3)
    model = randomize_batchnorm(ReferenceDenseNet(spec), seed=4, image_size=size)
    sd = model.state_dict()
    engine = densetriton.load(spec, weights=None, device="cpu", backend="reference")
    engine._model.load_state_dict(sd)  # same weights as the functional build
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = functional_densenet(sd, spec, x)
    assert rel_err(engine(x), expected) < 1e-5


def test_reference_output_depends_on_every_input_image():
    spec = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "cifar")
    engine = densetriton.load(spec, weights=None, device="cpu", backend="reference")
    x = torch.randn(3, 3, 8, 8)
    base = engine(x)
    x[1] += 1.0
    changed = engine(x)
    assert torch.equal(base[0], changed[0]) and torch.equal(base[2], changed[2])
    assert not torch.equal(base[1], changed[1])
