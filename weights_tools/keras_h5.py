"""Read Keras DenseNets (keras.applications' DenseNet121/169/201, fine-tuned models built on them,
and their bases without a head) into torchvision's state-dict names.

Keras's DenseNet computes torchvision's function: the same layers in the same order; a
ZeroPadding2D before the stem conv and the max-pool where torch pads inside them (the max-pool
reads post-ReLU values, so zeros and -inf pad alike); BatchNorm with epsilon 1.001e-5 rather
than 1e-5, which the converted spec records. Three file formats:

- legacy HDF5 (`.h5`: Keras 2 and tf.keras, and Keras 3's `model.save("x.h5")`), a full model
  or weights only. Weights are found by keras.applications' layer names ("conv1/conv" in
  Keras 2, "conv1_conv" in Keras 3, "conv2_block1_0_bn", "pool2_conv", "bn"), which stay right
  however the file orders them (Keras 2 lists a partly frozen model's trainable weights first).
- Keras 3 weights (`.weights.h5`), which name a layer by its class and position
  ("layers/conv2d_7/vars/0"): the DenseNet is read off the order of its convolutions and
  BatchNorms, and every shape is then checked against the spec that order implies.
- Keras 3 archives (`.keras`): a zip of config.json and such a weights file.

A model's config, where the file has one, gives BatchNorm's epsilon and whether the head ends
in a sigmoid (multi-label), and every layer in it must be one a DenseNet has: a Rescaling,
Normalization or Lambda layer (preprocessing inside the model), max-pooled features
(pooling="max") or another activation than ReLU would change the function without changing a
tensor, so each is refused by name. A weights-only file has no config, so none of that can be
checked: keras.applications' epsilon and layers are assumed. Theano-trained Keras 2 files (whose
kernels Keras flips on loading) are refused. Nothing in a
file is executed: h5py reads arrays and the config is parsed as JSON, never deserialised into
layers (a Lambda layer's code stays unread).

Before any data is read, the whole HDF5 file is walked (check_hdf5): a link that is not a hard
link (an external link reaches another file, a soft link another path), a dataset stored in
another file (external raw storage) or assembled from others (virtual), and a dataset declaring
more bytes than the file stores for it (a fill value only, or a compression bomb) are refused
(KerasRefused), so no other local file's bytes can reach a converted model; the .keras zip's
members and its config are bounded the same way (bounds.py).
"""

from __future__ import annotations

import io
import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..limits import (
    MAX_COMPRESSION_RATIO,
    MAX_JSON_BYTES,
    MAX_TENSOR_BYTES,
    MAX_TOTAL_TENSOR_BYTES,
    SMALL_MEMBER_BYTES,
    FileRefused,
)
from .bounds import check_zip_members, load_json
from .errors import CheckpointRefused, ConversionError, one_line, refused

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
# keras.applications.densenet builds every BatchNormalization with this epsilon.
KERAS_DENSENET_BN_EPS = 1.001e-5

# keras.applications' DenseNet layer names; Keras 2 spells the stem "conv1/conv", Keras 3 "conv1_conv".
_STEM = re.compile(r"conv1[/_](conv|bn)")
_DENSE_LAYER = re.compile(r"conv(\d+)_block(\d+)_([012])_(bn|conv)")
_TRANSITION = re.compile(r"pool(\d+)_(bn|conv)")
_BN_ROLES = ("gamma", "beta", "moving_mean", "moving_variance")
_BN_TORCH = dict(zip(_BN_ROLES, ("weight", "bias", "running_mean", "running_var")))
# Activations a DenseNet may name in its config: its ReLUs, and the classifier's output.
_DENSENET_ACTIVATIONS = {"relu", "linear", "softmax", "sigmoid"}
# The layer classes of keras.applications' DenseNet and of a fine-tuned head on it; any other
# layer in a config changes the function. Dropout and noise layers are identities at inference.
_DENSENET_LAYERS = {
    "InputLayer",
    "ZeroPadding2D",
    "Conv2D",
    "BatchNormalization",
    "Activation",
    "ReLU",
    "MaxPooling2D",
    "MaxPool2D",
    "AveragePooling2D",
    "AvgPool2D",
    "Concatenate",
    "GlobalAveragePooling2D",
    "GlobalAvgPool2D",
    "Flatten",
    "Dropout",
    "SpatialDropout2D",
    "GaussianDropout",
    "GaussianNoise",
    "Dense",
    "Softmax",
    "Functional",
    "Model",
    "Sequential",
}


