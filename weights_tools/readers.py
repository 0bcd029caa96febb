"""Checkpoint readers: one per file format, each returning a Checkpoint, chosen in one place.

A reader reads a file without executing anything in it and within limits.py's bounds (a file
over one is a CheckpointRefused); the converter then normalises what it returns, whatever the
format. Adding a format is one reader function and one line in READERS.
"""

from __future__ import annotations

import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..limits import MAX_TENSOR_BYTES, MAX_TOTAL_TENSOR_BYTES, FileRefused
from ..spec import DenseNetSpec
from ..weights import FORMAT, check_safetensors_header
from .bounds import load_json
from .errors import CheckpointRefused, ConversionError, one_line, refused
from .keras_h5 import KERAS_SUFFIXES, read_keras
from .pickled_module import HostileCheckpoint, load_pickled, replace_modules


@dataclass(frozen=True)
class Checkpoint:
    """What a reader found: the tensors, as the file nests them (a state dict, possibly under
    "state_dict" or beside an EMA copy), and what the file records beside them that a conversion
    keeps unless told otherwise (class_names, preprocessing, bn_eps, multi_label, operating_points)."""

    state: dict
    carried: dict = field(default_factory=dict)


def read_torch(path: Path) -> Checkpoint:
    """torch.save files (.pth, .pt, .pth.tar, .ckpt, .bin: zip or legacy format): state dicts and
    whole pickled modules, read by pickled_module's restricted unpickler."""
    _check_not_other_format(path)
    if tarfile.is_tarfile(str(path)):
        raise ConversionError(
            f"{path} is a tar checkpoint (torch < 0.4), which is not read: load it in an old torch "
            f"you trust and save its state_dict()"
        )
    try:
        return Checkpoint(replace_modules(load_pickled(path), path=path))
    except FileRefused:
        raise
    except HostileCheckpoint as e:
        raise CheckpointRefused(
            f"refusing to load {path}: it asks to call {e}, which a checkpoint has no reason to do "
            f"(nothing from the file was run)"
        ) from None
    except Exception as e:  # noqa: BLE001 -- whatever a malformed pickle makes the unpickler raise
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({one_line(e)})") from None


def read_safetensors(path: Path) -> Checkpoint:
    """A safetensors file, after bounding the sizes its header declares (the library checks that
    the file holds them); a densetriton weights file's metadata is carried."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    _check_not_other_format(path)
    check_safetensors_header(path)  # length and tensor count; the library itself reads headers up to 100 MB
    try:
        total = 0
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
                piece = f.get_slice(name)
                nbytes = math.prod(piece.get_shape()) * _DTYPE_BYTES.get(piece.get_dtype(), 8)
                if nbytes > MAX_TENSOR_BYTES:
                    raise refused(path, f"tensor {name!a}'s size", f"{nbytes} bytes", f"{MAX_TENSOR_BYTES} bytes")
                total += nbytes
            metadata = f.metadata() or {}
        if total > MAX_TOTAL_TENSOR_BYTES:
            raise refused(path, "the tensors' total size", f"{total} bytes", f"{MAX_TOTAL_TENSOR_BYTES} bytes")
        tensors = load_file(str(path))
    except FileRefused:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, MemoryError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({one_line(e)})") from None
    return Checkpoint(tensors, _densetriton_metadata(metadata, path))


def read_keras_file(path: Path) -> Checkpoint:
    """Keras .h5 / .keras (see keras_h5): the tensors under torchvision's names, BatchNorm's
    epsilon and the head's activation from the model config."""
    keras = read_keras(path)
    return Checkpoint(keras.tensors, {"bn_eps": keras.bn_eps, "multi_label": keras.multi_label})


# Which reader reads a file: the first whose suffixes the file's name ends with; torch.save files
# have no one suffix, so read_torch reads the rest.
READERS: tuple[tuple[tuple[str, ...], Callable[[Path], Checkpoint]], ...] = (
    (KERAS_SUFFIXES, read_keras_file),
    ((".safetensors",), read_safetensors),
)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file with the reader for its format (READERS)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    reader = next((read for suffixes, read in READERS if path.suffix.lower() in suffixes), read_torch)
    return reader(path)


def _check_not_other_format(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ConversionError(f"{path} is empty (0 bytes): not a checkpoint")
    if head.startswith(b"\x93NUMPY"):
        raise ConversionError(f"{path} is a NumPy array file, not a PyTorch checkpoint")


# Bytes per element of safetensors' dtype names (an unknown one counts as 8, the largest).
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def _densetriton_metadata(metadata: dict, path: Path) -> dict:
    """A densetriton file's class names, preprocessing, multi_label, operating points and BatchNorm
    epsilon (each one that parses), so converting the file again -- to record a preprocessing, say
    -- keeps what it had."""
    if metadata.get("format") != FORMAT:
        return {}
    carried = {}
    for key in ("class_names", "preprocessing", "multi_label", "operating_points"):
        try:
            carried[key] = load_json(metadata[key], path, f"the metadata's {key}")
        except FileRefused:
            raise
        except (KeyError, ValueError):
            pass  # absent or unreadable: the caller's (or no) value, as for any checkpoint
    try:
        carried["bn_eps"] = DenseNetSpec.from_json(metadata["spec"]).bn_eps
    except (KeyError, ValueError, TypeError, RecursionError):
        pass
    return carried
