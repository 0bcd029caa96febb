"""Whole pickled models (torch.save(model)) convert from their tensors, and nothing in the file runs."""

import argparse
import collections
import copyreg
import importlib
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from densetriton.weights_tools import convert_checkpoint
from densetriton.weights_tools.pickled_module import load_pickled, module_state_dict
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton.weights import WeightsError

# torchxrayvision's DenseNet as its published weights were pickled: its own classes (not
# torchvision's), one input channel, an `op_threshs` buffer left None, `features2` as the head.
# Written to a file and imported, so that the classes can be made unimportable afterwards.
XRV_LIKE = '''
from collections import OrderedDict
import torch, torch.nn as nn, torch.nn.functional as F
from pathlib import Path

class _DenseLayer(nn.Sequential):
    def __init__(self, c, k, bn_size):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(c)); self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(c, bn_size * k, 1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * k)); self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * k, k, 3, padding=1, bias=False))
        self.drop_rate = 0
    def forward(self, x):
        return torch.cat([x, super().forward(x)], 1)

class _Transition(nn.Sequential):
    def __init__(self, c, out):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(c)); self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(c, out, 1, bias=False)); self.add_module("pool", nn.AvgPool2d(2, 2))

class DenseNet(nn.Module):
    def __init__(self, growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=18, in_channels=1):
        super().__init__()
        self.apply_sigmoid = False
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1))]))
        c = num_init_features
        for i, n in enumerate(block_config):
            block = nn.Sequential()
            for j in range(n):
                block.add_module(f"denselayer{j + 1}", _DenseLayer(c + j * growth_rate, growth_rate, bn_size))
            self.features.add_module(f"denseblock{i + 1}", block)
            c += n * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)
        self.register_buffer("op_threshs", None)
    def features2(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)
    def forward(self, x):
        return self.classifier(self.features2(x))

def make_file(path):
    Path(path).write_text("ran")

class Payload:
    """Unpickles as a call to make_file: a module-level function not named in any deny list."""
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (make_file, (self.path,))
'''


