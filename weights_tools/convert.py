"""Turn DenseNet checkpoints -- torchvision's, timm's, and people's own -- into weights files.

Checkpoints from the wild differ in packaging, not in substance: weights nested under
"state_dict" or "model", keys prefixed by "module." (DataParallel) or a wrapper's attribute
name, the legacy "norm.1"/"conv.2" keys of old torchvision files, a classifier wrapped in a
Sequential (CheXNet-style heads), MONAI's DenseNet (dense layers' modules under ".layers.", the
classifier as "class_layers.out"), a stem for grayscale or other non-RGB input. All of that is
normalised to torchvision's names (a loss's tensors saved beside the model by a training wrapper,
as a Lightning module's `criterion.pos_weight`, are left out with a warning), the spec is inferred from the tensor shapes (or taken from
--arch), everything is validated, and only then is a file written (to a temporary name, then
renamed).

Only the tensors are read, so what they cannot show is assumed to be torchvision's: ReLU
activations, BatchNorm with eps 1e-5. A MONAI DenseNet built with another `act` (its
default is ReLU) converts but computes another function.

Files are read by readers.py, one reader per format, without executing any code: a restricted
unpickler resolves the few names a checkpoint needs and makes every other class it names an
inert placeholder, so a whole pickled model (torch.save(model), as torchxrayvision publishes)
gives its tensors too (see pickled_module). Before anything is read, what a file declares is
bounded (bounds.py, limits.py): a file over a bound is refused with a CheckpointRefused (exit
status 2 from the CLI). A conversion is then four steps: normalise the keys
(normalize_state_dict, renames in _KEY_RENAMES), infer or check the spec (_resolve_spec,
_validate), decide what the classifier's outputs mean (_head_policy), and save (_save).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..limits import MAX_CLASSES, MAX_KEY_CHARS, OverBound
from ..spec import TORCHVISION_MODELS, DenseNetSpec, describe_spec, get_spec
from ..weights import (
    WeightsError,
    check_crop_fits,
    check_operating_points,
    check_tensors,
    default_preprocessing,
    listing,
    save_weights,
)
from .bounds import check_tensor
from .bounds import check_tensors as check_tensors_fit
from .errors import ArchitectureOverBound, ConversionError, refused
from .readers import read_checkpoint

# Containers under which training scripts commonly nest the weights.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
# Where a DenseNet's own keys begin, after any wrapper's prefix.
_DENSENET_ROOTS = ("features", "classifier", "class_layers")
# Module names training code gives its loss (criterion, loss_fn, train_loss, bce_loss, ...).
_LOSS_MODULE = re.compile(
    r"^(criterion|criterions|loss|losses|(\w+_)?loss(_fn|_func|_function)?|\w+_criterion)$", re.IGNORECASE
)

# Renames to torchvision's current names, applied in this order to every key once its wrapper's
# prefix is dropped: (pattern, replacement, whose names they are).
# DOTALL: a "." that stops at a newline makes "(.*)$" backtrack over a long key once per match.
_KEY_RENAMES = tuple(
    (re.compile(pattern, re.DOTALL), replacement)
    for pattern, replacement, _whose in (
        # Old torchvision checkpoints name a dense layer's modules "norm.1", "conv.2", ...
        (
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
            r"\1\2",
            "torchvision < 0.2",
        ),
        # MONAI's DenseNet: a dense layer's modules sit in a Sequential named "layers", and the head is
        # class_layers = Sequential(relu, pool, flatten, out) -- the same function as torchvision's.
        (r"^(.*denselayer\d+)\.layers\.(.*)$", r"\1.\2", "MONAI"),
        (r"^class_layers\.out\.(weight|bias)$", r"classifier.\1", "MONAI"),
    )
)
# classifier = Sequential(Linear, Sigmoid): renamed only when it holds one Linear (see _unwrap_sequential_classifier).
_SEQUENTIAL_CLASSIFIER = re.compile(r"^classifier\.(\d+)\.(weight|bias)$")


# -- reading ----------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The tensors of a checkpoint file of any format (see readers), as the file nests them."""
    return read_checkpoint(path).state


