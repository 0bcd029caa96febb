"""Keras DenseNets: keras.applications' models and fine-tuned models on them, in Keras 2's and
Keras 3's file formats, compared with Keras's own forward (torch backend) on the same input."""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported; the tests need no other framework
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from densetriton.weights_tools import convert_checkpoint  # noqa: E402
from densetriton.weights_tools.keras_h5 import _config_layers  # noqa: E402
from helpers import rel_err  # noqa: E402

import densetriton  # noqa: E402
from densetriton.cli import main  # noqa: E402
from densetriton.reference import ReferenceDenseNet  # noqa: E402
from densetriton.weights import WeightsError, load_weights  # noqa: E402

KERAS_EPS = 1.001e-5


def _randomize_batchnorms(model, seed, tiny_final_variance=True):
    """Non-trivial BatchNorm statistics. The final BatchNorm's variances sit near eps, so a converter
    that used torch's 1e-5 instead of Keras's 1.001e-5 would be caught at the 1e-4 level."""
    rng = np.random.default_rng(seed)
    bns = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for i, layer in enumerate(bns):
        c = layer.get_weights()[0].shape[0]
        variance = rng.uniform(0.5, 1.5, c)
        if tiny_final_variance and i == len(bns) - 1:
            variance = rng.uniform(1e-7, 1e-6, c)
        layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), variance])
    return model


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def _keras_logits(model, x_nchw: torch.Tensor) -> torch.Tensor:
    out = model.predict(x_nchw.permute(0, 2, 3, 1).numpy(), verbose=0)  # Keras is channels-last
    return torch.from_numpy(np.asarray(out))


def _save(model, fmt, tmp_path):
    if fmt == "h5":  # the legacy HDF5 format: Keras 2's and tf.keras's, Keras 3's model.save("x.h5")
        path = tmp_path / "model.h5"
        model.save(path)
    elif fmt == "weights.h5":  # Keras 3's weights-only file: layers named by class and position
        path = tmp_path / "model.weights.h5"
        model.save_weights(path)
    else:
        path = tmp_path / "model.keras"
        model.save(path)
    return path