@pytest.fixture
def xrv_like(tmp_path, monkeypatch):
    """The module above, importable while the fixture's test builds and saves models."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "xrv_like_models.py").write_text(textwrap.dedent(XRV_LIKE))
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("xrv_like_models")
    yield module
    sys.modules.pop("xrv_like_models", None)


def forget(module):
    """Make a module unimportable: a converter that imported it would now fail."""
    sys.modules.pop(module.__name__, None)
    Path(module.__file__).unlink()
    sys.path[:] = [p for p in sys.path if p != str(Path(module.__file__).parent)]
    importlib.invalidate_caches()


def small_torchvision():
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5
    )
    return randomize_batchnorm(model, seed=1, image_size=32)


def agree(model, weights_path, channels=3):
    engine = densetriton.load(weights_path, device="cpu", backend="reference")
    x = torch.randn(3, channels, 40, 40)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(engine(x), expected) < 1e-5


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_loads_from_threads_agree_and_leave_warning_filters_alone(tmp_path, legacy):
    # torch's legacy loader warns for every class whose source it cannot read (every placeholder);
    # that check is skipped per load, not by changing the process-wide filters, which threads share.
    model = small_torchvision()
    torch.save(model, tmp_path / "whole.pt", _use_new_zipfile_serialization=not legacy)
    expected = model.state_dict()
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(4) as pool:
            loaded = list(pool.map(lambda _: module_state_dict(load_pickled(tmp_path / "whole.pt")), range(8)))
        assert warnings.filters[0][0] == "always"  # no load changed them under us
    assert [str(w.message) for w in caught] == []
    assert warnings.filters == filters_before
    for got in loaded:
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("form", ["model", "dict-with-model", "dataparallel-in-dict"])
def test_whole_torchvision_model_converts(tmp_path, form, legacy):
    model = small_torchvision()
    obj = {
        "model": model,
        "dict-with-model": {"epoch": 7, "model": model, "best_acc": 0.9},
        "dataparallel-in-dict": {"net": torch.nn.DataParallel(model), "epoch": 7},
    }[form]
    ckpt = tmp_path / "whole.pth"
    torch.save(obj, ckpt, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)  # what the converter used to stop at
    out = convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    agree(model, out)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_state_dict_of_a_pickled_module_is_exact(tmp_path, legacy):
    model = small_torchvision()
    model.register_buffer("scratch", torch.randn(3), persistent=False)  # state_dict() leaves it out
    model.extra = torch.nn.Linear(2, 2)  # one module under two names: state_dict() lists both
    model.features.shared = model.extra
    torch.save(model, tmp_path / "whole.pt", _use_new_zipfile_serialization=not legacy)
    got = module_state_dict(load_pickled(tmp_path / "whole.pt"))
    expected = model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_torchxrayvision_style_model_converts_without_its_code(xrv_like, tmp_path, legacy):
    model = randomize_batchnorm(xrv_like.DenseNet(), seed=2, image_size=32, in_channels=1)
    x = torch.randn(3, 1, 40, 40)
    with torch.no_grad():
        expected = model(x)
    if legacy:
        # Modules pickled before torch 1.6 have no _non_persistent_buffers_set.
        for m in model.modules():
            del m._non_persistent_buffers_set
    else:
        # A model saved after torchxrayvision loaded its weights carries their operating points,
        # NaN for the outputs it did not train.
        model.op_threshs = torch.rand(18) * 0.9 + 0.05
        model.op_threshs[14:] = float("nan")
    ckpt = tmp_path / "nih-pc-chex-densenet121-best.pt"
    torch.save(model, ckpt, _use_new_zipfile_serialization=not legacy)
    forget(xrv_like)

    out = convert_checkpoint(
        ckpt,
        tmp_path / "xrv.safetensors",
        class_names=[f"finding {i}" for i in range(18)],
        preprocessing={"resize_size": 40, "crop_size": 40, "mean": [0.5], "std": [1 / 2048]},
        multi_label=True,
    )
    assert "xrv_like_models" not in sys.modules
    engine = densetriton.load(out, device="cpu", backend="reference")
    assert engine.spec.in_channels == 1 and engine.spec.num_classes == 18 and engine.multi_label
    assert rel_err(engine(x), expected) < 1e-5
    if legacy:
        assert engine.operating_points is None
    else:
        assert engine.operating_points[14:] == [None] * 4
        assert engine.operating_points[:14] == [float(t) for t in model.op_threshs[:14].double()]


HOSTILE = {
    "os.system": lambda target: (os.system, (f"touch {target}",)),
    "subprocess": lambda target: (subprocess.call, (["touch", str(target)],)),
    "builtins.eval": lambda target: (eval, (f"open({str(target)!r}, 'w')",)),
    "builtins.exec": lambda target: (exec, (f"open({str(target)!r}, 'w')",)),
    "pathlib": lambda target: (Path.touch, (Path(target),)),
}


class _Hostile:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("payload", list(HOSTILE))
def test_hostile_whole_model_is_refused_and_nothing_runs(tmp_path, payload, legacy):
    target = tmp_path / "pwned"
    model = small_torchvision()
    model.note = _Hostile(HOSTILE[payload](target))  # hidden in an attribute of a real model
    ckpt = tmp_path / "evil.pth"
    torch.save(model, ckpt, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match=r"refusing to load .*it asks to call .*nothing from the file was run"):
        convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    assert not target.exists()
    assert not (tmp_path / "out.safetensors").exists()


class _OpensAFile:
    """Unpickles as logging.FileHandler(path): importable, off every deny list, creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (logging.FileHandler, (self.path,))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_names_off_every_list_stay_inert(tmp_path, legacy):
    # The deny list only names what to refuse; safety comes from never calling a name the file
    # gives. A payload no list knows (and that plain torch.load runs) is an inert placeholder.
    target = tmp_path / "ran.log"
    model = small_torchvision()
    model.history = [_OpensAFile(str(target))]
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model, "callback": _OpensAFile(str(target))}, ckpt, _use_new_zipfile_serialization=not legacy)
    handler = torch.load(ckpt, weights_only=False)["callback"]  # what an unrestricted load does
    assert target.exists()
    handler.close()
    target.unlink()

    agree(model, convert_checkpoint(ckpt, tmp_path / "out.safetensors"))
    assert not target.exists()


def test_copyreg_extension_codes_are_refused(tmp_path):
    # EXT1 looks a name up in copyreg's process-wide cache, before find_class: refused outright,
    # and nothing is left in the cache for a later, unrelated unpickling.
    copyreg.add_extension("fractions", "Fraction", 0xF0)
    try:
        ckpt = tmp_path / "ext.pth"
        ckpt.write_bytes(b"\x80\x02\x82\xf0)R.")  # PROTO 2; EXT1 0xf0; EMPTY_TUPLE; REDUCE
        assert pickle.loads(ckpt.read_bytes()) == 0  # what it does unrestricted: calls Fraction()
        copyreg._extension_cache.clear()
        with pytest.raises(WeightsError, match="extension codes"):
            convert_checkpoint(ckpt, tmp_path / "out.safetensors")
        assert pickle.loads(ckpt.read_bytes()) == 0 and type(pickle.loads(ckpt.read_bytes())).__name__ == "Fraction"
    finally:
        copyreg.remove_extension("fractions", "Fraction", 0xF0)


