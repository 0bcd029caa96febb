"""`densetriton embed`: feature rows checked against engine.features, both output formats, and
--resume after an interruption, never mixing two models' rows."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rel_err
from image_commands import (  # noqa: F401 -- fixtures are used by name
    NAMES,
    PRE,
    SPEC,
    _noise,
    _rng,
    _tensors,
    common,
    ctrl_c_on_second_batch,
    engine,
    images,
    one_thread,
    run_cli,
    scan_order,
    weights,
)
from PIL import Image

import densetriton
import densetriton.embed
from densetriton.images import load_image, preprocess
from densetriton.stream import model_id


def test_embed_resume_never_mixes_two_models_features(weights, engine, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("embed-models")
    Image.fromarray(_noise(rng, 40, 40)).save(folder / "one.png")
    retrained = tmp_path / "v2.safetensors"
    densetriton.save_weights(retrained, _tensors(SPEC, 1), SPEC, class_names=NAMES, preprocessing=PRE)
    relabelled = tmp_path / "relabelled.safetensors"  # a new head on the same features: the same rows
    tensors = dict(_tensors(SPEC, 0), **{"classifier.weight": torch.randn(3, SPEC.num_features)})
    densetriton.save_weights(relabelled, tensors, SPEC, class_names=["a", "b", "c"], preprocessing=PRE)
    assert model_id(densetriton.load(str(relabelled), device="cpu", backend="reference"), head=False) == model_id(
        engine, head=False
    )
    for out in (tmp_path / "f.npy", tmp_path / "f.safetensors"):
        (folder / "two.png").unlink(missing_ok=True)
        assert run_cli(capsys, "embed", folder, *common(weights, "--out", out, "--workers", "0"))[0] == 0
        before = out.read_bytes()
        Image.fromarray(_noise(rng, 40, 40)).save(folder / "two.png")
        rc, _, err = run_cli(
            capsys, "embed", folder, *common(str(retrained), "--out", out, "--workers", "0", "--resume")
        )
        assert rc == 1 and "holds features of another model" in err and out.read_bytes() == before, err
    # A .npy written before FILE.npy.json named its model cannot be checked: refused, not guessed.
    npy = tmp_path / "f.npy"
    Path(f"{npy}.json").unlink()
    rc, _, err = run_cli(capsys, "embed", folder, *common(weights, "--out", npy, "--workers", "0", "--resume"))
    assert rc == 1 and f"{npy} names no model" in err and len(np.load(npy)) == 1
    # Rows an interrupted run of another model left in FILE.partial/: refused, and kept.
    partial = tmp_path / "g.safetensors.partial"
    partial.mkdir()
    from safetensors.torch import save_file

    save_file(
        {"features": torch.randn(1, SPEC.num_features)},
        str(partial / "chunk-r0000-1-0.safetensors"),
        metadata={"paths": json.dumps([str(folder / "one.png")]), "model_id": "0123456789ab"},
    )
    rc, _, err = run_cli(
        capsys, "embed", folder, *common(weights, "--out", tmp_path / "g.safetensors", "--workers", "0", "--resume")
    )
    assert rc == 1 and f"{partial} holds features of another model (model 0123456789ab)" in err
    assert len(list(partial.iterdir())) == 1
    rc, _, err = run_cli(capsys, "embed", folder, *common(str(relabelled), "--out", out, "--workers", "0", "--resume"))
    assert rc == 0 and "embedded 1 image " in err


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_an_interrupted_run_without_resume_goes_on_replacing_file(
    weights, engine, tmp_path, capsys, monkeypatch, suffix
):
    """FILE of model A; a run of model B without --resume (it replaces FILE) stops after a chunk:
    --resume with B finishes the replacement (A's rows are neither kept nor checked), and --resume
    with A is refused, since FILE.partial/ holds B's rows."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("replace-" + suffix)
    for i in range(5):
        Image.fromarray(_noise(rng, 40, 40)).save(folder / f"{i}.png")
    b = tmp_path / "b.safetensors"
    densetriton.save_weights(b, _tensors(SPEC, 1), SPEC, class_names=NAMES, preprocessing=PRE)
    out = tmp_path / f"f{suffix}"
    run = [
        "embed",
        folder,
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--out",
        out,
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    assert run_cli(capsys, *run, "--weights", weights)[0] == 0
    features = ctrl_c_on_second_batch(monkeypatch, "features")
    rc, _, err = run_cli(capsys, *run, "--weights", b)
    assert rc == 130 and "run the same command with --resume" in err
    monkeypatch.setattr(densetriton.engine.Engine, "features", features)
    rc, _, err = run_cli(capsys, *run, "--weights", weights, "--resume")
    assert rc == 1 and "holds features of another model" in err and ".partial" in err
    rc, _, err = run_cli(capsys, *run, "--weights", b, "--resume")
    assert rc == 0 and "resuming: 2 of 5 images already embedded" in err, err
    engine_b = densetriton.load(str(b), device="cpu", backend="reference")
    if suffix == ".npy":
        rows = torch.from_numpy(np.load(out))
        paths = Path(f"{out}.paths.txt").read_text(encoding="utf-8").splitlines()
        assert json.loads(Path(f"{out}.json").read_text())["model_id"] == model_id(engine_b, head=False)
    else:
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as f:
            rows, paths = f.get_tensor("features"), json.loads(f.metadata()["paths"])
            assert f.metadata()["model_id"] == model_id(engine_b, head=False)
    assert paths == [str(folder / f"{i}.png") for i in range(5)]
    assert rel_err(rows, torch.cat([engine_b.features(preprocess(load_image(p), engine_b)) for p in paths])) < 1e-5
    assert not Path(f"{out}.partial").exists()


def test_npy_paths_keep_unusual_characters_and_foreign_files_are_named(weights, engine, tmp_path, capsys):
    """A path with U+2028 or a form feed is one line of FILE.npy.paths.txt (only "\n" ends one),
    so --resume pairs every row with its own path; a file that is not densetriton's, or a
    FILE.npy.json that cannot be read, is named in one error and left as it is."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("odd-names")
    names = ["a\u2028b.png", "c\x0cd.png", "e\x85f.png", "plain.png"]
    for name in names:
        Image.fromarray(_noise(rng, 40, 40)).save(folder / name)
    npy = tmp_path / "f.npy"
    args = ["embed", folder, *common(weights, "--out", npy, "--workers", "0")]
    assert run_cli(capsys, *args)[0] == 0
    Image.fromarray(_noise(rng, 40, 40)).save(folder / "zz.png")
    rc, _, err = run_cli(capsys, *args, "--resume")
    assert rc == 0 and "embedded 1 image " in err and "4 already done" in err, err
    with open(f"{npy}.paths.txt", encoding="utf-8", newline="") as f:
        paths = f.read().split("\n")[:-1]
    assert paths == [str(folder / n) for n in sorted(names)] + [str(folder / "zz.png")]
    expected = torch.cat([engine.features(preprocess(load_image(p), engine)) for p in paths])
    assert rel_err(torch.from_numpy(np.load(npy)), expected) < 1e-5

    for bad, says in (("", "f.npy.json should name the model of"), ("[1, 2]", "f.npy.json should name the model of")):
        Path(f"{npy}.json").write_text(bad)
        rc, _, err = run_cli(capsys, *args, "--resume")
        assert rc == 1 and says in err, err
    weights_copy = tmp_path / "w.safetensors"
    weights_copy.write_bytes(Path(weights).read_bytes())
    rc, _, err = run_cli(capsys, "embed", folder, *common(weights, "--out", weights_copy, "--workers", "0", "--resume"))
    assert rc == 1 and "is not a densetriton features file" in err
    assert weights_copy.read_bytes() == Path(weights).read_bytes()


def test_embed_npy_and_safetensors(weights, engine, images, tmp_path, capsys):
    from safetensors import safe_open

    folder, kinds = images
    expected_paths = [p for p in scan_order(folder, kinds) if p not in {str(kinds["corrupt"]), str(kinds["fake"])}]
    expected = torch.cat([engine.features(preprocess(load_image(p), engine)) for p in expected_paths])
    assert expected.shape == (7, SPEC.num_features)

    npy = tmp_path / "feats.npy"
    rc, _, err = run_cli(capsys, "embed", folder, *common(weights, "--out", npy, "--workers", "0", "--batch-size", "3"))
    assert rc == 0 and "embedded 7 images" in err and "skipped 2:" in err
    array = np.load(npy)
    assert array.dtype == np.float32 and array.shape == (7, SPEC.num_features)
    assert (tmp_path / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == expected_paths
    assert rel_err(torch.from_numpy(array), expected) < 1e-5
    named = json.loads((tmp_path / "feats.npy.json").read_text(encoding="utf-8"))
    assert named["model_id"] == model_id(engine, head=False) and named["format"] == "densetriton-features"

    st = tmp_path / "feats.safetensors"
    rc, _, _ = run_cli(capsys, "embed", folder, *common(weights, "--out", st, "--workers", "1", "--batch-size", "4"))
    assert rc == 0
    with safe_open(str(st), framework="pt") as f:
        features = f.get_tensor("features")
        metadata = f.metadata()
    assert json.loads(metadata["paths"]) == expected_paths and metadata["model_id"] == named["model_id"]
    assert metadata["model"] == named["model"]
    assert rel_err(features, expected) < 1e-5
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*tmp"))


def test_embed_resume_after_an_interruption(weights, engine, images, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first batch keeps its rows in FILE.partial/; --resume embeds only the rest,
    and a later --resume only what was added since; without --resume nothing old is mixed in."""
    import shutil

    monkeypatch.setattr(densetriton.embed, "_FILE_ROWS_AT_ONCE", 2)  # FILE's rows copied in several blocks

    from safetensors import safe_open

    src, kinds = images
    folder = tmp_path / "data"
    shutil.copytree(src, folder)
    good = [
        p.replace(str(src), str(folder))
        for p in scan_order(src, kinds)
        if p not in {str(kinds["corrupt"]), str(kinds["fake"])}
    ]
    expected = torch.cat([engine.features(preprocess(load_image(p), engine)) for p in good])
    npy = tmp_path / "feats.npy"
    args = common(weights, "--out", npy, "--workers", "0", "--batch-size", "3")

    features = ctrl_c_on_second_batch(monkeypatch, "features")
    rc, _, err = run_cli(capsys, "embed", folder, *args)
    assert rc == 130 and not npy.exists()
    assert "images' features are kept in" in err and "feats.npy.partial/: run the same command with --resume" in err
    chunks = list((tmp_path / "feats.npy.partial").glob("chunk-*.safetensors"))
    assert len(chunks) == 1
    with safe_open(str(chunks[0]), framework="pt") as f:
        kept = json.loads(f.metadata()["paths"])  # the rows computed before Ctrl-C, kept for --resume
    assert 0 < len(kept) < 7 and kept == good[: len(kept)]
    monkeypatch.setattr(densetriton.engine.Engine, "features", features)

    rc, _, err = run_cli(capsys, "embed", folder, *args, "--resume")
    assert rc == 0 and f"resuming: {len(kept)} of 9 images already embedded" in err
    assert f"embedded {7 - len(kept)} images" in err
    assert (tmp_path / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == good
    assert rel_err(torch.from_numpy(np.load(npy)), expected) < 1e-5
    assert not (tmp_path / "feats.npy.partial").exists()

    # A run stopped between writing FILE and clearing FILE.partial/: its rows are not doubled.
    partial = tmp_path / "feats.npy.partial"
    partial.mkdir()
    from safetensors.torch import save_file

    save_file(
        {"features": torch.from_numpy(np.load(npy))[:2].contiguous()},
        str(partial / "chunk-r0000-1-0.safetensors"),
        metadata={"paths": json.dumps(good[:2]), "model_id": model_id(engine, head=False)},
    )
    rc, _, err = run_cli(capsys, "embed", folder, *args, "--resume")
    assert rc == 0 and "resuming: 7 of 9 images already embedded" in err
    assert (tmp_path / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == good
    assert not partial.exists()

    # A run stopped between writing FILE.paths.txt and FILE (the paths go first): the old rows
    # pair with the first paths, and the rest is embedded again.
    with open(tmp_path / "feats.npy.paths.txt", "a", encoding="utf-8") as f:
        f.write(str(folder / "not-yet-written.png") + "\n")
    np.save(npy, np.load(npy)[:6])
    rc, _, err = run_cli(capsys, "embed", folder, *args, "--resume")
    assert rc == 0 and "resuming: 6 of 9 images already embedded" in err and "embedded 1 image " in err
    assert (tmp_path / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == good[:6] + [good[6]]
    assert rel_err(torch.from_numpy(np.load(npy)), expected) < 1e-5
    # Nothing new: FILE is left as it is.
    mtime = npy.stat().st_mtime_ns
    rc, _, err = run_cli(capsys, "embed", folder, *args, "--resume")
    assert rc == 0 and "embedded 0 images" in err and npy.stat().st_mtime_ns == mtime

    # An image added since: only it is embedded, appended after the old rows.
    added = folder / "aaa.png"
    Image.fromarray(_noise(_rng("added"), 40, 44)).save(added)
    rc, _, err = run_cli(capsys, "embed", folder, *args, "--resume")
    assert rc == 0 and "embedded 1 image " in err and "7 already done" in err
    assert (tmp_path / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == good + [str(added)]
    array = torch.from_numpy(np.load(npy))
    assert rel_err(array[:7], expected) < 1e-5
    assert rel_err(array[7:], engine.features(preprocess(load_image(added), engine))) < 1e-5

    # Without --resume a stale FILE.partial/ is cleared, not mixed in.
    stale = tmp_path / "feats.npy.partial"
    stale.mkdir()
    save_file(
        {"features": torch.ones(1, SPEC.num_features)},
        str(stale / "chunk-r0000-0-0.safetensors"),
        metadata={"paths": json.dumps([good[0]])},
    )
    rc, _, err = run_cli(capsys, "embed", folder, *args)
    assert rc == 0 and "embedded 8 images" in err and not stale.exists()
    assert (tmp_path / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == [
        str(added)
    ] + good  # input order
    assert rel_err(torch.from_numpy(np.load(npy))[1:], expected) < 1e-5

    # Too many paths for a safetensors header: refused before any image is read.
    monkeypatch.setattr(densetriton.embed, "_SAFETENSORS_PATHS_LIMIT", 100)
    rc, _, err = run_cli(capsys, "embed", folder, *common(weights, "--out", tmp_path / "f.safetensors"))
    assert rc == 1 and "do not fit in a safetensors header" in err and "use --out FILE.npy" in err

    # A FILE from another model cannot be resumed.
    np.save(npy, np.ones((8, 5), dtype=np.float32))
    rc, _, err = run_cli(capsys, "embed", folder, *args, "--resume")
    assert rc == 1 and "holds 5 features per image, this model gives" in err


def test_resume_after_every_row_reached_partial_but_before_file_was_written(
    weights, engine, tmp_path, capsys, monkeypatch
):
    """Stopped after the last chunk reached FILE.partial/ and before FILE was written (a Ctrl-C in
    _write_features): --resume has nothing left to embed, and writes FILE from FILE.partial/ with
    every row once, in input order, then removes FILE.partial/. Fails if the final merge condition
    in embed.py (Features.merge: `if done or self.recovered:`) loses `or self.recovered`: a resume
    with nothing left to embed then deletes FILE.partial/ without writing FILE, exit status 0."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("window")
    names = ["b.png", "a.png", "c.png", "sub-d.png", "e.png"]
    for name in names:
        Image.fromarray(_noise(rng, 40, 44)).save(folder / name)
    files = [str(folder / n) for n in sorted(names)]
    real = densetriton.embed._write_features

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    for out in (tmp_path / "f.npy", tmp_path / "f.safetensors"):
        argv = ["embed", folder, *common(weights, "--out", out, "--workers", "0", "--batch-size", "2")]
        monkeypatch.setattr(densetriton.embed, "_write_features", stopped)
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 130 and not out.exists(), err
        assert len(list(Path(f"{out}.partial").glob("chunk-*.safetensors"))) == 1  # every row, in one chunk
        monkeypatch.setattr(densetriton.embed, "_write_features", real)
        rc, _, err = run_cli(capsys, *argv, "--resume")
        assert rc == 0 and "resuming: 5 of 5 images already embedded" in err and "embedded 0 images" in err, err
        if out.suffix == ".npy":
            paths = Path(f"{out}.paths.txt").read_text(encoding="utf-8").splitlines()
            features = torch.from_numpy(np.load(out))
        else:
            from safetensors import safe_open

            with safe_open(str(out), framework="pt") as f:
                paths, features = json.loads(f.metadata()["paths"]), f.get_tensor("features")
        assert paths == files  # each once, in input order
        expected = torch.cat([engine.features(preprocess(load_image(p), engine)) for p in files])
        assert rel_err(features, expected) < 1e-5
        assert not Path(f"{out}.partial").exists()