@pytest.fixture(scope="module")
def xray_densenet121():
    """keras.applications.DenseNet121 for 1-channel X-rays with 5 findings (logits out)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(weights=None, input_shape=(64, 64, 1), classes=5, classifier_activation=None)
    return _randomize_batchnorms(model, seed=1)


@pytest.mark.parametrize("fmt", ["h5", "weights.h5", "keras"])
def test_keras_densenet121_converts_in_every_format_and_computes_what_keras_does(xray_densenet121, fmt, tmp_path):
    path = _save(xray_densenet121, fmt, tmp_path)
    if fmt == "h5":
        path = path.rename(path.with_name("MODEL.H5"))  # suffixes in any case
    pre = {"resize_size": [224, 224], "crop_size": None, "mean": [0.5], "std": [0.25]}
    out = convert_checkpoint(path, tmp_path / "xray.safetensors", preprocessing=pre, progress=False)
    w = load_weights(out)
    assert w.spec == densetriton.get_spec("densenet121").replace(in_channels=1, num_classes=5, bn_eps=KERAS_EPS)
    assert w.preprocessing == pre
    assert w.multi_label is None  # a linear head (classifier_activation=None) says nothing

    x = torch.rand(2, 1, 64, 64) * 2 - 1
    expected = _keras_logits(xray_densenet121, x)
    engine = densetriton.load("densenet121", weights=out, device="cpu", backend="reference")  # the same backbone
    assert rel_err(engine(x), expected) < 1e-5
    # The test can tell the epsilons apart: the same tensors under torch's 1e-5 miss.
    torch_eps = ReferenceDenseNet(w.spec.replace(bn_eps=1e-5)).eval()
    torch_eps.load_state_dict(w.tensors, strict=False)
    with torch.no_grad():
        assert rel_err(torch_eps(x), expected) > 1e-4


def _finetuned(seed, head_activation="sigmoid"):
    """The common fine-tuning recipe: an ImageNet-shaped base without its top, average pooling,
    dropout and a new Dense head, as a Sequential (the base is a nested model in the file)."""
    keras.utils.set_random_seed(seed)
    base = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))
    model = keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            base,
            keras.layers.Dropout(0.2),
            keras.layers.Dense(14, activation=head_activation, name="findings"),
        ]
    )
    return _randomize_batchnorms(model, seed=seed + 1)


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_a_finetuned_nested_keras_model_converts(fmt, tmp_path):
    model = _finetuned(3)
    path = _save(model, fmt, tmp_path)
    out = convert_checkpoint(path, tmp_path / "chexnet.safetensors", progress=False)
    w = load_weights(out)
    assert w.spec == densetriton.get_spec("densenet121").replace(num_classes=14, bn_eps=KERAS_EPS)
    assert w.multi_label is True  # the config's sigmoid head: predict applies a sigmoid by default
    x = torch.randn(2, 3, 64, 64)
    engine = densetriton.load(out, device="cpu", backend="reference")
    # Keras's head applies its sigmoid; densetriton returns logits (predict --multi-label applies it).
    assert rel_err(torch.sigmoid(engine(x)), _keras_logits(model, x)) < 1e-5


def _as_keras2(src, dst, *, split=False):
    """Rewrite a Keras 3 legacy .h5 as tf.keras 2 writes model.save_weights("x.h5"): layer groups at
    the root, the stem named "conv1/conv" and "conv1/bn" (so nested groups), weight names ending in
    ":0" and renamed as TF1's graph mode renames a model built twice ("conv1/conv_1/kernel:0"), and
    a nested model's weights listed trainable first, as Keras 2 lists a partly frozen model. With
    split, name lists are written in chunks (layer_names0, layer_names1, ...), as Keras does for
    attributes past HDF5's 64 KB limit."""
    keras2 = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn"}

    def rename(name):
        head, _, role = name.rpartition("/")
        parts = head.split("/")
        parts[-1] = keras2.get(parts[-1], parts[-1]) + "_1"
        return "/".join(parts) + "/" + role + ":0"

    def put(group, key, names):
        names = np.array([n.encode() for n in names])
        if split and len(names) > 1:
            for i, chunk in enumerate(np.array_split(names, 2)):
                group.attrs[f"{key}{i}"] = chunk
        else:
            group.attrs[key] = names

    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        root = f["model_weights"]
        layers = [keras2.get(n, n) for n in map(str, root.attrs["layer_names"])]
        put(g, "layer_names", layers)
        g.attrs["backend"] = b"tensorflow"
        for old, new in zip(map(str, root.attrs["layer_names"]), layers):
            group = g.create_group(new)
            names = [str(n) for n in root[old].attrs["weight_names"]]
            # Moving statistics (non-trainable) after every trainable weight; reversed to break any order.
            names = [n for n in names if "moving" not in n][::-1] + [n for n in names if "moving" in n]
            put(group, "weight_names", [rename(n) for n in names])
            for n in names:
                group.create_dataset(rename(n), data=root[old][n][()])


def _flat_finetuned(seed):
    """CheXNet-Keras's recipe: the base's output feeds a new head in one flat Functional model."""
    keras.utils.set_random_seed(seed)
    base = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))
    head = keras.layers.Dense(14, name="predictions")(base.output)
    return _randomize_batchnorms(keras.Model(base.input, head), seed=seed + 1)


