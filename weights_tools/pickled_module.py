"""Read the weights of a whole pickled model -- `torch.save(model)` -- without running its code.

Many checkpoints are not state dicts but whole modules: torchxrayvision's published DenseNets,
training scripts that save `model` or `{"model": model, "epoch": ...}`. Unpickling them the
usual way imports and runs the classes they name, which is how a hostile file runs code, so
torch.load(weights_only=True) refuses them. Their tensors, though, are ordinary torch storages.

Here the file is read by torch.load with a restricted unpickler -- Python's documented way to
restrict globals (`Unpickler.find_class`), in pickle's pure-Python Unpickler so that BUILD (which
sets attributes) can be checked too: a name on torch's own weights_only allowlist (tensor
and storage rebuilders, dtypes, OrderedDict) resolves to the real object, and every other class or
function the file names becomes an inert `PickledObject` that only records the arguments and state
the file hands it. The module tree is then walked the way `nn.Module.state_dict()` walks it
(`_parameters`, persistent `_buffers`, `_modules`). Nothing named in the file is imported or
called. It reads the zip format and the legacy one (torch < 1.6, which torchxrayvision's weights
use, and which weights_only cannot read at all). A file naming a function that runs commands,
touches files or imports code (os.system, subprocess, builtins.eval, ...) is refused outright: a
checkpoint has no reason to, so the file is hostile or broken.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import warnings
from pathlib import Path

import torch
from torch._weights_only_unpickler import _get_allowed_globals

# Modules whose functions run commands, touch files or the network, import or execute code. The
# placeholders would make them harmless here anyway; a file naming them is refused as hostile.
_HOSTILE_MODULES = frozenset(
    "os posix nt sys subprocess builtins pathlib shutil socket importlib runpy pickle marshal types code "
    "codeop pty ctypes multiprocessing operator io tempfile webbrowser urllib http asyncio threading "
    "signal glob zipfile tarfile pdb timeit cProfile profile trace posixpath ntpath inspect platform".split()
)
_HOSTILE_TORCH = ("torch.hub", "torch.serialization", "torch.jit", "torch.package", "torch.utils.cpp_extension",
                  "torch.distributed", "torch._C", "torch.ops", "torch.load", "torch.save")
# Builtins that only build plain data, as old pickle protocols name them.
_DATA_BUILTINS = {f"builtins.{t.__name__}": t for t in (object, tuple, list, dict, frozenset, slice, range, int,
                                                          float, str, bytes, bool)}


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

    def __repr__(self):
        return f"<pickled {self.qualname}>"


class HostileCheckpoint(pickle.UnpicklingError):
    """The file names a function that runs code; nothing was run."""


def _is_hostile(name: str) -> bool:
    top = name.split(".", 1)[0]
    return top in _HOSTILE_MODULES or any(name == p or name.startswith(p + ".") for p in _HOSTILE_TORCH)


class _InertPickle:
    """A pickle module for torch.load(pickle_module=...) whose names resolve to torch's allowlist or
    to placeholders (one class per name, shared by the several pickles of a legacy file)."""

    __name__ = "densetriton.inert_pickle"  # torch.load reads a pickle module's name

    def __init__(self):
        self.allowed = {**_get_allowed_globals(), **_DATA_BUILTINS}
        self.placeholders: dict[str, type] = {}
        resolve = self.resolve

        # Settable state: placeholders and the allowlist's own types (tensors, OrderedDict, ...).
        settable = {t for t in _get_allowed_globals().values() if isinstance(t, type)}

        class Unpickler(pickle._Unpickler):  # the pure-Python one: its BUILD can be checked
            dispatch = dict(pickle._Unpickler.dispatch)

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

            dispatch[pickle.BUILD[0]] = load_build

        self.Unpickler = Unpickler

    def resolve(self, name: str):
        if name in self.allowed:
            return self.allowed[name]
        if _is_hostile(name):
            raise HostileCheckpoint(name)
        if name not in self.placeholders:
            self.placeholders[name] = type(name.rsplit(".", 1)[-1], (PickledObject,), {"qualname": name})
        return self.placeholders[name]

    def load(self, file, **kwargs):
        return self.Unpickler(file, **kwargs).load()


def load_pickled(path: str | Path):
    """torch.load of any pickle checkpoint, with every name off torch's allowlist a placeholder.

    Raises HostileCheckpoint for a hostile name, and what torch.load raises for a file it cannot read."""
    with warnings.catch_warnings():
        # Legacy files carry their classes' source; torch warns that a placeholder's differs.
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_InertPickle())


def _module_state(obj) -> dict | None:
    """The pickled nn.Module's __dict__, or None for anything else."""
    state = obj.state if isinstance(obj, PickledObject) else None
    if isinstance(state, tuple) and len(state) == 2:  # (state, slotstate)
        state = state[0]
    if isinstance(state, dict) and isinstance(state.get("_modules"), dict) and isinstance(state.get("_parameters"), dict):
        return state
    return None


def module_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """What `module.state_dict()` would return for a pickled module (empty for anything else).

    Parameters and buffers that are None (torchxrayvision's unset `op_threshs`) are skipped, as
    state_dict() skips them; so are non-persistent buffers. Modules pickled before torch 1.6 have
    no `_non_persistent_buffers_set`: all their buffers were persistent."""
    state = _module_state(obj)
    if state is None:
        return {}
    tensors = {}
    for name, value in state["_parameters"].items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + name] = value
    skipped = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in skipped:
            tensors[prefix + name] = value
    for name, child in state["_modules"].items():
        tensors.update(module_state_dict(child, f"{prefix}{name}."))
    return tensors


def replace_modules(obj, depth: int = 0):
    """The loaded object with every pickled module -- at the top, or in dicts as in
    `{"model": model, "epoch": 3}` -- replaced by its state dict."""
    if _module_state(obj) is not None:
        return module_state_dict(obj)
    if isinstance(obj, dict) and depth < 4:
        return {key: replace_modules(value, depth + 1) for key, value in obj.items()}
    return obj
