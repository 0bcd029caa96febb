"""The converter's errors: a checkpoint that cannot be converted, and one refused before it was read."""

from __future__ import annotations

from ..limits import FileRefused, OverBound, refuse
from ..weights import WeightsError


class ConversionError(WeightsError):
    """A checkpoint that cannot be converted; the message says why and nothing was written."""


class CheckpointRefused(FileRefused, ConversionError):
    """A checkpoint declares more than it holds or than a bound allows (limits.py); nothing past
    the check was read, and the CLI exits with status 2."""


class ArchitectureOverBound(OverBound, ConversionError):
    """A state dict whose tensors describe a network over one of limits.py's bounds (a block per
    tensor name, say): a ConversionError to convert_state_dict's callers; convert_checkpoint and
    load_weights refuse the file that holds it (an OverBound)."""


def refused(path, what: str, declared, bound, error: type[FileRefused] = CheckpointRefused) -> FileRefused:
    """The one-line refusal (limits.refuse) as the converter's own error type."""
    return error(str(refuse(path, what, declared, bound)))


def one_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has none: torch's C++ errors carry
    a backtrace, and some errors (MemoryError) have no message at all."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__