# HDF5 objects (groups and datasets) a file may hold: a DenseNet's weights file has a few thousand.
_MAX_HDF5_OBJECTS = 100_000


class KerasError(ConversionError):
    """A Keras file that cannot be converted; the message says why."""


class KerasRefused(CheckpointRefused, KerasError):
    """A Keras file declaring more than it holds, or reaching outside itself; nothing was read past the check."""


@dataclass
class KerasCheckpoint:
    tensors: dict[str, torch.Tensor]  # torchvision's names and layouts
    bn_eps: float
    multi_label: bool | None = None  # the head's sigmoid (True) or softmax (False), from the config


def read_keras(path: str | Path) -> KerasCheckpoint:
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise KerasError("reading Keras files needs h5py: pip install h5py") from None
    try:
        if path.suffix.lower() == ".keras":
            config, data = _read_archive(path)
            with h5py.File(data, "r") as f:
                check_hdf5(f, path)
                return _with_config(_read_keras3(f), config, path)
        with h5py.File(path, "r") as f:
            check_hdf5(f, path)
            if "layers" in f and not _attr(f, "layer_names"):
                return _with_config(_read_keras3(f), None, path)
            if _text(f.attrs.get("backend", "")) == "theano":
                raise KerasError(
                    "trained with Keras's Theano backend, whose kernels Keras flips on loading; load and save it "
                    "again with a TensorFlow-backend Keras first"
                )
            config = f.attrs.get("model_config")
            config = load_json(_text(config), path, "the model config", KerasRefused) if config is not None else None
            return _with_config(_read_legacy(f), config, path)
    except FileRefused:
        raise
    except KerasError as e:
        raise KerasError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- h5py, zipfile and JSON raise many kinds; each is one line here
        raise KerasError(f"{path} is not a readable Keras file ({type(e).__name__}: {one_line(e)})") from None


def _read_archive(path: Path) -> tuple[dict | None, io.BytesIO]:
    """A .keras zip's config (parsed JSON) and weights file (in memory), each inflated once,
    after the zip directory's sizes are checked."""
    with zipfile.ZipFile(path) as archive:
        check_zip_members(archive, path, KerasRefused)
        names = set(archive.namelist())
        if "model.weights.h5" not in names:
            raise KerasError("a zip without model.weights.h5: not a Keras 3 .keras archive")
        config = None
        if "config.json" in names:
            size = archive.getinfo("config.json").file_size
            if size > MAX_JSON_BYTES:
                raise refused(path, "config.json's size", f"{size} bytes", f"{MAX_JSON_BYTES} bytes", KerasRefused)
            config = load_json(archive.read("config.json"), path, "config.json", KerasRefused)
        return config, io.BytesIO(archive.read("model.weights.h5"))


def check_hdf5(f, path) -> None:
    """Walk every link and object of an open HDF5 file before reading any data: only hard links,
    no dataset stored outside the file (external or virtual), none declaring more bytes than the
    file stores for it, and their total within MAX_TOTAL_TENSOR_BYTES (KerasRefused otherwise)."""
    import h5py

    groups, seen, total = [f], {hash(f.id)}, 0
    packed = [0, 0]  # compressed datasets: bytes declared, bytes stored
    while groups:
        group = groups.pop()
        for name in group:
            where = f"{group.name.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                target = getattr(link, "filename", None) or getattr(link, "path", "?")
                raise refused(
                    path,
                    f"HDF5 link {where!a}",
                    f"a link of kind {type(link).__name__} to {target!a}",
                    "hard links inside the file",
                    KerasRefused,
                )
            obj = group[name]
            if hash(obj.id) in seen:
                continue  # a group linked twice (or into itself) is walked once
            seen.add(hash(obj.id))
            if len(seen) > _MAX_HDF5_OBJECTS:
                raise refused(
                    path, "the HDF5 object count", f"over {_MAX_HDF5_OBJECTS}", _MAX_HDF5_OBJECTS, KerasRefused
                )
            if isinstance(obj, h5py.Dataset):
                declared, stored = _check_dataset(obj, where, path)
                total += declared
                if stored is not None:
                    packed[0], packed[1] = packed[0] + declared, packed[1] + stored
            elif isinstance(obj, h5py.Group):
                groups.append(obj)
    if total > MAX_TOTAL_TENSOR_BYTES:
        raise refused(
            path, "the datasets' total size", f"{total} bytes", f"{MAX_TOTAL_TENSOR_BYTES} bytes", KerasRefused
        )
    # Each compressed dataset under 16 MiB is exempt from the ratio: together they are not.
    if packed[0] > SMALL_MEMBER_BYTES and packed[0] > MAX_COMPRESSION_RATIO * packed[1]:
        raise refused(
            path,
            f"the compressed datasets' total size ({packed[1]} bytes stored)",
            f"{packed[0]} bytes",
            f"{MAX_COMPRESSION_RATIO} times their compressed size",
            KerasRefused,
        )


