"""The weights file: safetensors under torchvision's state-dict names, plus metadata.

Tensors are stored unfolded (every BatchNorm keeps weight, bias, running_mean, running_var), so
a file converts back to a torchvision state dict bit-exactly; folding happens when a plan is
built. Metadata (all strings, as safetensors requires):

    format          "densetriton"
    format_version  "1"
    spec            the DenseNetSpec as JSON
    class_names     JSON list of class names, when known
    preprocessing   JSON {"resize_size", "crop_size", "mean", "std"}, when known
    multi_label     JSON true when the model was trained multi-label (a sigmoid per class, as
                    chest X-ray models are), false for a softmax; absent when not known
    operating_points  multi-label models only, when known: JSON list, one per class, of the
                    sigmoid output at which the class is called positive (torchxrayvision's
                    op_threshs), or null for an output without one; see images.probabilities
    source          where the weights came from

A plain safetensors file with torchvision-layout keys and no metadata (timm's DenseNet files,
for instance) loads too: the spec is inferred from the tensor shapes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write
from .limits import MAX_IMAGE_SIDE, MAX_JSON_BYTES, MAX_TENSOR_COUNT, FileRefused, OverBound, load_json, refuse
from .spec import DenseNetSpec, describe_spec

FORMAT = "densetriton"
FORMAT_VERSION = "1"

# ImageNet preprocessing as torchvision's DenseNet weights define it.
IMAGENET_PREPROCESSING = {
    "resize_size": 256,
    "crop_size": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def default_preprocessing(spec: DenseNetSpec) -> dict | None:
    """What a model without recorded preprocessing gets: torchvision's ImageNet preprocessing for an
    RGB ImageNet-stem model, else none (a CIFAR-stem or non-RGB model's cannot be guessed)."""
    return IMAGENET_PREPROCESSING if spec.stem == "imagenet" and spec.in_channels == 3 else None


class WeightsError(ValueError):
    """A weights file or checkpoint that cannot be used; the message says why."""


@dataclass
class Weights:
    spec: DenseNetSpec
    tensors: dict[str, torch.Tensor]
    _: KW_ONLY  # what a file records besides its tensors: by name only
    class_names: list[str] | None = None
    preprocessing: dict | None = None
    source: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    multi_label: bool | None = None
    operating_points: list[float | None] | None = None


def cache_dir() -> Path:
    """Where pretrained files are cached: $DENSETRITON_HOME, else $XDG_CACHE_HOME/densetriton,
    else ~/.cache/densetriton."""
    if os.environ.get("DENSETRITON_HOME"):
        return Path(os.environ["DENSETRITON_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "densetriton"
    return Path.home() / ".cache" / "densetriton"


def listing(names, limit=12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# Files that `densetriton convert --checkpoint` reads and `load` does not: PyTorch pickles, Keras.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt", ".h5", ".hdf5", ".keras")

# What the kernels and the reference path read; float8, integer, bool and complex tensors are refused.
TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def layout_problems(tensors: dict[str, torch.Tensor], spec: DenseNetSpec) -> list[str]:
    """Missing, unexpected and mis-shaped tensors: what a spec that does not describe them gives."""
    return shape_problems({k: tuple(t.shape) for k, t in tensors.items()}, spec)


def shape_problems(shapes: dict[str, tuple[int, ...]], spec: DenseNetSpec) -> list[str]:
    """layout_problems from the tensors' names and shapes alone (a file's header, before its tensors are read)."""
    expected = spec.state_dict_shapes()
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshaped = [
        f"{k} {tuple(shapes[k])} (expected {expected[k]})"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {listing(misshaped)}")
    return problems


def value_problems(tensors: dict[str, torch.Tensor], spec: DenseNetSpec) -> list[str]:
    """Tensors of the right names and shapes that no network can use: wrong dtype, NaN or Inf,
    negative BatchNorm variances (every output would be NaN)."""
    names = [k for k in spec.state_dict_shapes() if k in tensors]
    bad_dtype = [f"{k} ({tensors[k].dtype})" for k in names if tensors[k].dtype not in TENSOR_DTYPES]
    if bad_dtype:
        return [f"{len(bad_dtype)} not floating point (float16, bfloat16, float32 or float64): {listing(bad_dtype)}"]
    problems = []
    not_finite = [k for k in names if not torch.isfinite(tensors[k]).all()]
    if not_finite:
        problems.append(f"{len(not_finite)} with NaN or Inf values: {listing(not_finite)}")
    negative = [k for k in names if k.endswith("running_var") and (tensors[k] < 0).any()]
    if negative:
        problems.append(f"{len(negative)} BatchNorm variances below zero: {listing(negative)}")
    return problems


def check_tensors(tensors: dict[str, torch.Tensor], spec: DenseNetSpec) -> None:
    """One error listing every missing, unexpected, mis-shaped or unusable tensor."""
    problems = layout_problems(tensors, spec) or value_problems(tensors, spec)
    if problems:
        raise WeightsError(f"weights do not fit {describe_spec(spec)}: " + "; ".join(problems))


def check_class_names(class_names, spec: DenseNetSpec) -> list[str]:
    """The class names as strings: a sequence of strings or numbers (older files may hold integer
    labels), one per class."""
    if (
        isinstance(class_names, (str, bytes))
        or not isinstance(class_names, Sequence)
        or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in class_names)
    ):
        raise WeightsError(f"class names must be a list of strings, got {class_names!r:.80}")
    if not spec.num_classes:
        raise WeightsError("class names need a classifier, and this model has none (num_classes 0: features only)")
    if len(class_names) != spec.num_classes:
        raise WeightsError(f"{len(class_names)} class names for a {spec.num_classes}-class classifier")
    return [str(c) for c in class_names]


def check_operating_points(points, spec: DenseNetSpec, multi_label: bool | None) -> list[float | None]:
    """One per class: a probability strictly between 0 and 1, or None (NaN counts as None, as
    torchxrayvision marks outputs it did not train); only for a multi-label model."""
    if not spec.num_classes:
        raise WeightsError("operating points need a classifier, and this model has none (num_classes 0: features only)")
    if multi_label is not True:
        raise WeightsError(
            "operating points need a multi-label model (a sigmoid per class): record it with --multi-label"
        )
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise WeightsError(f"operating points must be a list, got {points!r:.80}")
    out = []
    for p in points:
        if p is None or (isinstance(p, float) and math.isnan(p)):
            out.append(None)
        elif (
            isinstance(p, (int, float))
            and not isinstance(p, bool)
            and 0 < float(torch.tensor(p, dtype=torch.float32)) < 1
        ):
            out.append(float(p))  # strictly inside (0, 1) in float32 too, as probabilities computes
        else:
            raise WeightsError(
                f"operating points must lie strictly between 0 and 1 (or be null/nan: none), got {p!r:.40}"
            )
    if len(out) != spec.num_classes:
        raise WeightsError(f"{len(out)} operating points for a {spec.num_classes}-class classifier")
    if all(p is None for p in out):
        raise WeightsError("every operating point is null: record none instead")
    return out


def check_preprocessing(preprocessing, channels: int = 3) -> None:
    """The keys images.build_transform reads: sizes as torchvision's Resize and CenterCrop take
    them (a positive int, one or two of them, or None), mean and std of one number per input
    channel (std > 0). Only an RGB model may leave mean and std out (ImageNet's are filled in)."""

    def is_size(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(preprocessing, dict):
        raise WeightsError(f"preprocessing must be a dict, got {preprocessing!r:.80}")
    problems = []
    for key in ("resize_size", "crop_size"):
        v = preprocessing.get(key)
        if v is not None and not (
            is_size(v) or (isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(map(is_size, v)))
        ):
            problems.append(f"{key} {v!r:.60} is not a positive integer or a pair of them")
    oversized = oversized_side(preprocessing)
    if oversized:
        problems.append(f"{oversized[0]} {oversized[1]} is over the bound of {MAX_IMAGE_SIDE} pixels a side")
    for key in ("mean", "std"):
        v = preprocessing.get(key)
        if v is None and channels != 3:
            problems.append(f"{key} is missing (a {channels}-channel model has no default)")
        elif v is not None and not (isinstance(v, (list, tuple)) and len(v) == channels and all(map(is_number, v))):
            finite = (
                "" if not isinstance(v, (list, tuple)) or all(map(is_number, v)) or len(v) != channels else "finite "
            )
            problems.append(
                f"{key} {v!r:.60} is not {channels} {finite}number{'s' * (channels != 1)} (one per input channel)"
            )
        elif key == "std" and v is not None and min(v) <= 0:
            problems.append(f"std {v!r} is not positive")
    if problems:
        raise WeightsError("preprocessing: " + "; ".join(problems))


def oversized_side(preprocessing: dict) -> tuple[str, int] | None:
    """The first resize or crop side over MAX_IMAGE_SIDE, as (key, side): a resize to 20000 makes
    every image gigabytes before the model sees it."""
    for key in ("resize_size", "crop_size"):
        v = preprocessing.get(key)
        for side in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(side, int) and side > MAX_IMAGE_SIDE:
                return key, side
    return None


def check_crop_fits(preprocessing: dict) -> None:
    """A center crop larger than the resized image would pad it with black (torchvision's
    CenterCrop pads): no model is trained that way, so a new file may not record it."""
    resize, crop = preprocessing.get("resize_size"), preprocessing.get("crop_size")
    if resize is None or crop is None:
        return
    ch, cw = (crop[0], crop[-1]) if isinstance(crop, (list, tuple)) else (crop, crop)
    if isinstance(resize, (list, tuple)) and len(resize) == 2:  # exactly H x W
        pads = ch > resize[0] or cw > resize[1]
    else:  # the shorter side: every image pads when both crop sides exceed it
        pads = min(ch, cw) > (resize[0] if isinstance(resize, (list, tuple)) else resize)
    if pads:
        raise WeightsError(
            f"preprocessing: crop_size {crop} is larger than the resized image (resize_size {resize}), "
            f"which the crop would pad with black"
        )


def save_weights(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    spec: DenseNetSpec,
    *,
    class_names: list[str] | None = None,
    preprocessing: dict | None = None,
    source: str | None = None,
    multi_label: bool | None = None,
    operating_points: Sequence[float | None] | None = None,
) -> Path:
    """Validate and write a weights file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    check_tensors(tensors, spec)
    if multi_label is not None and not isinstance(multi_label, bool):
        raise WeightsError(f"multi_label must be True, False or None, got {multi_label!r:.40}")
    if multi_label and not spec.num_classes:
        raise WeightsError("multi_label needs a classifier, and this model has none (num_classes 0: features only)")
    if class_names is not None:
        class_names = check_class_names(class_names, spec)
    if preprocessing is not None:
        check_preprocessing(preprocessing, spec.in_channels)
        check_crop_fits(preprocessing)
    if operating_points is not None:
        operating_points = check_operating_points(operating_points, spec, multi_label)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_json()}
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    if preprocessing is not None:
        metadata["preprocessing"] = json.dumps(preprocessing)
    if multi_label is not None:
        metadata["multi_label"] = json.dumps(multi_label)
    if operating_points is not None:
        metadata["operating_points"] = json.dumps(operating_points)
    if source is not None:
        metadata["source"] = source
    ordered = {k: tensors[k].detach().to("cpu").contiguous() for k in spec.state_dict_shapes()}
    return atomic_write(path, lambda tmp: save_file(ordered, tmp, metadata=metadata))


def check_safetensors_header(path: Path) -> None:
    """A safetensors file starts with its header's length (8 bytes, little-endian), then the header
    JSON: one longer than MAX_JSON_BYTES, or listing more than MAX_TENSOR_COUNT tensors (each has
    one "data_offsets" key, counted in the raw bytes), is refused before the library parses it. (A
    length past the end of the file is safetensors' own error, as is what a pickle's or zip's first
    bytes read as.)"""
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        declared = int.from_bytes(head, "little")
        if len(head) == 8 and MAX_JSON_BYTES < declared <= size - 8:
            raise refuse(path, "its safetensors header length", f"{declared} bytes", f"{MAX_JSON_BYTES} bytes")
        count = f.read(min(declared, MAX_JSON_BYTES)).count(b'"data_offsets"')
    if count > MAX_TENSOR_COUNT:
        raise refuse(path, "the tensor count", count, MAX_TENSOR_COUNT)


@dataclass
class FileMetadata:
    """What a densetriton weights file's metadata records, parsed and checked against its spec."""

    spec: DenseNetSpec
    class_names: list[str] | None = None
    preprocessing: dict | None = None
    multi_label: bool | None = None
    operating_points: list[float | None] | None = None


def _metadata_json(path: Path, metadata: dict[str, str], key: str):
    return load_json(metadata[key], path, f"its metadata's {key}") if key in metadata else None


def read_metadata(path: Path, metadata: dict[str, str]) -> FileMetadata:
    """Parse and check a densetriton file's metadata before any tensor is read: a spec over
    limits.py's bounds (or preprocessing sides over MAX_IMAGE_SIDE) is a FileRefused, anything
    else unusable one WeightsError line."""
    if metadata.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise WeightsError(
            f"{path} has format version {metadata.get('format_version'):.40}; this densetriton reads {FORMAT_VERSION}"
        )
    try:
        spec = DenseNetSpec.from_dict(_metadata_json(path, metadata, "spec"))
        found = FileMetadata(
            spec,
            *(
                _metadata_json(path, metadata, key)
                for key in ("class_names", "preprocessing", "multi_label", "operating_points")
            ),
        )
        if not isinstance(found.multi_label, (bool, type(None))):
            raise ValueError(f"multi_label is {metadata['multi_label']!r:.40}, not true or false")
    except OverBound as e:
        raise e.refused_in(path, "its spec's ") from None
    except FileRefused:
        raise
    except (ValueError, TypeError, AttributeError, RecursionError, MemoryError) as e:
        raise WeightsError(f"{path} has unreadable metadata ({one_line(e)})") from None
    if isinstance(found.preprocessing, dict) and oversized_side(found.preprocessing):
        key, side = oversized_side(found.preprocessing)
        raise refuse(path, f"its preprocessing's {key}", side, f"{MAX_IMAGE_SIDE} pixels a side")
    try:
        if found.class_names is not None:
            found.class_names = check_class_names(found.class_names, spec)
        if found.preprocessing is not None:
            check_preprocessing(found.preprocessing, spec.in_channels)
        if found.operating_points is not None:
            found.operating_points = check_operating_points(found.operating_points, spec, found.multi_label)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    return found


def one_line(error: BaseException) -> str:
    """An exception as one line of words: its message, or its type where it has none (a MemoryError)."""
    text = " ".join(str(error).split())[:300]
    if not text or not isinstance(error, ValueError):  # "list index out of range" needs its type to make sense
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _read_tensors(path: Path) -> tuple[dict[str, str], FileMetadata | None, dict[str, torch.Tensor]]:
    """The file's metadata, checked (ours only: None for a plain file), then its tensors: a spec
    that does not describe the header's shapes is refused before any tensor is read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        if metadata.get("format") == "densetriton-features":
            raise WeightsError(f"{path} holds image features written by densetriton embed, not a model's weights")
        found = read_metadata(path, metadata) if "spec" in metadata else None
        if found is not None:
            layout = shape_problems({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, found.spec)
            if layout:
                raise WeightsError(
                    f"{path}: its metadata contradicts its tensors: they do not fit "
                    f"{describe_spec(found.spec)}: " + "; ".join(layout)
                )
        return metadata, found, {k: f.get_tensor(k) for k in f.keys()}


def load_weights(path: str | os.PathLike) -> Weights:
    """Read a weights file: ours (with metadata) or a plain torchvision-layout safetensors file."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        check_safetensors_header(path)
        metadata, found, tensors = _read_tensors(path)
    except (WeightsError, FileRefused):
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, AttributeError, MemoryError) as e:
        hint = ""
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            hint = (
                f"; convert the checkpoint first: densetriton convert --checkpoint {path} --out {path.stem}.safetensors"
            )
        raise WeightsError(f"{path} is not a readable safetensors file ({one_line(e)}){hint}") from None
    if found is None:
        # A plain torchvision-layout file (e.g. timm's): normalise the names, infer the spec.
        from .weights_tools.convert import infer_spec, normalize_state_dict

        tensors = normalize_state_dict(tensors)
        try:
            found = FileMetadata(infer_spec(tensors))
        except OverBound as e:  # e.g. the names of 100,000 empty tensors, one a block
            raise e.refused_in(path, "the spec its tensors describe: ") from None
    try:
        check_tensors(tensors, found.spec)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    return Weights(
        spec=found.spec,
        tensors=tensors,
        class_names=found.class_names,
        preprocessing=found.preprocessing,
        source=metadata.get("source"),
        metadata=metadata,
        multi_label=found.multi_label,
        operating_points=found.operating_points,
    )


def to_torchvision_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's tensors as a torchvision DenseNet state dict (bit-exact)."""
    return load_weights(path).tensors
