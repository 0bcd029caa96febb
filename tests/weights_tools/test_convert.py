"""The converter: checkpoints from the wild, bit-exact round trips, clear errors, no half-written files."""

import copy
import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from densetriton.weights_tools import convert_checkpoint, convert_module, infer_spec, normalize_state_dict
from helpers import randomize_batchnorm, rel_err
from safetensors.torch import save_file

import densetriton
from densetriton.cli import main
from densetriton.weights import WeightsError, load_weights, to_torchvision_state_dict


@pytest.fixture
def small_model():
    """A small torchvision DenseNet with non-trivial BatchNorms: cheap, but every code path."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5
    )
    return randomize_batchnorm(model, seed=1, image_size=32)


def logits_agree(model, weights_path, num_classes=None):
    engine = densetriton.load(weights_path, device="cpu", backend="reference")
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
    got = engine(x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5
    return engine


def legacy_keys(sd):
    """Old torchvision checkpoints: denselayer modules named norm.1, conv.1, norm.2, conv.2."""
    return {re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", k): v for k, v in sd.items()}


FORMS = {
    "plain": lambda sd: sd,
    "nested-state_dict": lambda sd: {"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}},
    "nested-model": lambda sd: {"model": sd, "args": ["--lr", "0.1"]},
    "dataparallel": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "wrapper-prefix": lambda sd: {"state_dict": {f"module.densenet121.{k}": v for k, v in sd.items()}},
    "backbone-prefix": lambda sd: {f"backbone.{k}": v for k, v in sd.items()},
    "legacy-keys": legacy_keys,
    "legacy-dataparallel": lambda sd: {f"module.{k}": v for k, v in legacy_keys(sd).items()},
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar"])
def test_checkpoint_forms_convert(small_model, tmp_path, form, suffix):
    ckpt = tmp_path / f"ckpt{suffix}"
    torch.save(FORMS[form](small_model.state_dict()), ckpt)
    out = convert_checkpoint(ckpt, tmp_path / "w.safetensors", progress=False)
    logits_agree(small_model, out)


def test_sequential_classifier_of_any_size_converts(tmp_path):
    """CheXNet-style: DataParallel-wrapped densenet121 whose classifier is Sequential(Linear(1024, 14), Sigmoid)."""
    torch.manual_seed(2)
    model = torchvision.models.densenet121()
    model.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    model = randomize_batchnorm(model, seed=5)
    ckpt = tmp_path / "chexnet.pth.tar"
    torch.save({"epoch": 10, "state_dict": {f"module.densenet121.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"finding{i}" for i in range(14)) + "\n")
    out = tmp_path / "chexnet.safetensors"
    assert (
        main(
            [
                "convert",
                "--checkpoint",
                str(ckpt),
                "--arch",
                "densenet121",
                "--class-names",
                str(names),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    engine = densetriton.load(out, device="cpu", backend="reference")
    assert engine.spec.num_classes == 14 and engine.class_names[3] == "finding3"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = (
            model[0](x)
            if isinstance(model, torch.nn.Sequential)
            else model.classifier[0](
                torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(model.features(x)), 1), 1)
            )
        )
    assert rel_err(engine(x), expected) < 1e-5
    # load("densenet121", weights=that file) is accepted: same architecture, its own head.
    assert densetriton.load("densenet121", weights=out, device="cpu").spec.num_classes == 14


def test_round_trip_to_torchvision_is_bit_exact(small_model, tmp_path):
    out = convert_module(small_model, tmp_path / "w.safetensors")
    sd = to_torchvision_state_dict(out)
    original = small_model.state_dict()
    assert set(sd) == {k for k in original if not k.endswith("num_batches_tracked")}
    for k, v in sd.items():
        assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k
    fresh = torchvision.models.DenseNet(
        growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5
    )
    fresh.load_state_dict(sd, strict=False)
    missing = set(fresh.state_dict()) - set(sd)
    assert all(k.endswith("num_batches_tracked") for k in missing)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_metadata(small_model, tmp_path):
    out = convert_module(small_model, tmp_path / "w.safetensors", class_names=list("abcde"))
    w = load_weights(out)
    assert w.metadata["format"] == "densetriton" and w.metadata["format_version"] == "1"
    assert w.spec == infer_spec(normalize_state_dict(small_model.state_dict()))
    assert w.class_names == list("abcde") and w.source == "module:DenseNet"
    assert w.preprocessing["crop_size"] == 224


def test_plain_safetensors_without_metadata_loads(small_model, tmp_path):
    """timm publishes DenseNets as plain safetensors with torchvision-layout keys."""
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items() if "num_batches" not in k}, str(path))
    engine = logits_agree(small_model, path)
    assert engine.spec.growth_rate == 4 and engine.spec.block_config == (2, 3) and engine.spec.bn_size == 2
    # and it converts like any checkpoint
    out = convert_checkpoint(path, tmp_path / "converted.safetensors")
    logits_agree(small_model, out)


def test_plain_and_cifar_specs_are_inferred(tmp_path):
    for spec in (
        densetriton.DenseNetSpec(4, (5,), 8, None, 1.0, 10, "cifar"),
        densetriton.DenseNetSpec(6, (2, 3, 2), 10, 2, 0.7, 3, "cifar"),
    ):
        sd = densetriton.engine.random_weights(spec).tensors
        assert infer_spec(sd) == spec


def _assert_refused(ckpt, out, *patterns, arch=None):
    with pytest.raises(WeightsError) as info:  # ConversionError is one too
        convert_checkpoint(ckpt, out, arch=arch)
    for p in patterns:
        assert re.search(p, str(info.value)), str(info.value)
    return info.value


def test_errors_list_the_tensors_and_write_nothing(small_model, tmp_path):
    sd = dict(small_model.state_dict())
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous contents")  # a failed conversion must not clobber it

    missing = {k: v for k, v in sd.items() if "denseblock1.denselayer2.norm2" not in k}
    torch.save(missing, tmp_path / "missing.pth")
    _assert_refused(tmp_path / "missing.pth", out, r"4 missing", r"denseblock1\.denselayer2\.norm2\.running_var")

    extra = dict(sd, **{"features.extra.weight": torch.ones(3), "head.fc.weight": torch.ones(2)})
    torch.save(extra, tmp_path / "extra.pth")
    _assert_refused(tmp_path / "extra.pth", out, r"2 unexpected", r"features\.extra\.weight", r"head\.fc\.weight")

    bad = dict(sd)
    bad["features.denseblock1.denselayer1.conv2.weight"] = torch.ones(4, 8, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    _assert_refused(
        tmp_path / "bad.pth", out, r"mis-shaped", r"conv2\.weight \(4, 8, 1, 1\) \(expected \(4, 8, 3, 3\)\)"
    )

    torch.save(sd, tmp_path / "ok.pth")
    _assert_refused(
        tmp_path / "ok.pth",
        out,
        r"holds DenseNet\(k=4, blocks=\[2, 3\].*not densenet121 with 5 classes",
        arch="densenet121",
    )

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    _assert_refused(tmp_path / "garbage.pth", out, r"not a readable PyTorch checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _assert_refused(tmp_path / "garbage.safetensors", out, r"not a readable safetensors file")
    _assert_refused(tmp_path / "absent.pth", out, r"not found")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    _assert_refused(tmp_path / "empty.pth", out, r"no state dict found")

    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def _lightning_checkpoint(state_dicts: dict[str, dict], **beside) -> dict:
    """A LightningModule's checkpoint: its modules' tensors under their attribute names, and the
    trainer's state around them."""
    sd = {f"{name}.{k}": v for name, model_sd in state_dicts.items() for k, v in model_sd.items()}
    sd.update(beside)
    return {
        "epoch": 4,
        "global_step": 400,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 0.1}]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.001, "num_classes": 5},
    }