def _check_dataset(dataset, where: str, path) -> tuple[int, int | None]:
    """One dataset's storage, from its creation properties: its declared bytes, and the bytes the
    file stores for it if it is compressed (else None)."""
    if dataset.external:
        files = ", ".join(sorted({ascii(entry[0]) for entry in dataset.external}))
        raise refused(
            path, f"dataset {where!a}'s storage", f"external, in {files}", "data inside the file", KerasRefused
        )
    if dataset.is_virtual:
        raise refused(
            path,
            f"dataset {where!a}'s storage",
            "virtual (mapped from other datasets or files)",
            "data inside the file",
            KerasRefused,
        )
    declared = math.prod(dataset.shape or ()) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    compressed = dataset.id.get_create_plist().get_nfilters() > 0
    if declared > MAX_TENSOR_BYTES:
        raise refused(path, f"dataset {where!a}'s size", f"{declared} bytes", f"{MAX_TENSOR_BYTES} bytes", KerasRefused)
    if not compressed and stored < declared:
        raise refused(
            path,
            f"dataset {where!a}'s size ({stored} bytes stored)",
            f"{declared} bytes",
            "the bytes the file stores for it",
            KerasRefused,
        )
    if compressed and declared > SMALL_MEMBER_BYTES and declared > MAX_COMPRESSION_RATIO * stored:
        raise refused(
            path,
            f"dataset {where!a}'s size ({stored} bytes compressed)",
            f"{declared} bytes",
            f"{MAX_COMPRESSION_RATIO} times its compressed size",
            KerasRefused,
        )
    return declared, (stored if compressed else None)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr(group, name: str) -> list[str]:
    """A list attribute as Keras writes it: whole, or split into name0, name1, ... when it
    outgrows HDF5's 64 KB attribute limit."""
    if name in group.attrs:
        return [_text(v) for v in group.attrs[name]]
    chunks, i = [], 0
    while f"{name}{i}" in group.attrs:
        chunks += [_text(v) for v in group.attrs[f"{name}{i}"]]
        i += 1
    return chunks


def _array(dataset) -> torch.Tensor:
    if not hasattr(dataset, "dtype"):
        raise KerasError(f"{dataset.name} is a group where a weight (dataset) belongs")
    bfloat16 = (
        dataset.dtype.kind == "V"
        and dataset.dtype.itemsize == 2
        and _text(dataset.attrs.get("dtype", "")) == "bfloat16"
    )
    if (
        dataset.dtype.kind != "f" and not bfloat16
    ):  # before reading: a variable-length dtype reads more than it declares
        raise KerasError(f"{dataset.name} holds {dataset.dtype} values, not floating point")
    array = np.asarray(dataset)
    if bfloat16:  # Keras 3 stores bfloat16 variables as raw 16-bit words, marked in an attribute.
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


# -- legacy HDF5: by layer name ------------------------------------------------------------


