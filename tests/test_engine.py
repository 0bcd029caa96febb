"""load() and the engine: weights sources, the pretrained cache, devices and dtypes, input checks."""

import hashlib
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import densetriton
from densetriton import DenseNetSpec
from densetriton.engine import pretrained_path
from densetriton.weights import cache_dir

from helpers import randomize_batchnorm, rel_err

TINY = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "cifar")


def _torchvision_download_file(name: str) -> Path:
    """Where torchvision's weights API looks for (and would download) a model's file."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def test_default_weights_convert_once_then_load_from_the_cache(cache_home, monkeypatch):
    """The path users hit first: torchvision's file -> conversion -> cache -> load, all offline.

    The file torchvision would have downloaded is put where its weights API looks first, in
    the old layout torchvision's real files have (legacy "norm.1" keys). Its contents are a
    stand-in, so the check of its sha256 against its name is switched off here (tested below).
    """
    monkeypatch.setattr("densetriton.weights_tools.convert.check_torchvision_file", lambda path: None)
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.densenet121(), seed=1)
    legacy = {re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", k): v for k, v in model.state_dict().items()}
    download = _torchvision_download_file("densenet121")
    download.parent.mkdir(parents=True)
    torch.save(legacy, download)

    engine = densetriton.load("densenet121", device="cpu")
    cached = pretrained_path("densenet121")
    assert cached == cache_dir() / "densenet121-IMAGENET1K_V1.safetensors"
    assert str(cached).startswith(str(cache_home / "densetriton-cache"))
    assert cached.is_file() and engine.pretrained and engine.backend == "reference"
    assert len(engine.class_names) == 1000 and engine.class_names[0] == "tench"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(engine(x), model(x)) < 1e-5

    download.unlink()  # the second load must not need torchvision's file
    mtime = cached.stat().st_mtime_ns
    again = densetriton.load("densenet121", device="cpu")
    assert cached.stat().st_mtime_ns == mtime
    assert torch.equal(again(x), engine(x))


def test_a_wrong_file_in_torchvisions_cache_is_refused(cache_home, tmp_path):
    from densetriton.weights_tools.convert import check_torchvision_file

    torch.manual_seed(0)
    download = _torchvision_download_file("densenet121")
    download.parent.mkdir(parents=True)
    torch.save(torchvision.models.densenet121().state_dict(), download)  # not torchvision's trained weights
    with pytest.raises(densetriton.WeightsError, match=r"densenet121-a639ec97\.pth is not torchvision's file: its sha256 "
                                                       r"begins [0-9a-f]{8}, its name says a639ec97"):
        densetriton.load("densenet121", device="cpu")
    assert not pretrained_path("densenet121").exists()
    # A file whose name carries its own hash passes; one without a hash in its name is not checked.
    data = b"torchvision's bytes"
    named = tmp_path / f"densenet121-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    named.write_bytes(data)
    check_torchvision_file(named)
    (tmp_path / "mine.pth").write_bytes(data)
    check_torchvision_file(tmp_path / "mine.pth")


def test_without_network_the_error_says_how_to_pass_a_local_file(cache_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(densetriton.WeightsError) as info:
        densetriton.load("densenet169", device="cpu")
    msg = str(info.value)
    assert "densenet169-b2777c0a.pth" in msg and "densetriton convert --checkpoint" in msg and "--arch densenet169" in msg
    assert not list(cache_dir().glob("*")) if cache_dir().exists() else True


def test_cache_location_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DENSETRITON_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "densetriton"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "densetriton"
    monkeypatch.setenv("DENSETRITON_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"


def test_random_weights_are_reproducible_and_said_to_be_untrained():
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="untrained"):
        a = densetriton.load(TINY, weights=None, device="cpu")
    torch.manual_seed(7)
    b = densetriton.load(TINY, weights=None, device="cpu")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))
    assert "untrained" in repr(a)
    assert not a.pretrained


def test_engine_attributes_and_features(tmp_path):
    engine = densetriton.load("densenet_bc100_k12", weights=None, device="cpu", backend="reference")
    assert engine.spec == densetriton.get_spec("densenet_bc100_k12")
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32 and engine.backend == "reference"
    x = torch.randn(3, 3, 32, 32)
    feats = engine.features(x)
    assert feats.shape == (3, 342) and feats.dtype == torch.float32
    logits = engine(x)
    w = engine.weights.tensors
    assert rel_err(logits, feats @ w["classifier.weight"].T + w["classifier.bias"]) < 1e-6


def test_weights_path_and_spec_mismatch(tmp_path):
    path = densetriton.save_weights(tmp_path / "tiny.safetensors", densetriton.engine.random_weights(TINY).tensors, TINY)
    assert densetriton.load(TINY, weights=path, device="cpu").spec == TINY
    assert densetriton.load(str(path), device="cpu").spec == TINY
    with pytest.raises(densetriton.WeightsError, match="not densenet121"):
        densetriton.load("densenet121", weights=path, device="cpu")
    # A file and weights=None (random weights) contradict each other: said, not silently resolved.
    with pytest.raises(ValueError, match="is a weights file, and weights=None asks for random weights"):
        densetriton.load(str(path), weights=None, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ValueError, match=r"no usable CUDA GPU .*use device='cpu'"):
        densetriton.load(TINY, weights=None, device="cuda")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: densetriton.load("resnet50"), ValueError, "unknown model"),
        (lambda: densetriton.load("densenet264", device="cpu"), ValueError, "no pretrained weights.*weights=None"),
        (lambda: densetriton.load(TINY, device="cpu"), ValueError, "no pretrained weights"),
        (lambda: densetriton.load(TINY, weights=None, backend="onnx"), ValueError, "backend"),
        (lambda: densetriton.load(TINY, weights=None, dtype=torch.int8), ValueError, "dtype"),
        (lambda: densetriton.load(TINY, weights="/nonexistent/w.safetensors"), densetriton.WeightsError, "not found"),
    ],
)
def test_load_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_dtype_by_name_and_half_precision_reference():
    engine = densetriton.load(TINY, weights=None, device="cpu", dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    x = torch.randn(2, 3, 8, 8)
    ref = densetriton.load(TINY, weights=engine.weights.tensors and None, device="cpu")
    ref._model.load_state_dict(engine.weights.tensors, strict=False)
    out = engine(x)
    assert out.dtype == torch.float32 and rel_err(out, ref(x)) < 3e-2
