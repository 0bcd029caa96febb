"""Conversion of torchvision's and other people's DenseNet checkpoints into densetriton weights files."""

from .convert import (
    ConversionError,
    convert_checkpoint,
    convert_module,
    convert_state_dict,
    convert_torchvision,
    infer_spec,
    load_checkpoint,
    normalize_state_dict,
)
from .errors import CheckpointRefused
from .readers import Checkpoint, read_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointRefused",
    "ConversionError",
    "convert_checkpoint",
    "convert_module",
    "convert_state_dict",
    "convert_torchvision",
    "infer_spec",
    "load_checkpoint",
    "normalize_state_dict",
    "read_checkpoint",
]