def _read_legacy(f) -> dict[str, torch.Tensor]:
    """Keras 2 / tf.keras HDF5: layer groups listed in `layer_names`, each naming its weights in
    `weight_names` ("conv1/conv/kernel:0"); a nested model's group holds its inner layers' weights."""
    root = f.get("model_weights", f)
    layer_names = _attr(root, "layer_names")
    if not layer_names:
        raise KerasError(
            "an HDF5 file but not a Keras model or weights file (no layer_names; a Keras 3 subclassed model's "
            "weights cannot be read: save its Functional DenseNet instead)"
        )
    tensors: dict[str, torch.Tensor] = {}
    classifier: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for layer in layer_names:
        group = root[layer]
        for weight in _attr(group, "weight_names"):
            owner, _, role = weight.removesuffix(":0").rpartition("/")
            owner = owner or layer
            # The layer group's own name first: TF1 graph mode renames variables ("conv1/conv_1/
            # kernel:0"), not layers. Inside a nested model, the weight name's owner (the tail of
            # "densenet121/conv1/conv"), else that owner without such a "_1".
            tail = owner.split("/")[-2:]
            tails = (layer.split("/")[-2:], tail, tail[:-1] + [re.sub(r"_\d+$", "", tail[-1])])
            name = next((n for n in (_torch_name(t, role) for t in tails) if n is not None), None)
            value = _array(group[weight])
            if name is not None:
                if name in tensors:
                    raise KerasError(f"two weights map to {name!r} (one is {layer}/{weight})")
                tensors[name] = value
            elif role in ("kernel", "bias") and (role == "bias" or value.dim() == 2):
                classifier.setdefault(owner, {})[role] = value
            else:
                unknown.append(f"{layer}/{weight}")
    if unknown:
        raise KerasError(
            f"{len(unknown)} weights are not keras.applications DenseNet layers "
            f"(conv1_conv, conv2_block1_0_bn, pool2_conv, bn, ...): {', '.join(unknown[:6])}"
            + (", ..." if len(unknown) > 6 else "")
        )
    tensors.update(_classifier(list(classifier.values())))
    return _transpose(tensors)


def _torch_name(tail: list[str], role: str) -> str | None:
    """torchvision's name for a keras.applications DenseNet weight, or None for any other layer."""
    owner = "/".join(tail)
    if not _STEM.fullmatch(owner):
        owner = tail[-1]
    if role not in (*_BN_ROLES, "kernel"):
        return None
    suffix = "weight" if role == "kernel" else _BN_TORCH[role]
    kind = "conv" if role == "kernel" else "bn"
    if m := _STEM.fullmatch(owner):
        return f"features.{'conv0' if m.group(1) == 'conv' else 'norm0'}.{suffix}" if m.group(1) == kind else None
    if m := _DENSE_LAYER.fullmatch(owner):
        block, layer, step, found = int(m.group(1)) - 1, int(m.group(2)), m.group(3), m.group(4)
        module = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2", ("2", "conv"): "conv2"}.get(
            (step, found)
        )
        if module is None or found != kind or block < 1:
            return None
        return f"features.denseblock{block}.denselayer{layer}.{module}.{suffix}"
    if m := _TRANSITION.fullmatch(owner):
        if m.group(2) != kind or int(m.group(1)) < 2:
            return None
        return f"features.transition{int(m.group(1)) - 1}.{'norm' if kind == 'bn' else 'conv'}.{suffix}"
    if owner == "bn" and kind == "bn":
        return f"features.norm5.{suffix}"
    return None


# -- Keras 3 weights: by class and position ------------------------------------------------


def _read_keras3(f) -> dict[str, torch.Tensor]:
    """Keras 3 names each layer's group by its class and a counter in layer order ("conv2d",
    "conv2d_1", ...): collect the convolutions, BatchNorms and Dense layers in that order."""
    found: dict[str, list[tuple[str, int, list]]] = {"conv2d": [], "batch_normalization": [], "dense": []}
    unknown = []

    def walk(group, where):
        layers = group.get("layers")
        if layers is None:
            return
        if not hasattr(layers, "keys"):
            raise KerasError(f"'{where}/layers' is not a group of layers")
        for child in layers:
            sub = layers[child]
            name = f"{where}/{child}" if where else child
            if not hasattr(sub, "keys"):
                raise KerasError(f"'{name}' is not a layer group")
            m = re.fullmatch(r"(.*?)(?:_(\d+))?", child)
            kind, counter = m.group(1), int(m.group(2) or 0)
            values = sub.get("vars")
            if kind in found and values is not None:
                found[kind].append((where, counter, [_array(values[str(i)]) for i in range(len(values))]))
            elif values is not None and len(values):
                unknown.append(name)
            walk(sub, name)  # a nested model (Functional, Sequential) keeps its layers below

    walk(f, "")
    if unknown:
        raise KerasError(f"layers with weights that a DenseNet does not have: {', '.join(sorted(unknown)[:6])}")
    ordered = {}
    for kind, entries in found.items():
        containers = {where for where, _, _ in entries}
        if kind != "dense" and len(containers) > 1:
            raise KerasError(
                f"{kind} layers in more than one model ({', '.join(sorted(containers))}): their order is ambiguous"
            )
        ordered[kind] = [values for _, _, values in sorted(entries, key=lambda e: e[1])]
    for i, values in enumerate(ordered["batch_normalization"]):
        if len(values) != 4:
            raise KerasError(
                f"BatchNormalization layer {i + 1} has {len(values)} variables, not 4 (gamma, beta, mean, variance)"
            )
    return _by_position(ordered["conv2d"], ordered["batch_normalization"], ordered["dense"])