@pytest.mark.parametrize("nested", [True, False])
def test_keras2_names_renamed_weights_and_split_attributes_convert(nested, tmp_path):
    model = _finetuned(5, head_activation=None) if nested else _flat_finetuned(5)
    _save(model, "h5", tmp_path)
    _as_keras2(tmp_path / "model.h5", tmp_path / "keras2.h5", split=nested)
    with h5py.File(tmp_path / "keras2.h5", "r") as f:
        group = f["densenet121"] if nested else f["conv1/conv"]
        names = [
            n.decode()
            for k in ("weight_names", "weight_names0", "weight_names1")
            if k in group.attrs
            for n in group.attrs[k]
        ]
        assert "conv1/conv_1/kernel:0" in names
        assert ("layer_names0" in f.attrs) == nested
    with pytest.warns(
        UserWarning, match=r"weights only, with no model config to check: keras\.applications' DenseNet is assumed"
    ):
        out = convert_checkpoint(tmp_path / "keras2.h5", tmp_path / "out.safetensors", progress=False)
    assert load_weights(out).spec.bn_eps == KERAS_EPS  # no config in a weights-only file: keras.applications'
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(densetriton.load(out, device="cpu", backend="reference")(x), _keras_logits(model, x)) < 1e-5

    with h5py.File(tmp_path / "keras2.h5", "r+") as f:
        f.attrs["backend"] = b"theano"
    _refused(tmp_path / "keras2.h5", tmp_path / "out.safetensors", r"Theano backend")


def test_bfloat16_keras_weights_convert(tmp_path):
    """Keras 3 keeps bfloat16 variables as raw 16-bit words, marked by an attribute."""
    keras.config.set_dtype_policy("bfloat16")
    try:
        keras.utils.set_random_seed(9)
        model = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=4)
    finally:
        keras.config.set_dtype_policy("float32")
    path = _save(model, "weights.h5", tmp_path)
    w = load_weights(convert_checkpoint(path, tmp_path / "bf16.safetensors", progress=False))
    stem = keras.ops.convert_to_numpy(keras.ops.cast(model.get_layer("conv1_conv").kernel, "float32"))
    assert w.tensors["features.conv0.weight"].dtype == torch.bfloat16
    assert torch.equal(w.tensors["features.conv0.weight"].float(), torch.from_numpy(stem).permute(3, 2, 0, 1))


def test_a_small_keras_densenet_runs_on_the_triton_kernels(tmp_path):
    """keras.applications' own DenseNet builder with one or two layers per block: the converted
    file through the Triton backend (the interpreter here) against Keras's forward."""
    from keras.src.applications.densenet import DenseNet  # what DenseNet121/169/201 call

    keras.utils.set_random_seed(7)
    model = _randomize_batchnorms(
        DenseNet([1, 2, 1, 1], weights=None, input_shape=(48, 48, 1), classes=3, classifier_activation=None), seed=8
    )
    out = convert_checkpoint(
        _save(model, "weights.h5", tmp_path),
        tmp_path / "small.safetensors",
        progress=False,
        preprocessing={"resize_size": None, "crop_size": None, "mean": [0.5], "std": [0.25]},
    )
    assert load_weights(out).spec == densetriton.DenseNetSpec(32, (1, 2, 1, 1), 64, 4, 0.5, 3, "imagenet", 1, KERAS_EPS)
    engine = densetriton.load(out, device="cpu", backend="triton", dtype=torch.float32)
    x = torch.randn(2, 1, 48, 48)
    assert rel_err(engine(x), _keras_logits(model, x)) < 1e-4


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.integers(1, 3), min_size=4, max_size=4),
    st.sampled_from([1, 3]),
    st.integers(1, 9),
    st.sampled_from(["weights.h5", "keras"]),
    st.integers(0, 2**16),
)
def test_keras_densenets_of_any_depth_convert_by_layer_order(blocks, channels, classes, fmt, seed):
    """Keras 3 files name layers by class and position only: the block structure read off their
    order must be the one the model was built with, whatever the layers per block."""
    import tempfile
    from pathlib import Path

    from keras.src.applications.densenet import DenseNet

    keras.utils.set_random_seed(seed)
    model = _randomize_batchnorms(
        DenseNet(blocks, weights=None, input_shape=(32, 32, channels), classes=classes, classifier_activation=None),
        seed=seed + 1,
        tiny_final_variance=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        pre = {"resize_size": None, "crop_size": None, "mean": [0.5] * channels, "std": [0.25] * channels}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # weights only: the file has no config to check
            out = convert_checkpoint(
                _save(model, fmt, Path(tmp)), Path(tmp) / "out.safetensors", progress=False, preprocessing=pre
            )
        w = load_weights(out)
        assert w.spec == densetriton.DenseNetSpec(
            32, tuple(blocks), 64, 4, 0.5, classes, "imagenet", channels, KERAS_EPS
        )
        x = torch.randn(2, channels, 32, 32)
        assert rel_err(densetriton.load(out, device="cpu", backend="reference")(x), _keras_logits(model, x)) < 1e-5


# -- what the config says, and what is refused --------------------------------------------------


def _edit_config(path, edit):
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)