def _unnest(obj) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint: the dict itself, or one nested under a common key."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()) and not any(
            k in obj and isinstance(obj[k], dict) for k in _NESTING_KEYS
        ):
            return obj
        inner = next((obj[k] for k in _NESTING_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ConversionError(
        "no state dict found in the checkpoint: expected a dict of tensors, possibly nested under one of "
        + ", ".join(repr(k) for k in _NESTING_KEYS)
    )


def _wrapper_prefix(key: str) -> str | None:
    """The part of a key before the DenseNet's own names ("module.", "model.", "backbone.", or ""),
    or None for a key with none of them (a tensor of another module)."""
    parts = key.split(".")
    start = next((i for i, p in enumerate(parts) if p in _DENSENET_ROOTS), None)
    return None if start is None else "".join(p + "." for p in parts[:start])


def _select(checkpoint, prefix: str | None) -> dict:
    """The state dict, or with a prefix the part of it under that prefix: the entries whose keys
    start with it (removed), or a state dict the checkpoint keeps under that name ("state_dict_ema"
    beside "state_dict", "model_ema" beside "model")."""
    if not prefix:
        return _unnest(checkpoint)
    name = prefix.rstrip(".")
    obj = checkpoint
    for _ in range(4):  # the dicts _unnest descends through
        if not isinstance(obj, dict):
            break
        if isinstance(obj.get(name), dict):
            return _unnest(obj[name])
        obj = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
    dotted = name + "."  # whole components: "model." does not select "model_ema.*"
    selected = {
        k[len(dotted) :]: v for k, v in _unnest(checkpoint).items() if isinstance(k, str) and k.startswith(dotted)
    }
    if not any(isinstance(v, torch.Tensor) for v in selected.values()):
        raise ConversionError(
            f"no tensor in the checkpoint has a key starting with {dotted!r}, and it holds no state dict named {name!r}"
        )
    return selected


def _has_classifier(tensors: dict[str, torch.Tensor]) -> bool:
    return any(
        k[len(w) :].split(".")[0] in ("classifier", "class_layers")
        for k in tensors
        if (w := _wrapper_prefix(k)) is not None
    )


def _is_training_state(key: str, value: torch.Tensor) -> bool:
    """A tensor a training wrapper keeps beside its model that no forward pass uses: a loss's
    class weights (`criterion.pos_weight`, `loss_fn.weight`), torch's AveragedModel count."""
    if _wrapper_prefix(key) is not None or value.dim() > 1:
        return False
    return key.split(".")[-1] == "n_averaged" or any(_LOSS_MODULE.match(p) for p in key.split(".")[:-1])


def _adopt_separate_head(tensors: dict[str, torch.Tensor], wrapper: str) -> dict[str, torch.Tensor]:
    """A DenseNet whose classifier was replaced (by nn.Identity) and a Linear head kept beside it
    (`backbone.features...` and `head.weight`, `head.bias`): the head becomes the classifier, when
    it is all the checkpoint holds besides the DenseNet -- one module, a 2-D weight and its bias
    (a zero bias when it has none: the same function). Anything more (a multi-layer or normalised
    head) is left to fail rather than guessed at."""
    if _has_classifier(tensors):
        return tensors
    outside = {k: v for k, v in tensors.items() if _wrapper_prefix(k) is None}
    modules = {k.rpartition(".")[0] for k in outside}
    if len(modules) != 1 or "" in modules:
        return tensors
    (module,) = modules
    weight, bias = outside.get(f"{module}.weight"), outside.get(f"{module}.bias")
    if (
        weight is None
        or weight.dim() != 2
        or len(outside) != 1 + (bias is not None)
        or (bias is not None and tuple(bias.shape) != (weight.shape[0],))
    ):
        return tensors
    warnings.warn(
        f"took {module!r} ({weight.shape[0]} outputs) as the classifier: the checkpoint's DenseNet has "
        f"none, and this Linear is the only other module (assumed applied to the pooled features, as "
        f"DenseNet's classifier is)",
        stacklevel=4,
    )
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    rest = {k: v for k, v in tensors.items() if k not in outside}
    return {**rest, f"{wrapper}classifier.weight": weight, f"{wrapper}classifier.bias": bias}


def _outside_hint(state_dict: dict, unexpected: list[str]) -> str:
    """For an error listing unexpected tensors: how to convert the DenseNet alone, when those sit
    outside its wrapper and the user knows they take no part in the model's outputs."""
    keys = [k for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    wrappers = {_wrapper_prefix(k) for k in keys} - {None}
    if len(wrappers) != 1 or "" in wrappers or not unexpected:
        return ""
    (wrapper,) = wrappers
    if any(_wrapper_prefix(k) is not None or k.startswith(wrapper) for k in unexpected):
        return ""
    return (
        f" (if {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} take no part in the model's "
        f"outputs, --prefix {wrapper} converts the DenseNet alone)"
    )


def normalize_state_dict(state_dict: dict, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Rename a DenseNet state dict to torchvision's current names (see the module docstring).

    prefix: take only the tensors under it (a checkpoint holding two models, such as `model.` and
    its EMA copy `model_ema.`, or `state_dict` and `state_dict_ema`). A loss's tensors saved beside
    the model (`criterion.pos_weight`, as a Lightning checkpoint holds them) are left out with a
    warning naming them; any other tensor a DenseNet does not have fails the conversion, since
    it may take part in the model's outputs (a Linear after the classifier, a temperature)."""
    found = _select(state_dict, prefix)
    odd = [k for k, v in found.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)]
    if odd:
        raise ConversionError(f"the state dict has a tensor under a key that is not a string: {odd[0]!r}")
    tensors = {
        k: v
        for k, v in found.items()
        if isinstance(v, torch.Tensor)
        and not k.endswith("num_batches_tracked")  # a training counter, not a weight
        and k.split(".")[-1] != "op_threshs"
    }  # torchxrayvision's operating points: metadata (see convert_state_dict)
    if (
        not any(_wrapper_prefix(k) is not None for k in tensors)
        and "conv0.weight" in tensors
        and any(k.startswith("denseblock1.") for k in tensors)
    ):
        # model.features.state_dict(): a backbone saved on its own, its keys without "features."
        tensors = {f"features.{k}": v for k, v in tensors.items()}
    training = sorted(k for k, v in tensors.items() if _is_training_state(k, v))
    if training and any(_wrapper_prefix(k) is not None for k in tensors):
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        warnings.warn(
            f"left out {len(training)} tensor(s) of training state saved beside the model ({shown}): a "
            f"loss's weights or an averaging count, which no forward pass uses",
            stacklevel=3,
        )
        tensors = {k: v for k, v in tensors.items() if k not in training}
    wrappers = {_wrapper_prefix(k) for k in tensors} - {None}
    if len(wrappers) == 1:
        tensors = _adopt_separate_head(tensors, next(iter(wrappers)))
    out = _unwrap_sequential_classifier(_renamed(tensors, wrappers))
    weight = out.get("classifier.weight")
    bias = out.get("classifier.bias")
    if weight is not None and weight.dim() == 2 and weight.shape[0] == 0 and (bias is None or bias.numel() == 0):
        # torchvision's DenseNet(num_classes=0): a Linear with no outputs is no classifier.
        out = {k: v for k, v in out.items() if k not in ("classifier.weight", "classifier.bias")}
    return out


def _renamed(tensors: dict[str, torch.Tensor], wrappers: set) -> dict[str, torch.Tensor]:
    """Every key without its wrapper's prefix ("module.", "model.", "densenet121.", "backbone.",
    ...) and through _KEY_RENAMES; two keys ending at one name are an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(_wrapper_prefix(key) or "") :]
        for pattern, replacement in _KEY_RENAMES:
            name = pattern.sub(replacement, name)
        if name in out:
            several = ""
            if "" not in wrappers and len(wrappers) > 1:
                several = (
                    f": the checkpoint holds DenseNet tensors under {', '.join(map(repr, sorted(wrappers)))}; "
                    f"choose one with --prefix (prefix=...)"
                )
            raise ConversionError(f"two checkpoint tensors map to {name!r} (one is {key!r}){several}")
        out[name] = value
    return out


def _unwrap_sequential_classifier(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """classifier = Sequential(Linear, Sigmoid) -> the Linear's weight and bias."""
    indices = {m.group(1) for k in tensors if (m := _SEQUENTIAL_CLASSIFIER.match(k))}
    if not indices:
        return tensors
    (i,) = indices if len(indices) == 1 else (None,)
    weight = tensors.get(f"classifier.{i}.weight")
    if weight is None or weight.dim() != 2 or "classifier.weight" in tensors:
        raise ConversionError(
            "the classifier is a multi-layer head ("
            + ", ".join(sorted(k for k in tensors if k.startswith("classifier.")))
            + "); densetriton supports DenseNet's single linear classifier, optionally wrapped in a Sequential"
        )
    return {
        (f"classifier.{k.rsplit('.', 1)[1]}" if _SEQUENTIAL_CLASSIFIER.match(k) else k): v for k, v in tensors.items()
    }


def _refuse_3d(tensors: dict[str, torch.Tensor]) -> None:
    """A 3-D DenseNet (MONAI's spatial_dims=3), or one with timm's deep stem, is named as such,
    whatever else is wrong with it."""
    conv0 = tensors.get("features.conv0.weight")
    if conv0 is not None and conv0.dim() == 5:
        raise ConversionError(
            f"features.conv0.weight has shape {tuple(conv0.shape)}: a 3-D DenseNet (MONAI's spatial_dims=3); "
            f"densetriton runs 2-D DenseNets"
        )
    if conv0 is not None and "features.conv1.weight" in tensors:
        raise ConversionError(
            "the stem has three convolutions (features.conv0, conv1, conv2): timm's deep-stem DenseNets "
            "(densenet264d, densenetblur121d); densetriton runs the paper's stems (one 7x7 convolution, or "
            "CIFAR's 3x3), so it cannot convert this one"
        )


def infer_spec(tensors: dict[str, torch.Tensor]) -> DenseNetSpec:
    """Read the architecture off a normalised state dict's shapes."""

    def shape(name):
        if name not in tensors:
            others = sorted(k for k in tensors if k.split(".")[0] not in _DENSENET_ROOTS)
            shown = (
                "; it also holds " + ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
                if others
                else ""
            )
            raise ConversionError(
                f"cannot infer the architecture: no tensor {name!r} (is this a DenseNet checkpoint?){shown}"
            )
        return tuple(tensors[name].shape)

    _refuse_3d(tensors)
    conv0 = shape("features.conv0.weight")
    if len(conv0) != 4 or conv0[2] not in (3, 7) or conv0[2] != conv0[3]:
        raise ConversionError(f"cannot infer the architecture: features.conv0.weight has shape {conv0}")
    stem = "imagenet" if conv0[2] == 7 else "cifar"
    block_config = []
    while f"features.denseblock{len(block_config) + 1}.denselayer1.norm1.weight" in tensors:
        b = len(block_config) + 1
        layers = 0
        while f"features.denseblock{b}.denselayer{layers + 1}.norm1.weight" in tensors:
            layers += 1
        block_config.append(layers)
    if not block_config:
        raise ConversionError("cannot infer the architecture: no features.denseblock1.denselayer1 tensors")
    first = "features.denseblock1.denselayer1"
    if f"{first}.conv2.weight" in tensors:
        growth_rate = shape(f"{first}.conv2.weight")[0]
        width = shape(f"{first}.conv1.weight")[0]
        if width % growth_rate:
            raise ConversionError(
                f"cannot infer bn_size: bottleneck width {width} is not a multiple of k={growth_rate}"
            )
        bn_size = width // growth_rate
    else:
        growth_rate, bn_size = shape(f"{first}.conv1.weight")[0], None
    compression = 1.0
    if len(block_config) > 1:
        t_out, t_in = shape("features.transition1.conv.weight")[:2]
        compression = t_out / t_in
        # Prefer a short decimal (0.5, not 0.50000001) that reproduces every transition's width.
        for digits in range(1, 7):
            theta = round(compression, digits)
            if math.floor(theta * t_in) == t_out:
                compression = theta
                break
    # No classifier at all: a backbone saved for its features (num_classes 0).
    if "classifier.bias" in tensors and "classifier.weight" not in tensors:
        raise ConversionError(
            "cannot infer the architecture: the classifier has a bias (classifier.bias) but no "
            "weight (classifier.weight)"
        )
    num_classes = shape("classifier.weight")[0] if any(k.startswith("classifier.") for k in tensors) else 0
    try:
        return DenseNetSpec(
            growth_rate, tuple(block_config), conv0[0], bn_size, compression, num_classes, stem, conv0[1]
        )
    except OverBound as e:
        raise ArchitectureOverBound(e.what, e.declared, e.bound, prefix="cannot infer the architecture: ") from None
    except ValueError as e:
        raise ConversionError(f"cannot infer the architecture: {e}") from None


# -- converting ---------------------------------------------------------------------------


def convert_state_dict(
    state_dict: dict,
    out: str | os.PathLike,
    *,
    arch: str | DenseNetSpec | None = None,
    class_names: list[str] | None = None,
    preprocessing: dict | None = None,
    source: str | None = None,
    progress: bool | None = None,
    bn_eps: float | None = None,
    multi_label: bool | None = None,
    operating_points: list[float | None] | None = None,
    prefix: str | None = None,
    _carried: frozenset = frozenset(),
) -> Path:
    """Normalise, validate against the spec (given or inferred) and write `out` atomically.

    bn_eps: the BatchNorm epsilon the model was trained with, which no tensor shows (default:
    the given spec's, else torch's 1e-5). multi_label: True for a model trained with a sigmoid
    per class (predict then applies one), False for a softmax, None when not known.
    operating_points: per class, the sigmoid output called positive, or None (default: the
    checkpoint's torchxrayvision `op_threshs` tensor when it has one; they imply multi_label).
    prefix: convert only the tensors whose keys start with it (see normalize_state_dict)."""
    if prefix:
        state_dict = _select(state_dict, prefix)
    _check_keys(_unnest(state_dict), source)
    tensors = normalize_state_dict(state_dict)
    _check_sizes(tensors, source)
    _refuse_3d(tensors)
    spec = _resolve_spec(tensors, arch, bn_eps)
    _validate(tensors, spec, state_dict)
    class_names, multi_label, operating_points = _head_policy(
        spec,
        state_dict,
        source,
        class_names=class_names,
        multi_label=multi_label,
        operating_points=operating_points,
        carried=_carried,
    )
    return _save(
        out,
        tensors,
        spec,
        progress=progress,
        class_names=class_names,
        preprocessing=preprocessing,
        source=source,
        multi_label=multi_label,
        operating_points=operating_points,
    )


def _resolve_spec(
    tensors: dict[str, torch.Tensor], arch: str | DenseNetSpec | None, bn_eps: float | None
) -> DenseNetSpec:
    """The spec to convert to: inferred from the shapes, or the given one (a registry name's
    taking the checkpoint's head size and input channels, and checked against the shapes)."""
    if arch is None:
        spec = infer_spec(tensors)
    elif isinstance(arch, DenseNetSpec):
        spec = arch
    else:
        spec = get_spec(arch)
        # A fine-tuned head of any size, or a stem for grayscale input, is still this architecture.
        if "classifier.weight" in tensors and tensors["classifier.weight"].dim() == 2:
            spec = spec.replace(num_classes=tensors["classifier.weight"].shape[0])
        elif not any(k.startswith("classifier.") for k in tensors):
            spec = spec.replace(num_classes=0)  # a backbone without its classifier
        if "features.conv0.weight" in tensors and tensors["features.conv0.weight"].dim() == 4:
            spec = spec.replace(in_channels=tensors["features.conv0.weight"].shape[1])
        try:
            found = infer_spec(tensors)
        except ArchitectureOverBound:
            raise  # refused whatever arch is given (convert_checkpoint names the file)
        except ConversionError:
            found = None  # not even inferable: the listing in _validate says what is wrong
        if found is not None and found != spec:
            raise ConversionError(
                f"the checkpoint holds {describe_spec(found)}, not {describe_spec(spec)} (--arch {arch})"
            )
    if bn_eps is not None:
        try:
            spec = spec.replace(bn_eps=bn_eps)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    return spec


def _validate(tensors: dict[str, torch.Tensor], spec: DenseNetSpec, state_dict: dict) -> None:
    """Every tensor the spec needs, in its shape, and no other: else an error listing them, with
    a hint when the others sit outside the DenseNet's wrapper."""
    try:
        check_tensors(tensors, spec)
    except WeightsError as e:
        expected = spec.state_dict_shapes()
        unexpected = sorted(k for k in tensors if k not in expected)
        hint = _outside_hint(_unnest(state_dict), unexpected)
        if not spec.num_classes and unexpected and not any(k.startswith("features.") for k in unexpected):
            raise ConversionError(
                f"the DenseNet has no classifier of its own, and the rest of the checkpoint ({listing(unexpected)}) is "
                f"not one Linear layer to take as it: a multi-layer or normalised head is not supported"
                f"{hint.replace('converts the DenseNet alone', 'converts the DenseNet alone, for its features')}"
            ) from None
        raise ConversionError(f"{e}{hint}") from None


def _head_policy(
    spec: DenseNetSpec,
    state_dict: dict,
    source: str | None,
    *,
    class_names,
    multi_label,
    operating_points,
    carried: frozenset,
) -> tuple:
    """What the classifier's outputs mean: (class_names, multi_label, operating_points). A backbone
    takes none (those the converted file carried are left out with a warning); operating points
    come from a torchxrayvision checkpoint's op_threshs when none are given, and imply multi_label."""
    if not spec.num_classes:
        head = {
            "class_names": class_names is not None,
            "multi_label": bool(multi_label),
            "operating_points": operating_points is not None,
        }
        if any(present and name not in carried for name, present in head.items()):
            raise ConversionError(
                "the checkpoint has no classifier (a backbone: features only), so it takes no class "
                "names, --multi-label or operating points"
            )
        if any(head.values()):  # the file converted recorded them for the classifier left out (--prefix)
            warnings.warn(
                f"left out the file's {', '.join(n.replace('_', ' ') for n, p in head.items() if p)}: "
                f"they belong to a classifier this conversion does not keep",
                stacklevel=3,
            )
            class_names, multi_label, operating_points = None, None, None
        warnings.warn(
            f"the checkpoint has no classifier: converted as {describe_spec(spec)}, a backbone that gives "
            f"features only (engine.features, densetriton embed), not predictions",
            stacklevel=3,
        )
    if spec.num_classes == 1000 and class_names is None:
        warnings.warn(
            "no class names recorded for its 1000 classes, so predict shows class indices; for ImageNet-1k's "
            "(torchvision's or timm's weights, or a model fine-tuned from them that kept their classifier) "
            "convert with --class-names imagenet",
            stacklevel=3,
        )
    if operating_points is None and multi_label is not False and spec.num_classes:
        operating_points = _operating_points_in(state_dict, spec, source)
    if operating_points is not None and multi_label is None:
        multi_label = True
    return class_names, multi_label, operating_points


def _save(
    out, tensors: dict[str, torch.Tensor], spec: DenseNetSpec, *, progress: bool | None, preprocessing, **metadata
) -> Path:
    """The spec's tensors copied to contiguous CPU memory (with progress: the slow part for large
    checkpoints on slow disks), written atomically with the metadata."""
    cpu, seen = {}, set()
    shown = None if progress is None else not progress  # None: show on a terminal only
    for name in tqdm(
        spec.state_dict_shapes(), desc=f"converting {describe_spec(spec)}", unit="tensor", disable=shown, leave=False
    ):
        cpu[name] = _own_copy(tensors[name].detach().to("cpu"), seen)
    if preprocessing is None:
        preprocessing = default_preprocessing(spec)
    return save_weights(out, cpu, spec, preprocessing=preprocessing, **metadata)


def _own_copy(t: torch.Tensor, seen: set) -> torch.Tensor:
    """The tensor in contiguous memory of its own: one sharing its storage with a tensor `seen`
    before (two entries of one tensor, views of one buffer) is copied, as safetensors writes no two
    tensors from one storage. (bounds.check_tensors held their total to the storages' bytes.)"""
    storage = t.untyped_storage()
    owned = storage.data_ptr() not in seen and storage.nbytes() == t.numel() * t.element_size()
    seen.add(storage.data_ptr())
    return t if owned and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _check_sizes(tensors: dict[str, torch.Tensor], source: str | None) -> None:
    """Before any tensor is copied or made contiguous: each fits its storage (no stride-0 or
    overlapping view of more than the file holds), within the byte bounds and MAX_CLASSES."""
    where = source or "the state dict"
    check_tensors_fit(tensors, where)
    weight = tensors.get("classifier.weight")
    if weight is not None and weight.dim() >= 1 and weight.shape[0] > MAX_CLASSES:
        raise refused(where, "the classifier's class count", weight.shape[0], MAX_CLASSES)


def _check_keys(found: dict, source: str | None) -> None:
    """Before any key is matched against the renames or listed in an error: each within MAX_KEY_CHARS."""
    long = next((k for k in found if isinstance(k, str) and len(k) > MAX_KEY_CHARS), None)
    if long is not None:
        raise refused(
            source or "the state dict",
            f"the length of a key ({long[:40]!a}...)",
            f"{len(long)} characters",
            MAX_KEY_CHARS,
        )


def _operating_points_in(state_dict: dict, spec: DenseNetSpec, source: str | None) -> list[float | None] | None:
    """torchxrayvision's `op_threshs` (NaN for outputs it did not train), when the checkpoint has
    usable ones; unusable ones (a stale length after a new head, values outside (0, 1), all NaN)
    are left out with a warning rather than stopping the conversion."""
    found = [
        v
        for k, v in _unnest(state_dict).items()
        if isinstance(k, str) and k.split(".")[-1] == "op_threshs" and isinstance(v, torch.Tensor)
    ]
    if len(found) != 1:
        return None
    t = found[0]
    check_tensor(t, "op_threshs", source or "the state dict")  # before .tolist() materialises it
    try:
        if t.dim() != 1 or not t.is_floating_point():
            raise WeightsError(f"a {t.dtype} tensor of shape {tuple(t.shape)}")
        return check_operating_points(t.double().tolist(), spec, multi_label=True)
    except WeightsError as e:
        warnings.warn(
            f"the checkpoint's op_threshs {tuple(t.shape)} do not fit its {spec.num_classes}-class "
            f"classifier as operating points ({e}): left out",
            stacklevel=5,
        )
        return None


def convert_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | DenseNetSpec | None = None,
    class_names: list[str] | None = None,
    preprocessing: dict | None = None,
    progress: bool | None = None,
    bn_eps: float | None = None,
    multi_label: bool | None = None,
    operating_points: list[float | None] | None = None,
    prefix: str | None = None,
) -> Path:
    """Convert a checkpoint file: PyTorch (.pth, .pt, .pth.tar), safetensors, or Keras (.h5,
    .keras; see keras_h5).

    preprocessing: {"resize_size", "crop_size", "mean", "std"} as the model was trained (mean and
    std one value per input channel); default torchvision's ImageNet preprocessing for an RGB
    ImageNet-stem model, else none is recorded. A densetriton weights file converted again keeps
    its class names, preprocessing, BatchNorm epsilon and multi_label unless new ones are given.
    bn_eps: the model's BatchNorm epsilon, for a checkpoint that does not record it (default: a
    Keras model's own, else torch's 1e-5). multi_label: whether the model was trained with a
    sigmoid per class (default: what a Keras model's head applies, else not recorded).
    operating_points: see convert_state_dict (a densetriton file's own are kept). prefix: convert
    only the tensors whose keys start with it, as `model_ema.` for a checkpoint that also holds
    an EMA copy of the model (see normalize_state_dict).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    state_dict, carried = checkpoint.state, checkpoint.carried
    # What comes from the file itself, not from the caller: left out, not refused, if the result has no classifier.
    from_file = frozenset(
        k
        for k, v in (("class_names", class_names), ("multi_label", multi_label), ("operating_points", operating_points))
        if v is None and carried.get(k) is not None
    )
    class_names = class_names if class_names is not None else carried.get("class_names")
    if preprocessing is None and carried.get("preprocessing") is not None:
        preprocessing = carried["preprocessing"]
        try:  # a file written before new files were checked for it: say how to replace it
            check_crop_fits(preprocessing)
        except WeightsError as e:
            raise ConversionError(
                f"{e}; {path.name} records it: pass --mean, --std, --resize-size and --crop-size "
                f"to record the preprocessing the model was trained with"
            ) from None
        except (TypeError, AttributeError, IndexError, KeyError):
            pass  # not even well-formed: save_weights' check_preprocessing says what is wrong
    bn_eps = bn_eps if bn_eps is not None else carried.get("bn_eps")
    multi_label = multi_label if multi_label is not None else carried.get("multi_label")
    if operating_points is None and multi_label is not False:
        operating_points = carried.get("operating_points")  # --no-multi-label drops them
    try:
        return convert_state_dict(
            state_dict,
            out,
            arch=arch,
            class_names=class_names,
            preprocessing=preprocessing,
            source=f"checkpoint:{path.name}",
            progress=progress,
            bn_eps=bn_eps,
            multi_label=multi_label,
            operating_points=operating_points,
            prefix=prefix,
            _carried=from_file,
        )
    except OverBound as e:  # its tensors describe a network over a bound (one a block, say)
        raise refused(path, f"the architecture its tensors describe: {e.what}", e.declared, e.bound) from None


def convert_module(
    model: torch.nn.Module,
    out: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    preprocessing: dict | None = None,
) -> Path:
    """Convert a live torchvision.models.DenseNet (or any module with its layout, MONAI's DenseNet too)."""
    return convert_state_dict(
        model.state_dict(),
        out,
        class_names=class_names,
        preprocessing=preprocessing,
        source=f"module:{type(model).__name__}",
    )


def torchvision_weights(arch: str):
    """torchvision's DEFAULT weights enum entry for a registry name."""
    import torchvision

    if arch not in TORCHVISION_MODELS:
        raise ConversionError(
            f"torchvision publishes no pretrained weights for {arch!r}; it does for: {', '.join(TORCHVISION_MODELS)}"
        )
    return torchvision.models.get_model_weights(arch).DEFAULT


def check_torchvision_file(path: Path) -> None:
    """torchvision's file names end in the first hex digits of their sha256 (densenet121-a639ec97.pth).
    torch.hub checks a download against them, but not a file already in its cache -- where an
    offline user is told to put one: a wrong or damaged file would be labelled torchvision's."""
    match = re.search(r"-([0-9a-f]{8,})\.", path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    found, expected = digest.hexdigest()[: len(match.group(1))], match.group(1)
    if found != expected:
        raise ConversionError(
            f"{path} is not torchvision's file: its sha256 begins {found}, its name says {expected}. "
            f"Delete it (torchvision then downloads the right one) or put the file from "
            f"torchvision's URL there"
        )


def convert_torchvision(arch: str, out: str | os.PathLike, *, progress: bool | None = None) -> Path:
    """Fetch torchvision's pretrained weights through its own weights API and convert them."""
    weights = torchvision_weights(arch)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        check_torchvision_file(cached)
    try:
        state_dict = weights.get_state_dict(progress=progress is not False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch is a RuntimeError
        name = Path(weights.url).name
        raise ConversionError(
            f"could not get torchvision's {arch} weights from {weights.url} ({e}). Without network access, fetch "
            f"that file on another machine and put it in {torch.hub.get_dir()}/checkpoints/, where torchvision looks "
            f"first: it is then checked against the sha256 digits in its name ({name}) and converted with "
            f"torchvision's class names, once. (A checkpoint of your own converts with densetriton convert "
            f"--checkpoint FILE --arch {arch} --out FILE.safetensors, and loads from that path.)"
        ) from None
    return convert_state_dict(
        state_dict,
        out,
        arch=arch,
        class_names=list(weights.meta["categories"]),
        source=f"torchvision:{weights}",
        progress=progress,
    )
