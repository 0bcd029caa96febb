"""Read the files torch.save writes -- the zip format and the legacy one (torch < 1.6) -- with an
unpickler the caller chooses, never through torch.load.

torch.load(weights_only=False) hands TorchScript archives to torch.jit.load, and believes every
size a file declares: the storage a legacy file declares is allocated before its bytes are read.
Here every size is checked (bounds.py) before anything is inflated, unpickled or allocated:
- the zip directory's members (ratio and absolute bounds); a TorchScript archive is refused;
- each pickle's size, opcode count and nesting depth, before it reaches the unpickler;
- each storage against the bytes the file holds for it;
- each tensor's size, stride and offset against its storage, as it is rebuilt -- before anything
  could materialise a stride-0 view.
Only dense CPU tensors come out; the storages' location (cuda:0) is ignored.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..limits import MAX_TOTAL_TENSOR_BYTES
from .bounds import check_zip_members, scan_pickle, tensor_fits
from .errors import refused

# The legacy format's header: pickles of this number and this version, then the platform's.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch.save's storage classes (torch.FloatStorage, ...; torch.cuda.* in legacy files saved on a GPU).
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_CHUNK = 16 << 20


class StorageType:
    """Stands for a storage class a file names: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class Storage:
    """One storage's bytes, and the dtype its tensors read them as."""

    def __init__(self, data: torch.Tensor, dtype: torch.dtype):
        self.data, self.dtype = data, dtype  # data: a uint8 tensor owning the bytes


def is_torchscript(names) -> bool:
    """A TorchScript archive (torch.jit.save): code to run, not a checkpoint."""
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