def test_the_epsilon_comes_from_the_config_and_can_be_overridden(xray_densenet121, tmp_path, capsys):
    path = _save(xray_densenet121, "h5", tmp_path)

    def eps_1e3(config):
        for layer in _config_layers(config):
            if layer["class_name"] == "BatchNormalization":
                layer["config"]["epsilon"] = 1e-3

    _edit_config(path, eps_1e3)
    out = tmp_path / "out.safetensors"
    pre = ["--mean", "0.5", "--std", "0.25", "--resize-size", "224", "224"]
    assert main(["convert", "--checkpoint", str(path), "--out", str(out), *pre]) == 0
    assert load_weights(out).spec.bn_eps == 1e-3
    printed = capsys.readouterr().out
    assert "BatchNorm eps 0.001" in printed and "resize to 224x224, grayscale" in printed
    assert main(["convert", "--checkpoint", str(path), "--out", str(out), "--bn-eps", "2e-5", *pre]) == 0
    assert load_weights(out).spec.bn_eps == 2e-5
    # Converting the densetriton file again (to change its preprocessing, say) keeps the epsilon.
    again = tmp_path / "again.safetensors"
    assert main(["convert", "--checkpoint", str(out), "--out", str(again), "--mean", "0.4", "--std", "0.2"]) == 0
    assert load_weights(again).spec.bn_eps == 2e-5


def _refused(path, out, *patterns):
    out.write_bytes(b"previous contents")
    with pytest.raises(WeightsError) as info:
        convert_checkpoint(path, out, progress=False)
    for p in patterns:
        assert re.search(p, str(info.value)), str(info.value)
    assert out.read_bytes() == b"previous contents"  # nothing written over it
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_activations_other_than_relu_are_refused(xray_densenet121, tmp_path):
    path = _save(xray_densenet121, "h5", tmp_path)

    def elu(config):
        for layer in _config_layers(config):
            if layer["class_name"] == "Activation":
                layer["config"]["activation"] = "elu"

    _edit_config(path, elu)
    _refused(path, tmp_path / "out.safetensors", r"uses elu where a DenseNet has ReLU", re.escape(str(path)))


def test_max_pooled_features_are_refused(tmp_path):
    """include_top=False, pooling="max": the same tensors as an average-pooled model, another head."""
    keras.utils.set_random_seed(0)
    base = keras.applications.DenseNet121(weights=None, include_top=False, pooling="max", input_shape=(32, 32, 3))
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Dense(2)])
    for fmt in ("h5", "keras"):
        _refused(_save(model, fmt, tmp_path), tmp_path / "out.safetensors", r"GlobalMaxPooling2D \(pooling='max'\)")


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_weightless_layers_that_change_the_function_are_refused(fmt, tmp_path):
    """Preprocessing inside the model leaves no weight behind, so only the config can show it."""
    keras.utils.set_random_seed(0)
    base = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255), base, keras.layers.Dense(2)])
    _refused(
        _save(model, fmt, tmp_path),
        tmp_path / "out.safetensors",
        r"layers a DenseNet does not: Rescaling",
        r"--mean/--std",
    )
    clipped = keras.Sequential(
        [keras.Input((32, 32, 3)), base, keras.layers.ReLU(max_value=6.0), keras.layers.Dense(2)]
    )
    _refused(_save(clipped, fmt, tmp_path), tmp_path / "out.safetensors", r"ReLU with max_value")


