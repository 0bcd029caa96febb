"""What the predict, embed and stream tests share: a tiny random-weight DenseNet saved with class
names and its own preprocessing, generated images of every awkward kind plus files that are not
images, and helpers that run the command line and read its outputs back.

Fixtures are imported by name into each test module (pytest finds them there).
"""

import csv
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_batchnorm
from PIL import Image

import densetriton
from densetriton import DenseNetSpec
from densetriton.cli import main
from densetriton.images import load_image, preprocess, topk
from densetriton.reference import ReferenceDenseNet

SPEC = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "imagenet")
CIFAR_SPEC = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "cifar")
NAMES = ["cat", "dog", "eel"]
PRE = {"resize_size": 40, "crop_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
PROB_TOL = 2e-6  # batch composition may change the last bits of a float32 probability
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions on a small CPU runner: one intra-op thread is far faster than several.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tensors(spec, seed):
    torch.manual_seed(seed)
    model = randomize_batchnorm(ReferenceDenseNet(spec), seed=seed, image_size=32, in_channels=spec.in_channels)
    with torch.no_grad():
        model.classifier.weight.mul_(8)  # well-separated logits: no near-ties between classes
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    densetriton.save_weights(path, _tensors(SPEC, 0), SPEC, class_names=NAMES, preprocessing=PRE)
    return str(path)


@pytest.fixture(scope="module")
def engine(weights):
    return densetriton.load(weights, device="cpu", backend="reference")


def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def _noise(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_images(folder: Path, seed: str) -> dict:
    """One image of each awkward kind plus unreadable files; returns {kind: path}."""
    rng = _rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    p = {}
    exif = Image.Exif()
    exif[0x0112] = 6
    p["exif"] = folder / "photo_exif.jpg"
    Image.fromarray(_noise(rng, 30, 56)).save(p["exif"], exif=exif.tobytes(), quality=95)
    p["gray"] = folder / "gray.png"
    Image.fromarray(rng.integers(0, 256, (44, 40), dtype=np.uint8)).save(p["gray"])
    p["rgba"] = folder / "rgba.png"
    Image.fromarray(np.dstack([_noise(rng, 40, 40), rng.integers(0, 256, (40, 40), dtype=np.uint8)]), "RGBA").save(
        p["rgba"]
    )
    p["palette"] = folder / "palette.png"
    pal = Image.fromarray(rng.integers(0, 16, (40, 48), dtype=np.uint8), "P")
    pal.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tolist())
    pal.save(p["palette"], transparency=2)
    p["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 42, 4), dtype=np.uint8), "CMYK").save(p["cmyk"], quality=95)
    p["deep"] = folder / "deep.png"
    Image.fromarray(rng.integers(0, 65536, (48, 40), dtype=np.uint16)).save(p["deep"])
    p["nested"] = folder / "sub" / "nested.bmp"
    Image.fromarray(_noise(rng, 36, 36)).save(p["nested"])
    p["corrupt"] = folder / "corrupt.jpg"
    p["corrupt"].write_bytes(rng.bytes(700))
    p["fake"] = folder / "sub" / "fake.png"
    p["fake"].write_text("this is text with an image suffix\n")
    p["txt"] = folder / "notes.txt"
    p["txt"].write_text("ignored in folder scans\n")
    p["no_suffix"] = folder / "sub" / "LICENSE"
    p["no_suffix"].write_text("no suffix and no DICOM marker: ignored in folder scans\n" * 4)
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images") / "data"
    return folder, make_images(folder, "module")


def scan_order(folder: Path, kinds: dict) -> list[str]:
    """What a folder scan should classify or skip: image suffixes, sorted by relative path."""
    files = [p for k, p in kinds.items() if k not in ("txt", "no_suffix")]
    return [str(p) for p in sorted(files, key=lambda p: p.relative_to(folder).parts)]


def direct(engine, path, k, multi_label=False):
    logits = engine(preprocess(load_image(path), engine))
    return topk(logits, k, engine.class_names, multi_label=multi_label)[0]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    k = (len(header) - 2) // 2
    assert header == ["path"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")] + ["model"]
    assert len({r[-1] for r in body}) <= 1 and all(
        re.fullmatch("[0-9a-f]{12}", r[-1]) for r in body
    )  # one model wrote them
    return [(r[0], [(r[1 + 2 * i], float(r[2 + 2 * i])) for i in range(k)]) for r in body]


def read_jsonl(path):
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert re.fullmatch("[0-9a-f]{12}", rec["model"])
        out.append((rec["path"], [(t["label"], t["prob"]) for t in rec["topk"]]))
    return out


def assert_matches_engine(rows, engine, k, multi_label=False):
    for path, top in rows:
        expected = direct(engine, path, k, multi_label)
        assert [n for n, _ in top] == [n for n, _ in expected], path
        for (_, p), (_, q) in zip(top, expected):
            assert abs(p - q) <= PROB_TOL, (path, p, q)


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def common(weights, *extra):
    return ["--weights", weights, "--backend", "reference", "--device", "cpu", *extra]


def ctrl_c_on_second_batch(monkeypatch, method: str):
    """Engine.<method> (__call__ or features) raises KeyboardInterrupt on its second batch, as a
    Ctrl-C would; returns the real method, to put back with monkeypatch.setattr."""
    real, calls = getattr(densetriton.engine.Engine, method), []

    def interrupted(self, x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(densetriton.engine.Engine, method, interrupted)
    return real
