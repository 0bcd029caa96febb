"""load() and the engine: weights sources, the pretrained cache, devices and dtypes, input checks."""

import hashlib
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton import DenseNetSpec
from densetriton.engine import pretrained_path
from densetriton.weights import cache_dir

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
    with pytest.raises(
        densetriton.WeightsError,
        match=r"densenet121-a639ec97\.pth is not torchvision's file: its sha256 "
        r"begins [0-9a-f]{8}, its name says a639ec97",
    ):
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
    hub = str(Path(torch.hub.get_dir()) / "checkpoints")
    assert "densenet169-b2777c0a.pth" in msg and f"put it in {hub}/" in msg and "sha256" in msg
    assert "densetriton convert --checkpoint FILE --arch densenet169" in msg
    assert str(cache_dir()) not in msg  # never a file of unknown origin at the pretrained cache path
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
    path = densetriton.save_weights(
        tmp_path / "tiny.safetensors", densetriton.engine.random_weights(TINY).tensors, TINY
    )
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


# -- warm-up and the plan cache -------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's interpreter on the CPU
SMALL = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")


def _triton_engine(spec=SMALL, preprocessing=None):
    torch.manual_seed(0)
    tensors = {k: v for k, v in densetriton.engine.random_weights(spec).tensors.items()}
    weights = densetriton.weights.Weights(spec, tensors, preprocessing=preprocessing)
    return densetriton.Engine(
        weights, device=torch.device(DEVICE), dtype=torch.float32, backend="triton", pretrained=False
    )


def test_warmup_builds_each_plan_so_that_later_calls_build_none(monkeypatch):
    engine = _triton_engine()
    rng = torch.get_rng_state()
    seconds = engine.warmup([1, 3], image_size=40)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    assert list(seconds) == [1, 3] and all(s > 0 for s in seconds.values())
    assert {key[:3] for key in engine._model.plans} == {(1, 40, 40), (3, 40, 40)}
    built = []
    real = densetriton.plan.Plan.__init__
    monkeypatch.setattr(
        densetriton.plan.Plan,
        "__init__",
        lambda self, *a, **k: built.append((k["n"], k["height"], k["width"])) or real(self, *a, **k),
    )
    reference = densetriton.Engine(
        engine.weights, device=torch.device("cpu"), dtype=torch.float32, backend="reference", pretrained=False
    )
    x = torch.randn(3, 3, 40, 40)
    assert rel_err(engine(x.to(DEVICE)), reference(x)) < 1e-4
    assert rel_err(engine.features(x[:1].to(DEVICE)), reference.features(x[:1])) < 1e-4
    assert built == []
    engine(torch.randn(2, 3, 40, 40, device=DEVICE))  # the counter counts
    assert built == [(2, 40, 40)]


def test_warmup_size_defaults_to_the_weights_preprocessing_and_a_backbone_warms_its_features():
    pre = {"resize_size": 36, "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    engine = _triton_engine(preprocessing=pre)
    engine.warmup([2])
    assert [key[:3] for key in engine._model.plans] == [(2, 32, 32)]
    backbone = _triton_engine(
        SMALL.replace(num_classes=0), preprocessing=dict(pre, crop_size=None, resize_size=[33, 35])
    )
    backbone.warmup()
    assert [key[:3] for key in backbone._model.plans] == [(1, 33, 35)]


def test_warmup_warns_when_the_plan_cache_cannot_keep_every_size():
    engine = _triton_engine()
    engine.plan_cache_bytes = 1  # only the newest plan is kept
    assert engine.plan_cache_bytes == 1
    with pytest.warns(UserWarning, match=r"batch sizes \[2\] were evicted.*raise engine.plan_cache_bytes"):
        engine.warmup([1, 2], image_size=(40, 40))  # 2 runs first
    assert [key[:3] for key in engine._model.plans] == [(1, 40, 40)]


def test_warmup_runs_each_size_once_largest_first_and_reports_them_in_the_callers_order(monkeypatch):
    engine = densetriton.load(SMALL, weights=None, device="cpu", backend="reference")
    seen = []
    real = densetriton.Engine.__call__
    monkeypatch.setattr(densetriton.Engine, "__call__", lambda self, x: seen.append((len(x), x.dtype)) or real(self, x))
    assert list(engine.warmup([2, np.int64(5), 2, 1], image_size=(np.int32(40), 36))) == [2, 5, 1]
    assert seen == [(5, torch.float32), (2, torch.float32), (1, torch.float32)]
    seen.clear()
    assert list(engine.warmup(3, dtype=torch.float16)) == [3]  # one int; the inputs' dtype to come
    assert seen == [(3, torch.float16)]


def test_warmup_out_of_memory_is_one_memory_error():
    engine = densetriton.load(SMALL, weights=None, device="cpu", backend="reference")
    with pytest.raises(MemoryError, match="warm-up input of batch 100000000 at 224x224.*smaller batch"):
        engine.warmup([1, 10**8])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_sizes=[0]), "batch_sizes must be a positive int or several"),
        (dict(batch_sizes=[]), "batch_sizes must be a positive int or several"),
        (dict(batch_sizes=[2.0]), "batch_sizes must be a positive int or several"),
        (dict(batch_sizes=True), "batch_sizes must be a positive int or several"),
        (dict(dtype=torch.float64), "dtype must be float32, float16 or bfloat16"),
        (dict(image_size=2), "too small for this network.*the smallest input is 5x5"),
        (dict(image_size="224"), "image_size must be an int or"),
        (dict(image_size=(32, 32, 3)), "image_size must be an int or"),
    ],
)
def test_warmup_errors(kwargs, match):
    engine = densetriton.load(SMALL, weights=None, device="cpu", backend="reference")
    with pytest.raises(ValueError, match=match):
        engine.warmup(**kwargs)


def test_warmup_without_a_known_input_size_asks_for_one():
    """Preprocessing that resizes the shorter side without cropping: sizes vary with each image."""
    spec = SMALL
    weights = densetriton.weights.Weights(
        spec,
        densetriton.engine.random_weights(spec).tensors,
        preprocessing={"resize_size": 320, "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    engine = densetriton.Engine(
        weights, device=torch.device("cpu"), dtype=torch.float32, backend="reference", pretrained=False
    )
    with pytest.raises(ValueError, match="pass image_size: .* shorter side to 320 without a crop"):
        engine.warmup([1])
    assert list(engine.warmup([1], image_size=320)) == [1]


def test_the_reference_backend_warms_up_and_has_no_plan_cache():
    engine = densetriton.load(SMALL, weights=None, device="cpu", backend="reference")
    assert list(engine.warmup([1, 2])) == [1, 2]
    assert engine.plan_cache_bytes is None
    with pytest.raises(ValueError, match="keeps no plans"):
        engine.plan_cache_bytes = 1 << 30


def test_an_exclusive_plan_is_the_one_calls_use_and_holds_the_engine_until_released():
    engine = _triton_engine()
    x = torch.randn(2, 3, 40, 36, device=DEVICE)
    expected = engine(x)
    logits = torch.full_like(expected, float("nan"))
    with engine.exclusive_plan(2, 40, 36) as plan:
        assert plan is engine._model.plan(2, 40, 36)  # the cached plan, not a new one
        assert engine._lock.locked()  # a call from another thread waits here
        plan.run(x, logits)
    assert not engine._lock.locked()
    assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="plans belong to backend='triton'"):
        with densetriton.load(SMALL, weights=None, device="cpu", backend="reference").exclusive_plan(1, 40, 40):
            pass