def test_a_loss_saved_beside_the_model_is_left_out_and_nothing_else_is(small_model, tmp_path):
    # A Lightning module keeps its loss's pos_weight next to the model; AveragedModel counts its updates.
    ckpt = _lightning_checkpoint(
        {"model": small_model.state_dict()},
        **{"criterion.pos_weight": torch.rand(5), "train_loss_fn.weight": torch.rand(5), "n_averaged": torch.tensor(7)},
    )
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.warns(
        UserWarning,
        match=r"left out 3 tensor\(s\) of training state saved beside the model "
        r"\(criterion\.pos_weight, n_averaged, train_loss_fn\.weight\)",
    ):
        out = convert_checkpoint(tmp_path / "last.ckpt", tmp_path / "out.safetensors")
    logits_agree(small_model, out)
    with pytest.warns(UserWarning, match=r"left out 3 tensor"):
        assert (
            main(["convert", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "cli.safetensors")])
            == 0
        )

    # Anything else may take part in the outputs, inside the model's prefix or beside it: refused.
    out = tmp_path / "refused.safetensors"
    torch.manual_seed(4)
    imagenet_head = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2)
    after = {
        "backbone": imagenet_head.state_dict(),
        "fc": torch.nn.Linear(1000, 3).state_dict(),
    }  # Linear after the 1000 classes
    torch.save(
        {"state_dict": {f"{m}.{k}": v for m, sd in after.items() for k, v in sd.items()}}, tmp_path / "after.pth"
    )
    _assert_refused(
        tmp_path / "after.pth",
        out,
        r"2 unexpected: fc\.weight, fc\.bias",
        r"if fc\.bias, fc\.weight take no part in the model's outputs, --prefix backbone\. converts",
    )
    cases = {"model.temperature": tmp_path / "inside.ckpt", "temperature": tmp_path / "beside.ckpt"}
    for key, path in cases.items():
        torch.save(_lightning_checkpoint({"model": small_model.state_dict()}, **{key: torch.tensor(1.5)}), path)
        _assert_refused(path, out, rf"1 unexpected: {re.escape(key)}")
    torch.save(
        {f"module.model.{k}": v for k, v in small_model.state_dict().items()}
        | {"module.temperature": torch.tensor(1.5), "module.mean": torch.rand(3)},
        tmp_path / "dp.pth",
    )
    _assert_refused(tmp_path / "dp.pth", out, r"2 unexpected: module\.temperature, module\.mean")
    torch.save(dict(small_model.state_dict(), temperature=torch.tensor(1.5)), tmp_path / "plain.pth")
    _assert_refused(tmp_path / "plain.pth", out, r"1 unexpected: temperature")
    torch.save({**small_model.state_dict(), 0: torch.ones(1)}, tmp_path / "intkey.pth")
    _assert_refused(tmp_path / "intkey.pth", out, r"a tensor under a key that is not a string: 0")
    assert not out.exists()