class TorchFile:
    """One torch.save file being read: its path, the storages read so far and their total."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.storages: dict[str, Storage] = {}
        self.total = 0
        self.opcodes = 0  # of all the file's pickles: a legacy file has five, which share MAX_PICKLE_OPS

    def names(self) -> dict:
        """The names a torch.save pickle uses for storages and tensors, resolved to this reader's."""
        found = {f"{m}.{n}": StorageType(d) for n, d in _STORAGE_DTYPES.items() for m in ("torch", "torch.cuda")}
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            found[f"torch._utils.{name}"] = self.rebuild_tensor
        found["torch._utils._rebuild_tensor_v3"] = self.rebuild_tensor_v3
        for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            found[f"torch._utils.{name}"] = rebuild_parameter
        return found

    def load(self, make_unpickler):
        """The file's object, unpickled by make_unpickler(file) (a pickle.Unpickler subclass)."""
        with open(self.path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # as torch.load tells: a legacy file's storages may hold any bytes
        return self._load_zip(make_unpickler) if zipped else self._load_legacy(make_unpickler)

    # -- tensors ---------------------------------------------------------------------------

    def rebuild_tensor(self, storage, storage_offset, size, stride, *_ignored):
        """torch._utils._rebuild_tensor(_v2): requires_grad, hooks and conj/neg bits are not kept."""
        if not isinstance(storage, Storage):
            raise pickle.UnpicklingError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
        return self._tensor(storage, storage.dtype, storage_offset, size, stride)

    def rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_ignored):
        if not isinstance(storage, Storage) or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("a tensor rebuilt from something other than a storage and a dtype")
        return self._tensor(storage, dtype, storage_offset, size, stride)

    def _tensor(self, storage: Storage, dtype, offset, size, stride) -> torch.Tensor:
        size, stride = tuple(size), tuple(stride)
        itemsize = torch.empty((), dtype=dtype).element_size()
        why = tensor_fits(size, stride, offset, itemsize, storage.data.numel())
        if why is not None:
            raise refused(self.path, "a tensor", why, "its storage")
        return torch.empty((0,), dtype=dtype).set_(storage.data.untyped_storage(), offset, size, stride)

    def _storage_id(self, saved_id, fields: int):
        """(storage type, key, numel[, view]) of a ("storage", type, key, location, numel, ...) id."""
        if not (isinstance(saved_id, tuple) and len(saved_id) == fields and saved_id[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"a persistent id that is not a storage: {type(saved_id).__name__}")
        _, storage_type, key, _location, numel, *view = saved_id
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("a storage of an unknown type or size")
        return storage_type.dtype, str(key), numel, (view[0] if view else None)

    def _claim(self, what: str, nbytes: int, held: int) -> None:
        """A storage declares nbytes: the file must hold them, and all storages fit the bound."""
        if nbytes > held:
            raise refused(self.path, what, f"{nbytes} bytes", f"the {held} bytes the file holds for it")
        self.total += nbytes
        if self.total > MAX_TOTAL_TENSOR_BYTES:
            raise refused(
                self.path, "the storages' total size", f"{self.total} bytes", f"{MAX_TOTAL_TENSOR_BYTES} bytes"
            )

    # -- the zip format --------------------------------------------------------------------

    def _load_zip(self, make_unpickler):
        with zipfile.ZipFile(self.path) as archive:
            check_zip_members(archive, self.path)
            names = archive.namelist()
            if is_torchscript(names):
                raise refused(
                    self.path,
                    "the archive",
                    "a TorchScript model (code/, constants.pkl)",
                    "checkpoints: TorchScript runs code and is not read; save the model's state_dict()",
                )
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise pickle.UnpicklingError("a zip file without torch.save's data.pkl: not a PyTorch checkpoint")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big":
                raise pickle.UnpicklingError(
                    "saved on a big-endian machine: load and save it again on a little-endian one"
                )
            data = archive.read(pickles[0])
            self.opcodes += scan_pickle(data, self.path, "data.pkl")
            unpickler = make_unpickler(io.BytesIO(data))
            unpickler.persistent_load = lambda saved_id: self._zip_storage(archive, prefix, saved_id)
            return unpickler.load()

    def _zip_storage(self, archive: zipfile.ZipFile, prefix: str, saved_id) -> Storage:
        dtype, key, numel, _ = self._storage_id(saved_id, 5)
        if key not in self.storages:
            try:
                info = archive.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!a} is missing from the archive") from None
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            self._claim(f"storage {key!a}", nbytes, info.file_size)
            data = torch.empty(nbytes, dtype=torch.uint8)
            with archive.open(info) as member:
                _read_into(member, data.numpy(), f"storage {key!a}")
            self.storages[key] = Storage(data, dtype)
        return Storage(self.storages[key].data, dtype)

    # -- the legacy format -----------------------------------------------------------------

    def _load_legacy(self, make_unpickler):
        """Five pickles (magic number, format version, platform, the object, its storage keys), each
        scanned then unpickled by the caller's unpickler, as torch.load does; then the storages' bytes."""
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic = self._next_pickle(f, make_unpickler, "the magic number pickle")
            if magic != _LEGACY_MAGIC:
                raise pickle.UnpicklingError("not a PyTorch checkpoint (no torch.save header)")
            if self._next_pickle(f, make_unpickler, "the format version pickle") != _LEGACY_PROTOCOL:
                raise pickle.UnpicklingError("not a PyTorch checkpoint (an unknown torch.save format version)")
            platform = self._next_pickle(f, make_unpickler, "the platform pickle")
            if isinstance(platform, dict) and platform.get("little_endian") is False:
                raise pickle.UnpicklingError(
                    "saved on a big-endian machine: load and save it again on a little-endian one"
                )
            result = self._next_pickle(
                f, make_unpickler, "the object pickle", lambda saved_id, end: self._legacy_storage(saved_id, size - end)
            )
            keys = self._next_pickle(f, make_unpickler, "the storage list pickle")
            self._read_legacy_storages(f, keys)
            return result

    def _next_pickle(self, f, make_unpickler, what: str, load_storage=None):
        """The pickle at f's position, scanned before it is unpickled; f is left after it."""
        start = f.tell()
        self.opcodes += scan_pickle(f, self.path, what, used=self.opcodes)
        end = f.tell()
        f.seek(start)
        unpickler = make_unpickler(f)
        if load_storage is not None:
            unpickler.persistent_load = lambda saved_id: load_storage(saved_id, end)
        return unpickler.load()

    def _legacy_storage(self, saved_id, held: int) -> Storage:
        """Storages come after the pickles: allocated here, within what the file holds, and read after."""
        dtype, key, numel, view = self._storage_id(saved_id, 6)
        if view is not None:
            raise pickle.UnpicklingError("a storage view (torch < 1.0), which is not read")
        if key not in self.storages:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            self._claim(f"storage {key!a}", nbytes, held - self.total)  # what the storages before it left
            self.storages[key] = Storage(torch.empty(nbytes, dtype=torch.uint8), dtype)
        return Storage(self.storages[key].data, dtype)

    def _read_legacy_storages(self, f, keys) -> None:
        # Each storage the object uses read once: one left out would hand on uninitialised memory.
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(self.storages):
            raise pickle.UnpicklingError("the storage list does not match the storages the object uses")
        for key in map(str, keys):
            storage = self.storages[key]
            itemsize = torch.empty((), dtype=storage.dtype).element_size()
            (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
            if count * itemsize != storage.data.numel():
                raise pickle.UnpicklingError(
                    f"storage {key!a} holds {count} elements, not the "
                    f"{storage.data.numel() // itemsize} its tensors declare"
                )
            _read_into(f, storage.data.numpy(), f"storage {key!a}")


def rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter(_with_state): the Parameter, without the attributes a file sets."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter rebuilt from a {type(data).__name__}, not a tensor")
    return torch.nn.Parameter(data, requires_grad=False)


def _read_into(stream, out: np.ndarray, what: str) -> None:
    """Fill `out` from `stream` in chunks (a whole member read at once would be held twice)."""
    done = 0
    while done < len(out):
        chunk = stream.read(min(_CHUNK, len(out) - done))
        if not chunk:
            raise pickle.UnpicklingError(f"{what} ends early: the file is truncated")
        out[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        done += len(chunk)
