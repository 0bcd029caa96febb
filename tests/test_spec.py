"""The spec and registry: derived counts checked against torchvision and an independent count."""

import json

import numpy as np
import pytest
import torch
import torchvision

import densetriton
from densetriton import DenseNetSpec, get_spec, list_models
from densetriton.cli import main
from densetriton.limits import MAX_BLOCKS, MAX_CHANNELS, MAX_CLASSES, MAX_LAYERS_PER_BLOCK, OverBound
from densetriton.reference import ReferenceDenseNet
from densetriton.spec import MODELS

TORCHVISION = ["densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_have_torchvisions_tensors_and_parameter_count(name):
    model = torchvision.models.get_model(name)
    spec = get_spec(name)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert spec.state_dict_shapes() == shapes
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())


def test_registry_holds_the_papers_models():
    names = list_models()
    for name in TORCHVISION + ["densenet264", "densenet_bc100_k12", "densenet40_k12"]:
        assert name in names
    d264 = get_spec("densenet264")
    assert (d264.growth_rate, d264.block_config) == (32, (6, 12, 64, 48))
    assert d264.depth == 265  # the paper calls it 264; its Table 1 counts to 265 (121, 169, 201 do add up)
    bc = get_spec("densenet_bc100_k12")
    assert (bc.growth_rate, bc.block_config, bc.bn_size, bc.compression, bc.stem) == (12, (16, 16, 16), 4, 0.5, "cifar")
    assert bc.depth == 100
    assert 0.75e6 < bc.num_parameters() < 0.85e6  # the paper's 0.8M
    plain = get_spec("densenet40_k12")
    assert plain.depth == 40 and plain.bn_size is None and plain.compression == 1.0
    assert 0.95e6 < plain.num_parameters() < 1.1e6  # the paper's 1.0M


