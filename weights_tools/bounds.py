"""What a checkpoint may declare, checked against limits.py and against what the file holds,
before anything is inflated, unpickled, allocated or materialised.

- zip members (torch checkpoints, .keras archives): uncompressed sizes from the zip directory,
  against their compressed sizes (a high ratio is a decompression bomb: float weights hardly
  compress) and absolute bounds;
- pickle streams: size, opcode count (the unpickler is pure Python: time grows with opcodes) and
  nesting depth (CPython crashes hashing a tuple nested ~200,000 deep), from a scan of the opcodes;
- JSON (a .keras config, a file's metadata): size and nesting depth (limits.load_json);
- tensors: numel * itemsize must fit in their storage from their offset (a stride-0 view of 20
  million classes is 18 KB on disk), and their bytes, one by one and in all, within bounds.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import zipfile

import torch

from .. import limits
from ..limits import (
    MAX_COMPRESSION_RATIO,
    MAX_PICKLE_BYTES,
    MAX_PICKLE_DEPTH,
    MAX_PICKLE_OPS,
    MAX_TENSOR_BYTES,
    MAX_TOTAL_TENSOR_BYTES,
    SMALL_MEMBER_BYTES,
    FileRefused,
)
from .errors import CheckpointRefused, refused

# Opcodes that add to the container under their operands rather than building a new object.
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


def check_zip_members(archive: zipfile.ZipFile, path, error: type[FileRefused] = CheckpointRefused) -> None:
    """Every member's declared size, from the zip directory: within the ratio to its compressed
    size (unless small), within MAX_TENSOR_BYTES, and all of them within MAX_TOTAL_TENSOR_BYTES;
    then the members together (check_zip_totals)."""
    total = 0
    for info in archive.infolist():
        name = ascii(info.filename)
        if info.file_size > SMALL_MEMBER_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
            raise refused(
                path,
                f"zip member {name}'s size ({info.compress_size} bytes compressed)",
                f"{info.file_size} bytes",
                f"{MAX_COMPRESSION_RATIO} times its compressed size",
                error,
            )
        if info.file_size > MAX_TENSOR_BYTES:
            raise refused(
                path, f"zip member {name}'s size", f"{info.file_size} bytes", f"{MAX_TENSOR_BYTES} bytes", error
            )
        total += info.file_size
    if total > MAX_TOTAL_TENSOR_BYTES:
        raise refused(path, "the zip members' total size", f"{total} bytes", f"{MAX_TOTAL_TENSOR_BYTES} bytes", error)
    check_zip_totals(archive, path, error)


def check_zip_totals(archive: zipfile.ZipFile, path, error: type[FileRefused] = CheckpointRefused) -> None:
    """The members together: their compressed sizes within the archive's bytes (members overlapping,
    or a directory that lies, declare more), and their sizes within MAX_COMPRESSION_RATIO times
    their compressed sizes unless small in all -- each small member is exempt from the ratio, so
    a few MB of small members can each inflate 16 MiB of zeros."""
    infos = archive.infolist()
    inflated, compressed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
    held = _archive_bytes(archive)
    if held is not None and compressed > held:
        raise refused(
            path,
            "the zip members' total compressed size (members overlap, or the zip directory is wrong)",
            f"{compressed} bytes",
            f"the archive's {held} bytes",
            error,
        )
    if inflated > SMALL_MEMBER_BYTES and inflated > MAX_COMPRESSION_RATIO * compressed:
        raise refused(
            path,
            f"the zip members' total size ({compressed} bytes compressed)",
            f"{inflated} bytes",
            f"{MAX_COMPRESSION_RATIO} times their compressed size",
            error,
        )


def _archive_bytes(archive) -> int | None:
    """The size of the file an open ZipFile reads, or None when it reads no file."""
    fp = getattr(archive, "fp", None)
    try:
        return os.fstat(fp.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        try:
            return len(fp.getbuffer())  # an in-memory archive
        except AttributeError:
            return None


def scan_pickle(source, path, what: str = "the pickle", used: int = 0) -> int:
    """Walk a pickle's opcodes (bytes, or a file positioned at its start and left after its STOP)
    without building anything, refusing it past MAX_PICKLE_BYTES, MAX_PICKLE_OPS (less the `used`
    opcodes of the file's earlier pickles) or MAX_PICKLE_DEPTH; returns its opcode count. Each
    stack entry is a cell holding its nesting depth; the memo and DUP share cells, so a container
    filled after it was memoised is seen at its final depth. A malformed stream raises ValueError
    (the unpickler would fail on it too)."""
    stack, marks, memo = [], [], {}
    count = 0
    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(_Bounded(source, path, what)), 1):
            if used + count > MAX_PICKLE_OPS:
                whose = f"{what}'s opcode count" + (" (with the file's earlier pickles)" if used else "")
                raise refused(path, whose, f"{used + count} or more", MAX_PICKLE_OPS)
            depth = _step(op, arg, stack, marks, memo)
            if depth > MAX_PICKLE_DEPTH:
                raise refused(path, f"{what}'s nesting depth", f"{depth} or more", MAX_PICKLE_DEPTH)
    except (IndexError, KeyError) as e:
        raise ValueError(f"{what} is malformed ({type(e).__name__} at an opcode)") from None
    return count


def _step(op, arg, stack: list, marks: list, memo: dict) -> int:
    """One opcode's effect on the stack of depth cells; returns the depth it built (0 if none)."""
    name = op.name
    if name == "MARK":
        marks.append(len(stack))
    elif name in _PUT:
        memo[arg] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name in _GET:
        stack.append(memo[arg])
    elif name == "DUP":
        stack.append(stack[-1])
    elif name == "POP" and marks and len(stack) == marks[-1]:
        marks.pop()  # POP on an empty frame pops the mark, as pickle does
    else:
        return _consume(op, stack, marks)
    return 0


def _consume(op, stack: list, marks: list) -> int:
    before = op.stack_before
    children = []
    if pickletools.markobject in before:
        base = marks.pop()
        children = [cell[0] for cell in stack[base:]]
        del stack[base:]
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    operands = stack[len(stack) - below :] if below else []
    if len(operands) < below:
        raise IndexError("stack underflow")
    del stack[len(stack) - below :]
    if op.name in _IN_PLACE:  # the container under the operands grows by what is put in it
        target = operands[0]
        children += [cell[0] for cell in operands[1:]]
        target[0] = max(target[0], 1 + max(children, default=-1))
        stack.append(target)
        return target[0]
    children += [cell[0] for cell in operands]
    depth = 1 + max(children) if children else 0
    stack.extend([depth] for _ in op.stack_after)
    return depth


class _Bounded:
    """A pickle source that yields at most MAX_PICKLE_BYTES: genops then stops on a short read."""

    def __init__(self, source, path, what: str):
        self.source = source if hasattr(source, "read") else io.BytesIO(source)
        self.left, self.path, self.what = MAX_PICKLE_BYTES, path, what

    def read(self, n: int = -1) -> bytes:
        want = self.left if n is None or n < 0 else n
        if want > self.left:
            raise refused(
                self.path, f"{self.what}'s size", f"over {MAX_PICKLE_BYTES} bytes", f"{MAX_PICKLE_BYTES} bytes"
            )
        data = self.source.read(want)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.source.readline(self.left + 1)
        if len(line) > self.left:
            raise refused(
                self.path, f"{self.what}'s size", f"over {MAX_PICKLE_BYTES} bytes", f"{MAX_PICKLE_BYTES} bytes"
            )
        self.left -= len(line)
        return line

    def tell(self) -> int:
        return self.source.tell()


def load_json(text: str | bytes, path, what: str, error: type[FileRefused] = CheckpointRefused):
    """limits.load_json (size and nesting depth bounded before parsing), its refusal as `error`."""
    try:
        return limits.load_json(text, path, what)
    except FileRefused as e:
        raise error(str(e)) from None


# Dimensions of one tensor: a DenseNet's have at most 4 (5 in a 3-D one, which is refused by name);
# 100,000 dimensions of size 0 fit any storage, and every message naming the shape is 600 KB.
MAX_TENSOR_DIMS = 8


def tensor_fits(size, stride, offset: int, itemsize: int, storage_bytes: int) -> str | None:
    """Why a tensor of this size, stride and offset does not fit its storage, or None if it does:
    its elements (numel * itemsize, from the offset) and its extent (the last element it reaches)
    must both lie inside the storage, so a stride-0 or overlapping view is refused."""
    if len(size) > MAX_TENSOR_DIMS:
        return f"{len(size)} dimensions (at most {MAX_TENSOR_DIMS} read)"
    if any(not isinstance(v, int) or v < 0 for v in (*size, *stride, offset)) or len(size) != len(stride):
        return f"a size {tuple(size)[:16]}, stride {tuple(stride)[:16]} and offset {offset!r} no tensor has"
    numel = math.prod(size)
    if numel == 0:
        return None
    extent = 1 + sum((s - 1) * st for s, st in zip(size, stride))
    room = storage_bytes - offset * itemsize
    if numel * itemsize > room or extent * itemsize > room:
        return (
            f"{numel} elements of {itemsize} bytes (shape {tuple(size)}, stride {tuple(stride)}) in a storage of "
            f"{storage_bytes} bytes from offset {offset}"
        )
    return None


def check_tensor(t: torch.Tensor, name: str, path) -> int:
    """A loaded tensor: dense, within its storage and MAX_TENSOR_BYTES. Returns its bytes."""
    if t.layout != torch.strided:
        raise refused(path, f"tensor {name!a}'s layout", t.layout, "dense (strided) tensors")
    if t.device.type == "meta":
        raise refused(path, f"tensor {name!a}'s device", "meta (no data)", "tensors with data")
    why = tensor_fits(
        tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.element_size(), t.untyped_storage().nbytes()
    )
    if why is not None:
        raise refused(path, f"tensor {name!a}", why, "its storage")
    nbytes = t.numel() * t.element_size()
    if nbytes > MAX_TENSOR_BYTES:
        raise refused(path, f"tensor {name!a}'s size", f"{nbytes} bytes", f"{MAX_TENSOR_BYTES} bytes")
    return nbytes


def check_tensors(tensors: dict, path) -> None:
    """check_tensor for every tensor of a state dict, and their total within MAX_TOTAL_TENSOR_BYTES
    and within the bytes of the storages they view (unless small), before any of them is copied
    or made contiguous: tensors each fitting one storage of 16 MiB, many of them viewing it, are
    gigabytes once each is written out."""
    found = [t for t in tensors.values() if isinstance(t, torch.Tensor)]
    total = sum(check_tensor(t, str(k), path) for k, t in tensors.items() if isinstance(t, torch.Tensor))
    if total > MAX_TOTAL_TENSOR_BYTES:
        raise refused(path, "the tensors' total size", f"{total} bytes", f"{MAX_TOTAL_TENSOR_BYTES} bytes")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in found}
    held = sum(storages.values())
    if total > SMALL_MEMBER_BYTES and total > held:
        raise refused(
            path,
            f"the tensors' total size (views sharing {len(storages)} storages)",
            f"{total} bytes",
            f"the {held} bytes of their storages",
            error=CheckpointRefused,
        )