def _by_position(convs: list, bns: list, denses: list) -> dict[str, torch.Tensor]:
    """Name convolutions and BatchNorms by where they sit in a DenseNet: the stem conv first;
    then each dense layer a 1x1 and a 3x3 conv (bottleneck) or one 3x3 conv (plain); a
    transition a lone 1x1 conv. BatchNorms follow the same walk."""
    if not convs:
        raise KerasError("no Conv2D layers: not a DenseNet")
    if any(len(c) != 1 for c in convs):
        raise KerasError("a Conv2D layer has a bias: DenseNet's convolutions have none")
    kernels = [c[0] for c in convs]
    sizes = [k.shape[0] if k.dim() == 4 else None for k in kernels]
    conv_names, bn_names = ["features.conv0"], (["features.norm0"] if sizes[0] == 7 else [])
    bottleneck = len(sizes) > 2 and sizes[1] == 1 and sizes[2] == 3
    block, layer, i = 1, 0, 1
    while i < len(sizes):
        p = f"features.denseblock{block}.denselayer{layer + 1}"
        if bottleneck and sizes[i] == 1 and i + 1 < len(sizes) and sizes[i + 1] == 3:
            conv_names += [f"{p}.conv1", f"{p}.conv2"]
            bn_names += [f"{p}.norm1", f"{p}.norm2"]
            layer, i = layer + 1, i + 2
        elif not bottleneck and sizes[i] == 3:
            conv_names.append(f"{p}.conv1")
            bn_names.append(f"{p}.norm1")
            layer, i = layer + 1, i + 1
        elif sizes[i] == 1 and layer > 0:
            conv_names.append(f"features.transition{block}.conv")
            bn_names.append(f"features.transition{block}.norm")
            block, layer, i = block + 1, 0, i + 1
        else:
            raise KerasError(
                f"Conv2D layer {i + 1} of {len(sizes)} (kernel {tuple(kernels[i].shape)}) does not fit a DenseNet's "
                f"layer order (stem, then dense layers and transitions)"
            )
    bn_names.append("features.norm5")
    if len(bns) != len(bn_names):
        raise KerasError(
            f"{len(bns)} BatchNormalization layers where a DenseNet with these convolutions has {len(bn_names)}"
        )
    tensors = {f"{name}.weight": kernel for name, kernel in zip(conv_names, kernels)}
    for name, values in zip(bn_names, bns):
        tensors.update({f"{name}.{_BN_TORCH[role]}": v for role, v in zip(_BN_ROLES, values)})
    tensors.update(_classifier([dict(zip(("kernel", "bias"), d)) for d in denses]))
    return _transpose(tensors)


# -- shared ------------------------------------------------------------------------------


def _classifier(denses: list[dict]) -> dict[str, torch.Tensor]:
    if not denses:  # include_top=False and no head: a backbone (its pooling is checked against the config)
        return {}
    if len(denses) > 1:
        raise KerasError(
            f"the model has {len(denses)} Dense layers: densetriton supports DenseNet's single linear classifier"
        )
    (dense,) = denses
    if "kernel" not in dense:
        raise KerasError("the model's Dense classifier has no kernel")
    kernel = dense["kernel"]  # Keras's [in, out]; torch's Linear weight is [out, in]
    bias = dense.get("bias", torch.zeros(kernel.shape[-1], dtype=kernel.dtype))  # use_bias=False
    return {"classifier.weight": kernel.t().contiguous() if kernel.dim() == 2 else kernel, "classifier.bias": bias}