def test_densenet121_numbers():
    spec = get_spec("densenet121")
    assert spec.num_parameters() == 7_978_856
    assert spec.block_channels() == [(64, 256), (128, 512), (256, 1024), (512, 1024)]
    assert spec.transition_channels() == [128, 256, 512]
    assert spec.feature_sizes(224, 224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert spec.macs(224) == 2_834_161_664  # torchvision's published 2.83 GFLOPS (multiply-adds)


def _count_macs(model, x):
    """Multiply-adds of convs and linears, counted by hooks on a real forward pass."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() // out.shape[0] * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(x)
    return total


@pytest.mark.parametrize(
    "spec,size",
    [
        (get_spec("densenet121"), 67),
        (DenseNetSpec(4, (5,), 8, None, 1.0, 7, "cifar"), 9),
        (DenseNetSpec(6, (2, 3, 2), 10, 2, 0.7, 3, "cifar"), 13),
        (get_spec("densenet121").replace(in_channels=1, num_classes=14), 64),  # a grayscale X-ray model
    ],
)
def test_macs_match_a_hook_count(spec, size):
    count = _count_macs(ReferenceDenseNet(spec), torch.randn(1, spec.in_channels, size, size))
    assert spec.macs(size) == count
    pooled = spec.macs(size, pooled_transitions=True)
    assert pooled < count or len(spec.block_config) == 1


def test_compression_floors_and_channels():
    spec = DenseNetSpec(5, (3, 3), 7, None, 0.3, 4, "cifar")
    assert spec.block_channels() == [(7, 22), (6, 21)]  # floor(0.3 * 22) = 6
    assert spec.transition_channels() == [6]


def test_input_channels_change_the_stem_only():
    rgb = get_spec("densenet121")
    gray = rgb.replace(in_channels=1)
    assert gray.state_dict_shapes()["features.conv0.weight"] == (64, 1, 7, 7)
    assert {k: v for k, v in gray.state_dict_shapes().items() if k != "features.conv0.weight"} == {
        k: v for k, v in rgb.state_dict_shapes().items() if k != "features.conv0.weight"
    }
    assert rgb.num_parameters() - gray.num_parameters() == 64 * 2 * 49
    assert rgb.macs(224) - gray.macs(224) == 112 * 112 * 64 * 2 * 49
    assert ReferenceDenseNet(gray).features.conv0.weight.shape == (64, 1, 7, 7)
    # JSON: in_channels is written only when it is not 3, so files of RGB models read as before.
    assert "in_channels" not in rgb.to_dict() and gray.to_dict()["in_channels"] == 1
    assert DenseNetSpec.from_json(gray.to_json()) == gray and DenseNetSpec.from_json(rgb.to_json()) == rgb
    assert (
        densetriton.spec.describe_spec(gray.replace(num_classes=14))
        == "densenet121 with 1 input channel and 14 classes"
    )
    assert densetriton.spec.describe_spec(rgb.replace(in_channels=4)) == "densenet121 with 4 input channels"
    assert "in_channels=2" in densetriton.spec.describe_spec(DenseNetSpec(4, (2,), 8, in_channels=2, stem="cifar"))


def test_batchnorm_eps_is_part_of_the_function():
    torch.manual_seed(0)
    base = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "imagenet")
    keras = base.replace(bn_eps=1.001e-5)  # Keras's DenseNet epsilon
    model = ReferenceDenseNet(keras)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1.001e-5}
    # Running variances near zero make eps matter: the same weights under another eps differ.
    state = {k: (torch.rand(v.shape) * 1e-4 if k.endswith("running_var") else v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    other = ReferenceDenseNet(base)
    other.load_state_dict(state)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), other.eval()(x), rtol=1e-6, atol=0)
    # JSON: bn_eps is written only when it is not torch's default; it round-trips exactly.
    assert "bn_eps" not in base.to_dict() and keras.to_dict()["bn_eps"] == 1.001e-5
    assert DenseNetSpec.from_json(keras.to_json()) == keras and DenseNetSpec.from_json(base.to_json()) == base
    assert densetriton.spec.describe_spec(get_spec("densenet121").replace(bn_eps=1.001e-5, num_classes=14)) == (
        "densenet121 with 14 classes and BatchNorm eps 1.001e-05"
    )
    assert "bn_eps=0.001" in densetriton.spec.describe_spec(base.replace(bn_eps=1e-3))


def test_spec_json_round_trip_and_hashable():
    spec = DenseNetSpec(12, [16, 16, 16], 24, 4, 0.5, 10, "cifar")
    assert spec.block_config == (16, 16, 16)
    assert DenseNetSpec.from_json(spec.to_json()) == spec
    assert hash(spec) == hash(get_spec("densenet_bc100_k12"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(growth_rate=0), "growth_rate"),
        (dict(block_config=()), "block_config"),
        (dict(bn_size=0), "bn_size"),
        (dict(compression=1.5), "compression"),
        (dict(stem="resnet"), "stem"),
        (dict(num_classes=-1), "num_classes"),
        (dict(num_classes=True), "num_classes"),
        (dict(in_channels=0), "in_channels"),
        (dict(in_channels=1.0), "in_channels"),
        (dict(bn_eps=0.0), "bn_eps"),
        (dict(bn_eps=-1e-5), "bn_eps"),
        (dict(bn_eps=float("nan")), "bn_eps"),
        (dict(bn_eps="1e-5"), "bn_eps"),
    ],
)
def test_invalid_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseNetSpec(**kwargs)


def test_a_spec_without_classifier_is_a_backbone():
    """num_classes 0: no classifier tensors, parameters and multiply-adds less the classifier's."""
    full, backbone = get_spec("densenet121"), get_spec("densenet121").replace(num_classes=0)
    shapes = backbone.state_dict_shapes()
    assert not [k for k in shapes if k.startswith("classifier")]
    assert shapes == {k: v for k, v in full.state_dict_shapes().items() if not k.startswith("classifier")}
    assert full.num_parameters() - backbone.num_parameters() == 1000 * 1024 + 1000
    assert full.macs(224) - backbone.macs(224) == 1000 * 1024
    assert densetriton.spec.describe_spec(backbone) == "densenet121 with no classifier"
    assert DenseNetSpec.from_json(backbone.to_json()) == backbone


def test_too_small_input_names_the_smallest_size():
    spec = get_spec("densenet121")
    assert spec.min_input_size() == 29
    spec.feature_sizes(29, 29)
    with pytest.raises(ValueError, match="29x29"):
        spec.feature_sizes(28, 28)
    with pytest.raises(ValueError, match="unknown model"):
        get_spec("resnet50")


def test_info_command(capsys):
    assert main(["info", "densenet121"]) == 0
    out = capsys.readouterr().out
    assert "7,978,856" in out and "2,834,161,664" in out
    assert main(["info", "densenet_bc100_k12"]) == 0
    assert "32x32" in capsys.readouterr().out
    assert densetriton.__version__
    assert main(["info", "resnet50"]) == 1
    assert "unknown model 'resnet50'" in capsys.readouterr().err
    # Sizes are checked before anything is printed; --json says which size it counted at.
    for size in ("0", "28"):
        assert main(["info", "densenet121", "--image-size", size]) == 1
        captured = capsys.readouterr()
        assert (
            captured.out == ""
            and f"--image-size {size} is too small for this network: the smallest input is 29x29" in captured.err
        )
    assert main(["info", "densenet121", "--image-size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_size"] == 64


def test_info_of_a_folder_or_a_features_file_says_what_it_is(tmp_path, capsys):
    from safetensors.torch import save_file

    assert main(["info", str(tmp_path)]) == 1
    assert "is a folder: info takes a model name (densenet121" in capsys.readouterr().err
    save_file(
        {"features": torch.randn(2, 4)},
        str(tmp_path / "f.safetensors"),
        metadata={"format": "densetriton-features", "paths": "[]"},
    )
    assert main(["info", str(tmp_path / "f.safetensors")]) == 1
    assert "holds image features written by densetriton embed, not a model's weights" in capsys.readouterr().err


def test_info_of_a_weights_file(tmp_path, capsys):
    from densetriton.weights import save_weights

    spec = get_spec("densenet121").replace(in_channels=1, num_classes=14, bn_eps=1.001e-5)
    torch.manual_seed(0)
    tensors = {k: v for k, v in ReferenceDenseNet(spec).state_dict().items() if not k.endswith("num_batches_tracked")}
    path = save_weights(
        tmp_path / "xray.safetensors",
        tensors,
        spec,
        class_names=[f"finding{i}" for i in range(14)],
        multi_label=True,
        source="checkpoint:x.h5",
        preprocessing={"resize_size": [224, 224], "crop_size": None, "mean": [0.5], "std": [0.25]},
    )
    assert main(["info", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "densenet121 with 1 input channel, 14 classes and BatchNorm eps 1.001e-05" in out
    assert "input channels      1" in out and "BatchNorm eps       1.001e-05" in out
    assert "finding0, finding1, finding2, finding3, finding4, ... (9 more)" in out
    assert "a sigmoid per class (multi-label)" in out and "resize to 224x224, grayscale" in out
    assert f"{spec.num_parameters():,}" in out and "checkpoint:x.h5" in out
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["multi_label"] is True and DenseNetSpec.from_dict(facts["spec"]) == spec
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 1
    assert "weights file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(block_config=[1e9]),
            r"block_config\[0\] \(the layers of block 1\) is 1000000000, over the bound of 1024",
        ),
        (
            dict(block_config=[1] * 100_000),
            r"len\(block_config\) \(the number of blocks\) is 100000, over the bound of 16",
        ),
        (dict(block_config=iter([1] * 100_000)), r"len\(block_config\) \(the number of blocks\) is more than 16"),
        (dict(growth_rate=1 << 17), "growth_rate is 131072, over the bound of 65536"),
        (dict(num_init_features=1 << 17), "num_init_features is 131072"),
        (dict(in_channels=1 << 17), "in_channels is 131072"),
        (dict(num_classes=1_000_001), "num_classes is 1000001, over the bound of 1000000"),
        (dict(bn_size=4096), r"bn_size x growth_rate \(the bottleneck width\) is 131072"),
        (dict(growth_rate=1024, block_config=(6, 64), bn_size=None), "the channels at the end of block 2 is 68640"),
    ],
)
def test_specs_over_the_limits_are_refused(kwargs, match):
    """limits.py's bounds: a spec read from a file cannot declare a tensor list or tensors of gigabytes
    (block_config [1e9] took 4.6 GB in `densetriton info`). An OverBound is a ValueError."""
    with pytest.raises(OverBound, match="invalid DenseNetSpec: " + match):
        DenseNetSpec(**kwargs)


def test_the_limits_admit_every_real_densenet():
    """Every registry model, densenet264 with a 100,000-class head, and specs at each bound."""
    for spec in MODELS.values():
        assert DenseNetSpec.from_json(spec.to_json()) == spec
    get_spec("densenet264").replace(num_classes=100_000)
    DenseNetSpec(block_config=(MAX_LAYERS_PER_BLOCK,) * 2, num_classes=MAX_CLASSES, in_channels=4)
    DenseNetSpec(growth_rate=1, block_config=(1,) * MAX_BLOCKS, num_init_features=MAX_CHANNELS - 1, bn_size=None)
    assert DenseNetSpec(block_config=[np.int64(3), 2.0]).block_config == (3, 2)  # numpy ints, JSON's 2.0


def test_tensor_shapes_and_macs_are_linear_in_the_blocks(monkeypatch):
    """state_dict_shapes and macs work out the block channels once, not once per block (which made a
    spec of 100,000 one-layer blocks quadratic)."""
    spec = DenseNetSpec(growth_rate=4, block_config=(1,) * MAX_BLOCKS, num_init_features=8)
    calls = []
    for name in ("block_channels", "transition_channels"):
        real = getattr(DenseNetSpec, name)
        monkeypatch.setattr(DenseNetSpec, name, lambda self, real=real, name=name: calls.append(name) or real(self))
    spec.state_dict_shapes()
    assert sorted(calls) == ["block_channels", "transition_channels"]
    calls.clear()
    spec.macs(spec.min_input_size())
    assert sorted(calls) == ["block_channels", "transition_channels"]