def test_prefix_picks_one_of_two_models(small_model, tmp_path, capsys):
    ema = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
    ema = randomize_batchnorm(ema, seed=2, image_size=32)
    torch.save(
        _lightning_checkpoint({"model": small_model.state_dict(), "model_ema.module": ema.state_dict()}),
        tmp_path / "ema.ckpt",
    )
    out = tmp_path / "out.safetensors"
    _assert_refused(
        tmp_path / "ema.ckpt",
        out,
        r"DenseNet tensors under 'model\.', 'model_ema\.module\.'; choose one "
        r"with --prefix",
    )
    logits_agree(ema, convert_checkpoint(tmp_path / "ema.ckpt", out, prefix="model_ema."))
    assert main(["convert", "--checkpoint", str(tmp_path / "ema.ckpt"), "--out", str(out), "--prefix", "model"]) == 0
    logits_agree(small_model, out)  # whole components: "model" is not "model_ema"
    assert main(["convert", "--checkpoint", str(tmp_path / "ema.ckpt"), "--out", str(out), "--prefix", "ema."]) == 1
    assert "no tensor in the checkpoint has a key starting with 'ema.'" in capsys.readouterr().err
    logits_agree(small_model, out)  # the failed conversion left the file as it was
    # timm keeps its EMA weights as a second state dict, DeiT under "model_ema": the prefix names it.
    torch.save(
        {"epoch": 9, "state_dict": small_model.state_dict(), "state_dict_ema": ema.state_dict()}, tmp_path / "timm.pth"
    )
    logits_agree(small_model, convert_checkpoint(tmp_path / "timm.pth", out))
    logits_agree(ema, convert_checkpoint(tmp_path / "timm.pth", out, prefix="state_dict_ema"))
    torch.save({"model": small_model.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "deit.pth")
    logits_agree(ema, convert_checkpoint(tmp_path / "deit.pth", out, prefix="model_ema."))


class _BackboneAndHead(torch.nn.Module):
    """A common fine-tuning layout: torchvision's DenseNet with its classifier replaced by an
    Identity, and a new Linear head beside it."""

    def __init__(self, densenet, num_classes):
        super().__init__()
        self.backbone = densenet
        features = densenet.classifier.in_features
        self.backbone.classifier = torch.nn.Identity()
        self.head = torch.nn.Linear(features, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_a_linear_head_beside_the_densenet_becomes_its_classifier(small_model, tmp_path):
    torch.manual_seed(3)
    net = _BackboneAndHead(small_model, num_classes=7)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "net.pth")
    with pytest.warns(UserWarning, match=r"took 'head' \(7 outputs\) as the classifier"):
        out = convert_checkpoint(tmp_path / "net.pth", tmp_path / "out.safetensors")
    logits_agree(net, out)
    # A DenseNet subclass with its own head (no wrapper prefix) converts the same way.
    torch.save({k.removeprefix("backbone."): v for k, v in net.state_dict().items()}, tmp_path / "flat.pth")
    with pytest.warns(UserWarning, match=r"took 'head'"):
        logits_agree(net, convert_checkpoint(tmp_path / "flat.pth", tmp_path / "out.safetensors"))
    # More than one Linear: not guessed at, and the error names what else the file holds.
    refused = tmp_path / "refused.safetensors"
    two = dict(net.state_dict(), **{"head2.weight": torch.randn(7, 7), "head2.bias": torch.randn(7)})
    torch.save(two, tmp_path / "two.pth")
    _assert_refused(
        tmp_path / "two.pth",
        refused,
        r"the DenseNet has no classifier of its own",
        r"head\.bias, head\.weight, head2\.bias, head2\.weight\) is not one Linear layer",
    )
    # A head that normalises first (BatchNorm1d, then Linear) is one module more: refused too.
    normed = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    normed.update(
        {
            "head.0.weight": torch.rand(7),
            "head.0.running_mean": torch.randn(7),
            "head.1.weight": torch.randn(7, net.head.in_features),
            "head.1.bias": torch.randn(7),
        }
    )
    torch.save(normed, tmp_path / "normed.pth")
    _assert_refused(
        tmp_path / "normed.pth", refused, r"the DenseNet has no classifier of its own", r"head\.0\.running_mean"
    )
    assert not refused.exists()
    # Without a bias, the head is the same function with a zero one.
    net.head = torch.nn.Linear(net.head.in_features, 7, bias=False)
    torch.save(net.state_dict(), tmp_path / "nobias.pth")
    with pytest.warns(UserWarning, match=r"took 'head'"):
        logits_agree(net, convert_checkpoint(tmp_path / "nobias.pth", tmp_path / "out.safetensors"))


def test_a_backbone_saved_without_its_classifier_converts_for_its_features(small_model, tmp_path, capsys):
    """model.features.state_dict(), a state dict without classifier.*, and a model whose classifier
    is an Identity: a backbone (num_classes 0) whose features equal torchvision's; no class names,
    no predict, and embed works."""
    with torch.no_grad():
        x = torch.randn(2, 3, 40, 40)
        expected = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(small_model.features(x)), 1), 1)
    torch.save(small_model.features.state_dict(), tmp_path / "features.pth")
    torch.save(
        {
            "state_dict": {
                f"module.{k}": v for k, v in small_model.state_dict().items() if not k.startswith("classifier.")
            }
        },
        tmp_path / "no-classifier.pth",
    )
    identity = copy.deepcopy(small_model)
    identity.classifier = torch.nn.Identity()
    sources = [
        lambda out: convert_checkpoint(tmp_path / "features.pth", out),
        lambda out: convert_checkpoint(tmp_path / "no-classifier.pth", out),
        lambda out: convert_module(identity, out),
    ]
    for i, convert in enumerate(sources):
        out = tmp_path / f"backbone{i}.safetensors"
        with pytest.warns(UserWarning, match="has no classifier: converted as DenseNet.*classes=none.*features only"):
            convert(out)
        engine = densetriton.load(out, device="cpu", backend="reference")
        assert engine.spec.num_classes == 0 and "classifier.weight" not in engine.weights.tensors
        assert torch.equal(engine.features(x), identity(x))  # bit-exact: the same reference computation
        assert rel_err(engine.features(x), expected) < 1e-6
    # torchvision's DenseNet(num_classes=0) saves a Linear with no outputs: no classifier either.
    zero = dict(
        small_model.state_dict(),
        **{"classifier.weight": torch.empty(0, small_model.classifier.in_features), "classifier.bias": torch.empty(0)},
    )
    torch.save(zero, tmp_path / "zero.pth")
    with pytest.warns(UserWarning, match="has no classifier"):
        assert load_weights(convert_checkpoint(tmp_path / "zero.pth", tmp_path / "z.safetensors")).spec.num_classes == 0
    # A bias without its weight is no backbone: said so.
    torch.save({k: v for k, v in small_model.state_dict().items() if k != "classifier.weight"}, tmp_path / "bias.pth")
    _assert_refused(tmp_path / "bias.pth", tmp_path / "b.safetensors", r"has a bias \(classifier.bias\) but no weight")
    # The backbone of a densetriton file with class names (--prefix features.): the file's names
    # and multi-label flag belong to the classifier left out, so they are left out too, with a warning.
    torch.save(small_model.state_dict(), tmp_path / "full.pth")
    full = convert_checkpoint(
        tmp_path / "full.pth", tmp_path / "full.safetensors", class_names=list("abcde"), multi_label=True
    )
    with (
        pytest.warns(UserWarning, match="has no classifier"),
        pytest.warns(UserWarning, match="left out the file's class names, multi label"),
    ):
        backbone = load_weights(convert_checkpoint(full, tmp_path / "fb.safetensors", prefix="features."))
    assert backbone.spec.num_classes == 0 and backbone.class_names is None and backbone.multi_label is None
    # The architecture named (a registry name): the same backbone.
    torch.save(torchvision.models.densenet121().features.state_dict(), tmp_path / "densenet121-features.pth")
    with pytest.warns(UserWarning, match="converted as densenet121 with no classifier"):
        named = convert_checkpoint(
            tmp_path / "densenet121-features.pth", tmp_path / "named.safetensors", arch="densenet121"
        )
    assert densetriton.load_weights(named).spec == densetriton.get_spec("densenet121").replace(num_classes=0)
    # Class names or sigmoid outputs need a classifier: one error, nothing written.
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    for flags, says in (
        (["--class-names", str(tmp_path / "names.txt")], "takes no class names"),
        (["--multi-label"], "takes no class names, --multi-label"),
    ):
        rc = main(
            [
                "convert",
                "--checkpoint",
                str(tmp_path / "features.pth"),
                "--out",
                str(tmp_path / "x.safetensors"),
                *flags,
            ]
        )
        assert rc == 1 and says in capsys.readouterr().err
        assert not (tmp_path / "x.safetensors").exists()
    # predict needs a classifier: one line, before any image is read; embed gives the features.
    from PIL import Image

    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    common = ["--weights", str(tmp_path / "backbone0.safetensors"), "--device", "cpu", "--backend", "reference"]
    assert main(["predict", str(tmp_path / "a.png"), *common]) == 1
    err = capsys.readouterr().err
    assert "has no classifier" in err and "densetriton embed" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", str(tmp_path / "a.png"), *common, "--out", str(tmp_path / "f.npy"), "--workers", "0"]) == 0
    assert np.load(tmp_path / "f.npy").shape == (1, engine.spec.num_features)
    assert main(["info", str(tmp_path / "backbone0.safetensors")]) == 0
    assert "classes             none: no classifier" in capsys.readouterr().out


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(target)}}, f, protocol=2)
    torch.save({"model": _Payload(target)}, tmp_path / "evil-zip.pth")
    for path in (ckpt, tmp_path / "evil-zip.pth"):
        _assert_refused(path, tmp_path / "out.safetensors", r"refusing to load", r"nothing from the file was run")
    assert not target.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_class_names_imagenet_are_torchvisions(tmp_path, capsys, monkeypatch):
    """--class-names imagenet: torchvision's ImageNet-1k names, unless a file of that name is there."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2)
    torch.save(model.state_dict(), tmp_path / "in1k.pth")
    out = tmp_path / "in1k.safetensors"
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="no class names recorded for its 1000 classes.*--class-names imagenet"):
        assert main(["convert", "--checkpoint", "in1k.pth", "--out", str(out)]) == 0
    assert load_weights(out).class_names is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: nothing to say
        assert main(["convert", "--checkpoint", "in1k.pth", "--class-names", "imagenet", "--out", str(out)]) == 0
    names = load_weights(out).class_names
    assert names == list(torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])
    assert names[0] == "tench" and len(names) == 1000
    (tmp_path / "imagenet").write_text("".join(f"c{i}\n" for i in range(1000)))  # a file of that name wins
    assert main(["convert", "--checkpoint", "in1k.pth", "--class-names", "imagenet", "--out", str(out)]) == 0
    assert load_weights(out).class_names[:2] == ["c0", "c1"]
    capsys.readouterr()


def test_convert_option_files_and_odd_inputs_give_errors_that_say_what_to_fix(small_model, tmp_path, capsys):
    torch.save(small_model.state_dict(), tmp_path / "m.pth")
    out = tmp_path / "m.safetensors"
    base = ["convert", "--checkpoint", str(tmp_path / "m.pth"), "--out", str(out)]

    def err(*extra):
        assert main([*base, *extra]) == 1
        return capsys.readouterr().err

    # Windows Notepad's byte-order mark and CRLF: not part of the first name.
    (tmp_path / "bom.txt").write_bytes("\ufeffcat\r\ndog\r\neel\r\nfox\r\nyak\r\n\r\n".encode("utf-8"))
    assert main([*base, "--class-names", str(tmp_path / "bom.txt")]) == 0
    capsys.readouterr()
    assert load_weights(out).class_names == ["cat", "dog", "eel", "fox", "yak"]
    (tmp_path / "gap.txt").write_text("cat\n\ndog\neel\nfox\nyak\n")
    assert "--class-names " in (e := err("--class-names", str(tmp_path / "gap.txt"))) and "line 2 is blank" in e
    assert "--class-names nosuch.txt: no such file" in err("--class-names", "nosuch.txt")
    assert "1000 class names for a 5-class classifier" in err("--class-names", "imagenet")  # torchvision's names
    assert f"--class-names {tmp_path}: a folder, not a text file" in err("--class-names", str(tmp_path))
    assert "is not 3 finite numbers" in err("--mean", "nan", "0", "0", "--std", "1", "1", "1")
    (tmp_path / "points.txt").write_text("0.2\nnan\n1\n0.3\n0.4\n")
    assert "points.txt, line 3: '1' is not an operating point" in err(
        "--operating-points", str(tmp_path / "points.txt")
    )
    assert "crop_size 300 is larger than the resized image (resize_size 256)" in err(
        "--mean", "0", "0", "0", "--std", "1", "1", "1", "--resize-size", "256", "--crop-size", "300"
    )
    # A file written before crops were checked: converting it again says how to record a new one.
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata["preprocessing"] = json.dumps({"resize_size": 64, "crop_size": 80, "mean": [0.5] * 3, "std": [0.25] * 3})
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    renewed = tmp_path / "renewed.safetensors"
    assert main(["convert", "--checkpoint", str(old), "--out", str(renewed)]) == 1
    e = capsys.readouterr().err
    assert "crop_size 80 is larger than the resized image" in e and "old.safetensors records it: pass --mean" in e
    assert not renewed.exists()
    assert (
        main(
            [
                "convert",
                "--checkpoint",
                str(old),
                "--out",
                str(renewed),
                "--mean",
                "0.5",
                "0.5",
                "0.5",
                "--std",
                "0.25",
                "0.25",
                "0.25",
                "--resize-size",
                "80",
                "--crop-size",
                "80",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert load_weights(renewed).preprocessing["resize_size"] == 80
    # Not even well-formed (a hand-edited file): the preprocessing check says what is wrong.
    for bad, says in (
        ({"resize_size": "40", "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}, "resize_size '40' is not"),
        ([1, 2], "preprocessing must be a dict"),
        ({"resize_size": 40, "crop_size": [], "mean": [0.5] * 3, "std": [0.25] * 3}, "crop_size [] is not"),
    ):
        metadata["preprocessing"] = json.dumps(bad)
        save_file(tensors, str(old), metadata=metadata)
        assert main(["convert", "--checkpoint", str(old), "--out", str(tmp_path / "x.safetensors")]) == 1
        e = capsys.readouterr().err
        assert says in e and "Traceback" not in e, e
    (tmp_path / "empty.pth").write_bytes(b"")
    np.save(tmp_path / "array.npy", np.zeros(3))
    for path, says in (
        (tmp_path / "empty.pth", "is empty (0 bytes)"),
        (tmp_path / "array.npy", "is a NumPy array file"),
    ):
        assert main(["convert", "--checkpoint", str(path), "--out", str(out)]) == 1
        assert says in capsys.readouterr().err
    assert load_weights(out).class_names == ["cat", "dog", "eel", "fox", "yak"]  # no failed call touched it


def test_cli_errors_are_one_line(tmp_path, capsys):
    torch.save({"epoch": 1}, tmp_path / "x.pth")
    assert main(["convert", "--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("densetriton: error: ") and "\n" not in err
    assert main(["convert", "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "--arch" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "y.pth")]) == 1
    assert "its name ends in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_multi_layer_classifier_head_is_refused(small_model, tmp_path):
    sd = {k: v for k, v in small_model.state_dict().items() if not k.startswith("classifier.")}
    sd.update(
        {
            "classifier.0.weight": torch.ones(16, 20),
            "classifier.0.bias": torch.ones(16),
            "classifier.2.weight": torch.ones(5, 16),
            "classifier.2.bias": torch.ones(5),
        }
    )
    torch.save(sd, tmp_path / "mlp-head.pth")
    _assert_refused(
        tmp_path / "mlp-head.pth", tmp_path / "out.safetensors", r"multi-layer head", r"classifier\.2\.weight"
    )
    assert not (tmp_path / "out.safetensors").exists()


# -- MONAI's DenseNet, grayscale stems ------------------------------------------------------------


def _monai_model(seed, **kwargs):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(seed)
    model = nets.DenseNet(spatial_dims=2, **kwargs)
    return randomize_batchnorm(model, seed=seed + 1, image_size=32, in_channels=kwargs["in_channels"])


@pytest.mark.parametrize("backend,tol", [("reference", 1e-5), ("triton", 1e-4)])
def test_monai_grayscale_densenet_converts_and_computes_what_monai_does(tmp_path, backend, tol):
    """MONAI's DenseNet: '.layers.' inside each dense layer, 'class_layers.out' for the head, one
    input channel, saved as MONAI's CheckpointSaver saves ({"net": state_dict, ...})."""
    model = _monai_model(
        3, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2
    )
    assert any(".layers." in k for k in model.state_dict()) and "class_layers.out.weight" in model.state_dict()
    ckpt = tmp_path / "checkpoint_epoch=10.pt"
    torch.save({"net": model.state_dict(), "opt": {"lr": 0.1}}, ckpt)
    pre = {"resize_size": None, "crop_size": None, "mean": [0.5], "std": [0.25]}
    out = convert_checkpoint(ckpt, tmp_path / "monai.safetensors", preprocessing=pre, progress=False)
    w = load_weights(out)
    assert w.spec == densetriton.DenseNetSpec(4, (2, 3), 8, 2, 0.5, 3, "imagenet", in_channels=1)
    assert w.preprocessing == pre

    engine = densetriton.load(out, device="cpu", backend=backend, dtype=torch.float32)
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(engine(x), expected) < tol
    with pytest.raises(ValueError, match=r"expected 1 channel in dimension 1"):
        engine(torch.randn(2, 3, 40, 40))


