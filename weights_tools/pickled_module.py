"""Read the weights of a whole pickled model -- `torch.save(model)` -- without running its code.

Many checkpoints are not plain state dicts: torchxrayvision's published DenseNets and training
scripts save whole modules (`model`, `{"model": model, "epoch": ...}`), or keep an argparse
Namespace or numpy scalars beside the state dict. Unpickling them the usual way imports and runs
the classes they name, which is how a hostile file runs code, so torch.load(weights_only=True)
refuses them. Their tensors, though, are ordinary torch storages.

Here the file is read by torch_files (never torch.load, which would hand a TorchScript archive
to torch.jit.load) with a restricted unpickler -- Python's documented way to restrict globals
(`Unpickler.find_class`), in pickle's pure-Python Unpickler so that its opcodes can be checked too:
- the few names a module pickle needs (OrderedDict, set, torch.Size, torch.device, dtypes) are
  the real objects, and torch's storage classes and dense tensor and parameter rebuilders are
  torch_files' own, which check every size against what the file holds;
- every other class or function the file names is an inert `PickledObject` that only records
  the arguments and state the file hands it; nothing named in the file is imported or called;
- a name that runs commands, touches files or imports code (os.system, subprocess,
  builtins.eval, ...) is refused outright: a checkpoint has no reason to name one;
- BUILD (which sets attributes) is allowed only on placeholders, tensors and OrderedDicts, and
  the copyreg extension opcodes (which bypass find_class through a process-wide cache) are refused.
The module tree is then walked the way `nn.Module.state_dict()` walks it (`_parameters`,
persistent `_buffers`, `_modules`), each module once by identity. Both the zip format and the
legacy one (torch < 1.6, which torchxrayvision's weights use) are read.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import torch
from torch._weights_only_unpickler import _get_allowed_globals

from .errors import CheckpointRefused, refused
from .torch_files import TorchFile

# Modules whose functions run commands, touch files or the network, import or execute code. The
# placeholders would make them harmless here anyway; a file naming them is refused as hostile.
_HOSTILE_MODULES = frozenset(
    [
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "pathlib",
        "shutil",
        "socket",
        "importlib",
        "runpy",
        "pickle",
        "marshal",
        "types",
        "code",
        "codeop",
        "pty",
        "ctypes",
        "multiprocessing",
        "operator",
        "io",
        "tempfile",
        "webbrowser",
        "urllib",
        "http",
        "asyncio",
        "threading",
        "signal",
        "glob",
        "zipfile",
        "tarfile",
        "pdb",
        "timeit",
        "cProfile",
        "profile",
        "trace",
        "posixpath",
        "ntpath",
        "inspect",
        "platform",
    ]
)
_HOSTILE_TORCH = (
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.distributed",
    "torch._C",
    "torch.ops",
    "torch.load",
    "torch.save",
    "torch.serialization.load",
    "torch.serialization.save",
)
# Limits on the module tree, far above any DenseNet's (densenet264: ~1000 modules and ~4000
# tensors, depth 5); a module shared by several parents lists its tensors once per parent, as
# state_dict() does, so a tiny file sharing one module over and over lists millions.
_MAX_DEPTH, _MAX_TENSORS = 64, 100_000


def _allowed_names(reader_names: dict) -> dict:
    """What a module pickle needs resolved to real objects (everything else becomes a placeholder):
    the reader's storages and dense tensor rebuilders (not sparse or other ones), and plain types."""
    torch_allowed = _get_allowed_globals()
    allowed = dict(reader_names)
    allowed.update({name: value for name, value in torch_allowed.items() if isinstance(value, torch.dtype)})
    allowed.update(
        {
            "collections.OrderedDict": OrderedDict,
            "builtins.set": set,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
        }
    )
    return allowed