def test_module_trees_no_model_has_are_refused_quickly(tmp_path):
    # A module shared by two parents, twenty levels deep: a 3 KB file, a million modules walked.
    leaf = torch.nn.Linear(1, 1)
    for _ in range(20):
        parent = torch.nn.Module()
        parent.a, parent.b = leaf, leaf
        leaf = parent
    torch.save(leaf, tmp_path / "bomb.pt")
    loop = torch.nn.Sequential(torch.nn.Linear(1, 1))
    loop.add_module("again", loop)  # a module inside itself
    torch.save(loop, tmp_path / "loop.pt")
    for name in ("bomb.pt", "loop.pt"):
        start = time.perf_counter()
        with pytest.raises(WeightsError, match="the module tree is not a model's"):
            convert_checkpoint(tmp_path / name, tmp_path / "out.safetensors")
        assert time.perf_counter() - start < 10
    assert not (tmp_path / "out.safetensors").exists()


def test_sparse_tensors_are_not_rebuilt_and_leave_nothing_behind(tmp_path):
    # Sparse rebuilders are off the list: a sparse buffer (here with an index out of its bounds,
    # which to_dense() would write out of bounds) is a placeholder, not a tensor, and torch's
    # process-wide list of sparse tensors to check is left empty for the next load.
    model = small_torchvision()
    indices = torch.tensor([[0], [10**9]])
    model.register_buffer("lookup", torch.sparse_coo_tensor(indices, torch.ones(1), (1, 4), check_invariants=False))
    torch.save(model, tmp_path / "sparse.pt")
    out = convert_checkpoint(tmp_path / "sparse.pt", tmp_path / "out.safetensors")
    agree(model.eval(), out)
    torch.save({"w": torch.randn(2)}, tmp_path / "innocent.pt")
    assert torch.load(tmp_path / "innocent.pt", weights_only=True)["w"].shape == (2,)
    assert not getattr(torch._utils, "_sparse_tensors_to_validate", [])


def test_pickle_without_a_model_is_one_clear_error(xrv_like, tmp_path):
    torch.save({"history": [xrv_like.Payload(str(tmp_path / "x"))], "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match="no state dict found"):
        convert_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "x").exists() and not (tmp_path / "out.safetensors").exists()


def test_a_pickle_cannot_patch_a_class(tmp_path):
    # PROTO 2; GLOBAL collections.Counter; BUILD with slot state {"most_common": None}: a plain
    # unpickler would run setattr(Counter, "most_common", None) and break Counter in this process.
    ckpt = tmp_path / "patch.pth"
    ckpt.write_bytes(b"\x80\x02ccollections\nCounter\nN}X\x0b\x00\x00\x00most_commonNs\x86b.")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint .*sets the state of type"):
        convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    assert callable(collections.Counter.most_common)


def test_state_dicts_beside_objects_weights_only_refuses_convert(tmp_path):
    # Training scripts store their argparse Namespace and numpy scalars beside the state dict;
    # weights_only refuses the whole file for them, the placeholders let the weights through.
    model = small_torchvision()
    ckpt = tmp_path / "ckpt.pth.tar"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "args": argparse.Namespace(lr=0.1, arch="densenet"),
            "best_auc": np.float64(0.84),
            "epoch": 12,
        },
        ckpt,
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    agree(model, convert_checkpoint(ckpt, tmp_path / "out.safetensors"))


def test_harmless_builtins_are_placeholders_and_stale_op_threshs_are_left_out(tmp_path):
    # A defaultdict(list) history names builtins.list: inert, not hostile. op_threshs that no
    # longer fit the classifier (a new 5-class head on an 18-finding model) warn and are dropped.
    model = small_torchvision()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {
            "state_dict": {**model.state_dict(), "op_threshs": torch.rand(18)},
            "history": collections.defaultdict(list, loss=[0.3]),
            "frozen": frozenset({1}),
        },
        ckpt,
    )
    with pytest.warns(UserWarning, match=r"op_threshs \(18,\) do not fit its 5-class classifier"):
        out = convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    agree(model, out)
    assert densetriton.load(out, device="cpu", backend="reference").operating_points is None