def test_keras_models_that_are_not_densenets_are_refused(tmp_path):
    keras.utils.set_random_seed(0)
    out = tmp_path / "out.safetensors"
    small = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    _refused(_save(small, "h5", tmp_path), out, r"not keras\.applications DenseNet layers", r"conv2d")
    _refused(_save(small, "weights.h5", tmp_path), out, r"Conv2D layer has a bias")
    headless = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    two_heads = keras.Sequential([keras.Input((32, 32, 3)), headless, keras.layers.Dense(16), keras.layers.Dense(2)])
    _refused(_save(two_heads, "h5", tmp_path), out, r"2 Dense layers")


@pytest.mark.parametrize("fmt", ["h5", "weights.h5", "keras"])
def test_a_keras_backbone_without_head_converts_to_features_only(fmt, tmp_path):
    """include_top=False, pooling="avg" (the base users put their own head on): its output is
    densetriton's features; without pooling its output is the feature map, which is refused."""
    keras.utils.set_random_seed(4)
    base = _randomize_batchnorms(
        keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)), seed=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert_checkpoint(_save(base, fmt, tmp_path), tmp_path / "backbone.safetensors", progress=False)
    said = " ".join(str(w.message) for w in caught)
    assert "no classifier" in said and (fmt != "weights.h5" or "pooling='avg'" in said)
    w = load_weights(out)
    assert w.spec == densetriton.get_spec("densenet121").replace(num_classes=0, bn_eps=KERAS_EPS)
    x = torch.randn(2, 3, 32, 32)
    engine = densetriton.load(out, device="cpu", backend="reference")
    assert rel_err(engine.features(x), _keras_logits(base, x)) < 1e-5
    if fmt != "weights.h5":  # only a config can say the output is not pooled
        unpooled = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(32, 32, 3))
        _refused(
            _save(unpooled, fmt, tmp_path),
            tmp_path / "out.safetensors",
            r"does not pool its features",
            r"pooling='avg'",
        )


def test_broken_keras_files_are_one_clear_error(xray_densenet121, tmp_path):
    out = tmp_path / "out.safetensors"
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.ones(3))
    _refused(tmp_path / "other.h5", out, r"not a Keras model or weights file")
    good = _save(xray_densenet121, "h5", tmp_path).read_bytes()
    (tmp_path / "truncated.h5").write_bytes(good[: len(good) // 2])
    _refused(tmp_path / "truncated.h5", out, r"not a readable Keras file")
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 not really a zip")
    _refused(tmp_path / "broken.keras", out, r"not a readable Keras file")
    (tmp_path / "null-eps.h5").write_bytes(good)
    _edit_config(
        tmp_path / "null-eps.h5",
        lambda c: next(layer for layer in _config_layers(c) if layer["class_name"] == "BatchNormalization")[
            "config"
        ].update(epsilon=None),
    )
    _refused(tmp_path / "null-eps.h5", out, r"not a readable Keras file \(TypeError")
    with h5py.File(tmp_path / "dataset.weights.h5", "w") as f:
        f.create_dataset("layers", data=np.ones(3))
    _refused(tmp_path / "dataset.weights.h5", out, r"'/layers' is not a group of layers")
    with pytest.raises(WeightsError, match="not found"):
        convert_checkpoint(tmp_path / "missing.h5", out)
    # load() reads converted files only, and says how to get one.
    with pytest.raises(
        WeightsError, match=r"convert the checkpoint first: densetriton convert --checkpoint .*model\.h5"
    ):
        densetriton.load(tmp_path / "model.h5", device="cpu")