class PickledObject:
    """Stands in for one class or function a pickle names: records what the file passes, runs nothing."""

    qualname = "?"  # the name the file used, set on each placeholder class

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    # Containers (a defaultdict, a list subclass) get their items through these opcodes.
    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", []).append((key, value))

    def append(self, value):
        self.__dict__.setdefault("items", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("items", []).extend(values)

    def __repr__(self):
        return f"<pickled {self.qualname}>"


class HostileCheckpoint(pickle.UnpicklingError):
    """The file names a function that runs code (the message: its name, ascii-escaped); nothing was run."""


class ModuleTreeRefused(CheckpointRefused):
    """A module tree no model has (a module inside itself, or one shared until it lists millions of tensors)."""


# Builtins that run code, touch files or reach into objects; other builtins (list, dict,
# frozenset, object: what defaultdicts and old protocols name) are placeholders like any name.
_HOSTILE_BUILTINS = frozenset(
    [
        "eval",
        "exec",
        "compile",
        "open",
        "__import__",
        "breakpoint",
        "input",
        "globals",
        "locals",
        "vars",
        "getattr",
        "setattr",
        "delattr",
        "exit",
        "quit",
        "help",
        "memoryview",
    ]
)


def _is_hostile(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if module == "builtins":
        return attr in _HOSTILE_BUILTINS
    top = name.split(".", 1)[0]
    return top in _HOSTILE_MODULES or any(name == p or name.startswith(p + ".") for p in _HOSTILE_TORCH)


class _InertPickle:
    """An Unpickler class whose names resolve to the short list above or to placeholders (one
    class per name, shared by the several pickles of a legacy file)."""

    def __init__(self, reader_names: dict):
        self.allowed = _allowed_names(reader_names)
        self.placeholders: dict[str, type] = {}
        resolve = self.resolve
        settable = (torch.Tensor, torch.nn.Parameter, OrderedDict)  # and placeholders

        class Unpickler(pickle._Unpickler):  # the pure-Python one: its BUILD can be checked
            dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

            def find_class(self, module, name):
                # Python 2 names, which protocol 2 writes ("__builtin__.set"), as pickle maps them.
                if (module, name) in _compat_pickle.NAME_MAPPING:
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
                return resolve(f"{module}.{name}")

            def load_build(self):
                # BUILD sets attributes; on a class (torch.Tensor itself, say) it would patch it.
                target = self.stack[-2]  # under the state
                if not (isinstance(target, PickledObject) or type(target) in settable):
                    raise pickle.UnpicklingError(f"the file sets the state of {type(target).__name__} objects")
                super().load_build()

            def load_extension(self):
                # EXT1/2/4 look names up in copyreg's process-wide cache before find_class.
                raise pickle.UnpicklingError("the file uses copyreg extension codes, which torch.save never writes")

            # The reader sets persistent_load to read storages; legacy files also hold "module"
            # records (a class and its source, which torch would compare with the class's own):
            # those are the class, its source unread.
            @property
            def persistent_load(self):  # pickle's own (which refuses every id) until torch sets one
                return self.__dict__.get("_persistent_load") or super().persistent_load

            @persistent_load.setter
            def persistent_load(self, load):
                def without_source_check(saved_id):
                    if isinstance(saved_id, tuple) and saved_id and saved_id[0] in ("module", b"module"):
                        return saved_id[1]  # ("module", class, source file, source): the class
                    return load(saved_id)

                self._persistent_load = without_source_check

            dispatch[pickle.BUILD[0]] = load_build
            for opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
                dispatch[opcode[0]] = load_extension

        self.Unpickler = Unpickler

    def resolve(self, name: str):
        if name in self.allowed:
            return self.allowed[name]
        if _is_hostile(name):
            raise HostileCheckpoint(ascii(name)[1:-1])
        if name not in self.placeholders:
            self.placeholders[name] = type(name.rsplit(".", 1)[-1], (PickledObject,), {"qualname": name})
        return self.placeholders[name]


def load_pickled(path: str | Path):
    """A torch.save file (zip or legacy format) read by torch_files, with every name off the short
    list above a placeholder.

    Raises HostileCheckpoint for a hostile name, CheckpointRefused for a file over a bound
    (TorchScript archives included), and what the unpickler raises for a file it cannot read."""
    if tarfile.is_tarfile(str(path)):
        raise pickle.UnpicklingError("a tar checkpoint (torch < 0.4), which is not read")
    reader = TorchFile(path)
    return reader.load(_InertPickle(reader.names()).Unpickler)


def _module_state(obj) -> dict | None:
    """The pickled nn.Module's __dict__, or None for anything else."""
    state = obj.state if isinstance(obj, PickledObject) else None
    if isinstance(state, tuple) and len(state) == 2:  # (state, slotstate)
        state = state[0]
    if (
        isinstance(state, dict)
        and isinstance(state.get("_modules"), dict)
        and isinstance(state.get("_parameters"), dict)
    ):
        return state
    return None


def module_state_dict(obj, path=None) -> dict[str, torch.Tensor]:
    """What `module.state_dict()` would return for a pickled module (empty for anything else).

    Parameters and buffers that are None (torchxrayvision's unset `op_threshs`) are skipped, as
    state_dict() skips them; so are non-persistent buffers. Modules pickled before torch 1.6 have
    no `_non_persistent_buffers_set`: all their buffers were persistent. Each module is walked
    once, by identity: a module shared by several parents is listed under each from that one
    walk. A module tree no model has -- nested deeper than _MAX_DEPTH, a module inside itself, or
    more than _MAX_TENSORS tensors listed (a tiny file can share one module between two parents
    twenty levels deep: a million) -- is refused (ModuleTreeRefused, naming `path`), as is a
    tensor that is not a dense one."""
    state = _module_state(obj)
    if state is None:
        return {}
    path = "the pickled module" if path is None else path
    count = _count_tensors(state, path)
    if count > _MAX_TENSORS:
        raise ModuleTreeRefused(
            str(
                refused(
                    path,
                    "the tensors its module tree lists (the module tree is not a model's: "
                    "modules shared over and over)",
                    f"{count:,}",
                    f"{_MAX_TENSORS:,}",
                )
            )
        )
    listed: dict[int, list] = {}  # id(module state) -> its (name, tensor) entries, relative to it

    def entries(state: dict, where: str) -> list:
        if id(state) not in listed:
            found = _own_tensors(state, where)
            for name, child in _child_states(state):
                found += [(f"{name}.{k}", t) for k, t in entries(child, f"{where}{name}.")]
            listed[id(state)] = found
        return listed[id(state)]

    return dict(entries(state, ""))


def _child_states(state: dict) -> list:
    return [(str(name), s) for name, child in state["_modules"].items() if (s := _module_state(child)) is not None]


def _count_tensors(top: dict, path) -> int:
    """How many entries state_dict() would list, each module counted once by identity (a tiny
    file can share one module between two parents twenty levels deep: a million entries);
    refuses a module inside itself or nested deeper than _MAX_DEPTH."""
    counts: dict[int, int] = {}
    walking: set[int] = set()

    def count(state: dict, where: str, depth: int) -> int:
        if id(state) in counts:
            return counts[id(state)]
        if id(state) in walking or depth > _MAX_DEPTH:
            raise ModuleTreeRefused(
                str(
                    refused(
                        path,
                        f"the module tree at {where or '(top)'!a} (the module tree is not a model's)",
                        f"a module inside itself or nested over {_MAX_DEPTH} deep",
                        f"{_MAX_DEPTH} levels",
                    )
                )
            )
        walking.add(id(state))
        own = sum(
            isinstance(v, torch.Tensor)
            for v in [*state["_parameters"].values(), *(state.get("_buffers") or {}).values()]
        )
        total = own + sum(count(child, f"{where}{name}.", depth + 1) for name, child in _child_states(state))
        walking.discard(id(state))
        counts[id(state)] = total
        return total

    return count(top, "", 0)


def _own_tensors(state: dict, where: str) -> list:
    """A module's own parameters and persistent buffers, as (name, tensor)."""
    skipped = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(skipped, (set, frozenset)):  # a list here would make the lookups below quadratic
        raise pickle.UnpicklingError(
            f"{where or '(top)'!a}'s _non_persistent_buffers_set is a {type(skipped).__name__}, "
            f"not a set: not a module torch pickled"
        )
    buffers = {k: v for k, v in (state.get("_buffers") or {}).items() if k not in skipped}
    found = []
    for name, value in [*state["_parameters"].items(), *buffers.items()]:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise pickle.UnpicklingError(f"{where + name!a} is a {value.layout} tensor, not a dense one")
            found.append((str(name), value))
    return found


def replace_modules(obj, depth: int = 0, path=None):
    """The loaded object with every pickled module -- at the top, or in dicts as in
    `{"model": model, "epoch": 3}` -- replaced by its state dict."""
    if _module_state(obj) is not None:
        return module_state_dict(obj, path)
    if isinstance(obj, dict) and depth < 4:
        return {key: replace_modules(value, depth + 1, path) for key, value in obj.items()}
    return obj
