"""`densetriton bench --end-to-end`: a tiny run on the CPU (a few small generated JPEGs, a tiny
random-weight model, the reference backend), its JSON and Markdown, and the command-line wiring."""

import json
from pathlib import Path

import pytest
import torch
from densetriton.bench import end_to_end as E
from PIL import Image

from densetriton import DenseNetSpec
from densetriton.cli import main
from densetriton.engine import random_weights

SPEC = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "imagenet")
PRE = {"resize_size": 40, "crop_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_generated_photos(tmp_path):
    """Sizes cycle as asked, quality-90 JPEGs, every eighth with an EXIF orientation."""
    paths = E.generate_jpegs(tmp_path, 16, sizes=((50, 30), (30, 50)))
    orientations = []
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == ((50, 30), (30, 50))[i % 2]
            orientations.append(img.getexif().get(0x0112))
    assert orientations == [None] * 7 + [6] + [None] * 7 + [3]
    copies = E.generate_jpegs(tmp_path / "copies", 6, sizes=((50, 30),), unique=4)
    assert copies[4].read_bytes() == copies[0].read_bytes() and copies[5].read_bytes() == copies[1].read_bytes()
    assert copies[1].read_bytes() != copies[0].read_bytes()


def test_tiny_end_to_end_run(tmp_path):
    """Every peer runs over the same 8 files; the command peers write a row per file; the breakdown
    times every stage; JSON and Markdown are written and agree."""
    torch.manual_seed(0)
    s = E.E2ESettings(
        device=torch.device("cpu"),
        model="tiny",
        batch=4,
        dtype="float32",
        workers=0,
        out=tmp_path / "results",
        images=8,
        sizes=((48, 36), (36, 60)),
        backend="reference",
        spec=SPEC,
        tensors=random_weights(SPEC).tensors,
        preprocessing=PRE,
        sample=8,
    )
    doc, paths = E.run(s)
    peers = {r["peer"]: r for r in doc["results"]}
    assert set(peers) == {"engine only", "densetriton --decode gpu", "densetriton --decode cpu", "torchvision pipeline"}
    assert doc["files"] == 8
    for name in ("densetriton --decode gpu", "densetriton --decode cpu", "torchvision pipeline"):
        assert peers[name]["images"] == 8 and peers[name]["images_per_s"] > 0, peers[name]
    assert peers["densetriton --decode gpu"]["rows_written"] == 8
    for b in doc["breakdown"]:
        assert b["images"] == 8 and all(v > 0 for v in b["ms_per_image"].values()), b
    ratio = doc["ratios"]["gpu_decode_over_cpu_decode"]
    assert ratio == pytest.approx(
        peers["densetriton --decode gpu"]["images_per_s"] / peers["densetriton --decode cpu"]["images_per_s"]
    )
    assert json.loads(Path(paths["json"]).read_text())["results"] == doc["results"]
    md = Path(paths["md"]).read_text()
    assert "| densetriton --decode gpu |" in md and "| torchvision pipeline |" in md and "| gpu |" in md
    assert Path(paths["json"]).name.endswith("-cpu-end-to-end.json")


def test_cli_reads_the_bench_options(tmp_path, monkeypatch):
    """`densetriton bench --end-to-end DIR --batch-size 8 --workers 3` reaches the run with those
    settings (fails without the option wired in bench/cli.py)."""
    seen = {}

    def fake_run(s):
        seen["s"] = s
        return {
            "device": "cpu",
            "device_detail": "",
            "torch": "",
            "torchvision": "",
            "commit": None,
            "settings": s.to_json(),
            "results": [],
            "breakdown": [],
            "ratios": {},
            "notes": [],
        }, {}

    monkeypatch.setattr(E, "run", fake_run)
    rc = main(
        [
            "bench",
            "--end-to-end",
            str(tmp_path),
            "--batch-size",
            "8",
            "--workers",
            "3",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 0
    s = seen["s"]
    assert (s.folder, s.batch, s.workers, s.model, s.out) == (tmp_path, 8, 3, "densenet121", tmp_path / "r")
    assert main(["bench", "--end-to-end", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert seen["s"].folder is None  # without DIR: generated photos