def _transpose(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keras conv kernels are [kh, kw, in, out]; torch's are [out, in, kh, kw]."""
    return {
        name: value.permute(3, 2, 0, 1).contiguous() if value.dim() == 4 else value for name, value in tensors.items()
    }


def _config_layers(model: dict):
    """The model's config and every layer config in it, nested models' layers included (not the
    dtype policies and initializers that are configs too)."""
    if not isinstance(model, dict):
        return
    inner = model.get("config")
    if isinstance(inner, dict):
        yield model
    layers = inner.get("layers") if isinstance(inner, dict) else inner  # Keras 2.0's Sequential: a list
    for layer in layers if isinstance(layers, list) else []:
        yield from _config_layers(layer)


def _with_config(tensors: dict[str, torch.Tensor], config, path: Path) -> KerasCheckpoint:
    backbone = "classifier.weight" not in tensors
    if config is None:
        warnings.warn(
            f"{path} is weights only, with no model config to check: keras.applications' DenseNet is assumed "
            f"(BatchNorm eps {KERAS_DENSENET_BN_EPS}, no preprocessing or other weightless layers inside the model"
            + (", and, with no classifier, features average-pooled as pooling='avg' gives them)" if backbone else ")"),
            stacklevel=3,
        )
        return KerasCheckpoint(tensors, KERAS_DENSENET_BN_EPS)
    layers = list(_config_layers(config))
    # A backbone (include_top=False, no head) converts to a features-only model when its output is
    # what densetriton's features are: the global average pool (pooling="avg").
    if backbone and not any(c["class_name"] in ("GlobalAveragePooling2D", "GlobalAvgPool2D") for c in layers):
        raise KerasError(
            "the model has no Dense classifier and does not pool its features (include_top=False, pooling=None): "
            "it outputs the feature map, and densetriton's features are its global average pool. A backbone "
            "built with pooling='avg' converts to a features-only model"
        )
    # pooling="max" gives the same weights a different head: refused, not averaged.
    max_pooled = sorted(
        {c["class_name"] for c in layers if c["class_name"] in ("GlobalMaxPooling2D", "GlobalMaxPool2D")}
    )
    if max_pooled:
        raise KerasError(
            f"the model pools its features with {max_pooled[0]} (pooling='max'); DenseNet's head, and densetriton's, "
            f"is global average pooling"
        )
    foreign = sorted(
        {
            f"{c['class_name']} ({c['config'].get('name', '?')})"
            for c in layers
            if c["class_name"] not in _DENSENET_LAYERS
        }
    )
    if foreign:
        raise KerasError(
            f"the model has layers a DenseNet does not: {', '.join(foreign[:6])}. Such layers change what the "
            f"model computes without leaving a weight to convert; preprocessing inside the model (Rescaling, "
            f"Normalization, Lambda) is recorded with convert --mean/--std/--resize-size instead"
        )
    if any(
        c["class_name"] == "ReLU"
        and any(c["config"].get(k) not in (None, 0, 0.0) for k in ("max_value", "negative_slope", "threshold"))
        for c in layers
    ):
        raise KerasError(
            "the model has a ReLU with max_value, negative_slope or threshold set; a DenseNet's ReLU is plain"
        )
    activations = set()
    for c in layers:
        act = c["config"].get("activation")
        if isinstance(act, dict):  # a serialised function or object
            inner = act.get("config")
            act = inner if isinstance(inner, str) else (inner or {}).get("name") or act.get("class_name")
        if act is not None:
            activations.add(str(act))
    others = activations - _DENSENET_ACTIVATIONS
    if others:
        raise KerasError(
            f"the model uses {', '.join(sorted(others))} where a DenseNet has ReLU; densetriton computes "
            f"DenseNet's BN-ReLU-conv function"
        )
    epsilons = {float(c["config"]["epsilon"]) for c in layers if c["class_name"] == "BatchNormalization"}
    if len(epsilons) > 1:
        raise KerasError(f"its BatchNormalization layers use different epsilons ({sorted(epsilons)})")
    # The head's output: Dense(activation="sigmoid"), or a sigmoid or softmax after it.
    heads = {"sigmoid", "softmax"} & activations
    if any(c["class_name"] == "Softmax" for c in layers):
        heads.add("softmax")
    multi_label = None if len(heads) != 1 else heads == {"sigmoid"}
    return KerasCheckpoint(tensors, epsilons.pop() if epsilons else KERAS_DENSENET_BN_EPS, multi_label)