def test_monai_densenet121_for_xrays_converts_from_the_command_line(tmp_path, capsys):
    """The medical-imaging case: MONAI's DenseNet121 on 1-channel X-rays with 14 findings, trained
    under DataParallel; --arch, class names and the training preprocessing on the command line."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(6)
    model = randomize_batchnorm(nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=14), seed=7, in_channels=1)
    ckpt = tmp_path / "xray.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, ckpt)
    names = tmp_path / "findings.txt"
    names.write_text("\n".join(f"finding{i}" for i in range(14)) + "\n")
    out = tmp_path / "xray.safetensors"
    assert (
        main(
            [
                "convert",
                "--checkpoint",
                str(ckpt),
                "--arch",
                "densenet121",
                "--class-names",
                str(names),
                "--mean",
                "0.5",
                "--std",
                "0.25",
                "--resize-size",
                "256",
                "--crop-size",
                "224",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "densenet121 with 1 input channel and 14 classes" in printed
    assert "resize 256, center crop 224, grayscale, mean [0.5], std [0.25]" in printed

    engine = densetriton.load("densenet121", weights=out, device="cpu")  # the same backbone
    assert engine.spec == densetriton.get_spec("densenet121").replace(in_channels=1, num_classes=14)
    assert engine.class_names[13] == "finding13"
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(engine(x), expected) < 1e-5


def test_convert_preprocessing_options_are_checked_and_write_nothing(tmp_path, capsys):
    model = _monai_model(
        8, in_channels=1, out_channels=2, init_features=4, growth_rate=2, block_config=(1, 1), bn_size=1
    )
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "m.safetensors"
    for options, message in [
        (["--mean", "0.5"], "give --mean and --std"),
        (["--resize-size", "256"], "give --mean and --std"),
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"], r"mean \[0\.5, 0\.5, 0\.5\] is not 1 number"),
        (["--mean", "0.5", "--std", "0"], "std .* is not positive"),
    ]:
        assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), *options]) == 1
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    assert main(["convert", "--arch", "densenet121", "--mean", "0.5", "--std", "0.2", "--out", str(out)]) == 1
    assert "apply to --checkpoint" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Without the options nothing is recorded, and the command says so.
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "none recorded" in capsys.readouterr().out
    assert load_weights(out).preprocessing is None


def test_a_3d_monai_densenet_is_refused_by_name(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.DenseNet(
        spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=2, block_config=(1, 1), bn_size=1
    )
    torch.save(model.state_dict(), tmp_path / "ct3d.pt")
    for arch in (None, "densenet121"):  # named as 3-D whether or not an architecture is given
        _assert_refused(
            tmp_path / "ct3d.pt", tmp_path / "out.safetensors", r"3-D DenseNet", r"\(4, 1, 7, 7, 7\)", arch=arch
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_timms_deep_stem_densenets_are_refused_by_name(small_model, tmp_path):
    """timm's densenet264d and densenetblur121d: conv0 is a 3x3 stride-2 convolution followed by
    conv1/norm1 and conv2/norm2 (the layout timm saves); not the CIFAR stem its 3x3 conv0 suggests."""
    sd = dict(small_model.state_dict())
    sd["features.conv0.weight"] = torch.randn(4, 3, 3, 3)
    for i, (c_in, c_out) in enumerate([(4, 4), (4, 8)], start=1):
        sd[f"features.conv{i}.weight"] = torch.randn(c_out, c_in, 3, 3)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            sd[f"features.norm{i}.{stat}"] = torch.rand(c_out)
    torch.save(sd, tmp_path / "densenet264d.pth")
    for arch in (None, "densenet264"):
        _assert_refused(
            tmp_path / "densenet264d.pth",
            tmp_path / "out.safetensors",
            r"three convolutions",
            r"timm's deep-stem",
            arch=arch,
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_a_grayscale_preprocessing_needs_its_mean_and_std(tmp_path):
    model = _monai_model(
        9, in_channels=1, out_channels=2, init_features=4, growth_rate=2, block_config=(1, 1), bn_size=1
    )
    with pytest.raises(WeightsError, match=r"mean is missing \(a 1-channel model has no default\); std is missing"):
        convert_module(model, tmp_path / "g.safetensors", preprocessing={"resize_size": 40, "crop_size": 32})
    assert not (tmp_path / "g.safetensors").exists()


def test_converting_a_densetriton_file_again_keeps_its_class_names_and_preprocessing(small_model, tmp_path):
    first = convert_module(small_model, tmp_path / "a.safetensors", class_names=list("abcde"))
    pre = {"resize_size": 48, "crop_size": 40, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    second = convert_checkpoint(first, tmp_path / "b.safetensors", preprocessing=pre, progress=False)
    assert load_weights(second).class_names == list("abcde") and load_weights(second).preprocessing == pre
    third = convert_checkpoint(second, tmp_path / "c.safetensors", class_names=list("vwxyz"), progress=False)
    assert load_weights(third).class_names == list("vwxyz") and load_weights(third).preprocessing == pre
