"""`densetriton predict`: its rows checked against the engine called directly, on images of every
awkward kind (tests/image_commands.py), --resume, multi-label and operating points."""

import os
from pathlib import Path

import pytest
import torch
from image_commands import (  # noqa: F401 -- fixtures are used by name
    CIFAR_SPEC,
    NAMES,
    PRE,
    PROB_TOL,
    SPEC,
    _noise,
    _rng,
    _tensors,
    assert_matches_engine,
    common,
    ctrl_c_on_second_batch,
    direct,
    engine,
    images,
    one_thread,
    read_csv,
    read_jsonl,
    run_cli,
    scan_order,
    weights,
)
from PIL import Image

import densetriton
from densetriton.images import load_image, preprocess, topk


def test_predict_folder_csv_matches_the_engine(weights, engine, images, tmp_path, capsys):
    folder, kinds = images
    out = tmp_path / "results.csv"
    rc, stdout, err = run_cli(
        capsys, "predict", folder, *common(weights, "--out", out, "--topk", "2", "--batch-size", "3", "--workers", "0")
    )
    assert rc == 0
    rows = read_csv(out)
    bad = {str(kinds["corrupt"]), str(kinds["fake"])}
    assert [p for p, _ in rows] == [p for p in scan_order(folder, kinds) if p not in bad]
    assert len(rows) == 7 and all(len(top) == 2 for _, top in rows)
    assert_matches_engine(rows, engine, 2)
    assert len({top[0][1] for _, top in rows}) == len(rows)  # different images, different answers
    assert {top[0][0] for _, top in rows} <= set(NAMES)

    assert "classified 7 images" in err and "skipped 2:" in err
    assert f"{kinds['corrupt']}: not an image" in err and f"{kinds['fake']}: not an image" in err
    assert "notes.txt" not in err  # not an image suffix: ignored by the folder scan
    assert stdout == ""


def test_predict_jsonl_multi_label_with_workers(weights, engine, images, tmp_path, capsys):
    folder, kinds = images
    out = tmp_path / "results.jsonl"
    rc, _, err = run_cli(
        capsys,
        "predict",
        folder,
        *common(weights, "--out", out, "--topk", "3", "--multi-label", "--batch-size", "4", "--workers", "2"),
    )
    assert rc == 0
    rows = read_jsonl(out)
    assert len(rows) == 7
    assert_matches_engine(rows, engine, 3, multi_label=True)
    path, top = rows[0]
    sig = torch.sigmoid(engine(preprocess(load_image(path), engine)))[0]
    assert sorted(p for _, p in top) == pytest.approx(sorted(sig.tolist()), abs=PROB_TOL)
    assert any(abs(sum(p for _, p in t) - 1) > 0.05 for _, t in rows)  # sigmoids, not a softmax
    assert "skipped 2:" in err


def test_a_file_recorded_multi_label_gets_sigmoids_by_default(weights, images, tmp_path, capsys):
    """convert --multi-label records how the model was trained; predict follows it unless told
    otherwise (--no-multi-label), and converting the file again keeps it."""
    folder, kinds = images
    tagged = tmp_path / "tagged.safetensors"
    rc, stdout, _ = run_cli(capsys, "convert", "--checkpoint", weights, "--multi-label", "--out", tagged)
    assert rc == 0 and "outputs: a sigmoid per class (multi-label)" in stdout
    assert densetriton.weights.load_weights(tagged).multi_label is True
    engine = densetriton.load(tagged, device="cpu", backend="reference")
    assert engine.multi_label is True
    image = kinds["nested"]
    for flags, multi_label in (((), True), (("--no-multi-label",), False), (("--multi-label",), True)):
        out = tmp_path / f"r{len(flags)}{multi_label}.csv"
        rc, _, err = run_cli(capsys, "predict", image, *common(str(tagged), "--out", out, "--topk", "4", *flags))
        assert rc == 0 and ("a sigmoid per class" in err) == multi_label
        rows = read_csv(out)
        assert_matches_engine(rows, engine, 4, multi_label=multi_label)
    again = tmp_path / "again.safetensors"
    assert run_cli(capsys, "convert", "--checkpoint", tagged, "--out", again)[0] == 0
    assert densetriton.weights.load_weights(again).multi_label is True
    assert run_cli(capsys, "convert", "--checkpoint", tagged, "--no-multi-label", "--out", again)[0] == 0
    assert densetriton.weights.load_weights(again).multi_label is False
    assert densetriton.load(again, device="cpu", backend="reference").multi_label is False


def test_operating_points_calibrate_what_predict_reports(weights, images, tmp_path, capsys):
    """convert --operating-points records a threshold per class (torchxrayvision's op_threshs);
    predict then reports each class calibrated so that its threshold reads 0.5."""
    folder, kinds = images
    n = SPEC.num_classes
    points = [None if i == 1 else round(0.02 + 0.95 * i / n, 4) for i in range(n)]
    points_file = tmp_path / "points.txt"
    points_file.write_text("\n".join("nan" if p is None else str(p) for p in points) + "\n")
    calibrated = tmp_path / "calibrated.safetensors"
    rc, stdout, _ = run_cli(
        capsys, "convert", "--checkpoint", weights, "--operating-points", points_file, "--out", calibrated
    )
    assert rc == 0 and "outputs: a sigmoid per class" in stdout and "operating points: 0.02, none" in stdout
    w = densetriton.weights.load_weights(calibrated)
    assert w.multi_label is True and w.operating_points == points  # implied multi-label
    engine = densetriton.load(calibrated, device="cpu", backend="reference")
    assert engine.operating_points == points
    rc, stdout, _ = run_cli(capsys, "info", calibrated)
    assert rc == 0 and "operating points    0.02, none" in stdout

    out = tmp_path / "calibrated.csv"
    rc, _, err = run_cli(capsys, "predict", kinds["nested"], *common(str(calibrated), "--out", out, "--topk", n))
    assert rc == 0 and "operating point at 0.5" in err
    ((path, top),) = read_csv(out)
    logits = engine(preprocess(load_image(path), engine))
    expected = topk(logits, n, engine.class_names, multi_label=True, operating_points=points)[0]
    assert [c for c, _ in top] == [c for c, _ in expected]
    assert all(abs(p - q) <= PROB_TOL for (_, p), (_, q) in zip(top, expected))
    assert dict(top)[NAMES[1]] == 0.5
    plain = dict(topk(logits, n, engine.class_names, multi_label=True)[0])
    assert max(abs(p - plain[c]) for c, p in top) > 0.05  # calibrated, not the plain sigmoid

    # Converting again keeps them; bad ones are one clear error and write nothing.
    again = tmp_path / "again.safetensors"
    assert run_cli(capsys, "convert", "--checkpoint", calibrated, "--out", again)[0] == 0
    assert densetriton.weights.load_weights(again).operating_points == points
    assert run_cli(capsys, "convert", "--checkpoint", calibrated, "--no-multi-label", "--out", again)[0] == 0
    assert densetriton.weights.load_weights(again).operating_points is None  # softmax: no points
    bad = tmp_path / "bad.safetensors"
    for text, flags, message in (
        ("0.5\n" * (n - 1), (), f"{n - 1} operating points for a {n}-class"),
        ("1.5\n" * n, (), "strictly between 0 and 1"),
        ("0\n" * n, (), "strictly between 0 and 1"),
        ("0.99999999\n" * n, (), "strictly between 0 and 1"),  # 1.0 in float32
        ("nan\n" * n, (), "every operating point is null"),
        ("0.5\nhigh\n", (), "line 2: 'high' is not a number"),
        ("0.5\n" * n, ("--no-multi-label",), "operating points need a multi-label model"),
    ):
        points_file.write_text(text)
        rc, _, err = run_cli(
            capsys, "convert", "--checkpoint", weights, "--operating-points", points_file, *flags, "--out", bad
        )
        assert rc == 1 and message in err, err
        assert not bad.exists()


def test_predict_each_awkward_kind_individually(weights, engine, images, capsys):
    """Files named explicitly: always attempted (even .txt), reported in argument order."""
    folder, kinds = images
    order = ["exif", "gray", "rgba", "palette", "cmyk", "deep", "txt", "nested", "corrupt"]
    # A missing file among others, suffix-less (a DICOM IM0009 deleted from a list) too, is skipped.
    argv = [kinds[k] for k in order] + [folder / "missing.jpg", folder / "IM0009"]
    rc, stdout, err = run_cli(capsys, "predict", *argv, *common(weights, "--topk", "3", "--workers", "0"))
    assert rc == 0
    blocks = []
    for line in stdout.splitlines():
        if line.startswith(" "):
            blocks[-1][1].append(line.split())
        else:
            blocks.append((line, []))
    assert [path for path, _ in blocks] == [str(kinds[k]) for k in order if k not in ("txt", "corrupt")]
    for path, ranks in blocks:
        expected = direct(engine, path, 3)
        assert [r[0] for r in ranks] == ["1.", "2.", "3."]
        assert [r[2] for r in ranks] == [name for name, _ in expected]
        assert [r[1] for r in ranks] == [f"{100 * p:.3f}%" for _, p in expected]
    assert "classified 7 images" in err and "skipped 4:" in err
    assert f"{kinds['txt']}: not an image" in err and f"{kinds['corrupt']}: not an image" in err
    assert "missing.jpg: file not found" in err and "IM0009: file not found" in err
    # Nothing given exists, or a folder (trailing separator) is not there: a mistyped argument,
    # one error before any work.
    for typo in (folder / "no-such-folder", f"{folder / 'no-such-folder'}/"):
        rc, _, err = run_cli(capsys, "predict", typo, *common(weights))
        assert rc == 1 and err.strip() == f"densetriton: error: {typo}: no such file or folder"
    typo = f"{folder / 'no-such-folder'}{os.sep}"
    rc, _, err = run_cli(capsys, "predict", kinds["gray"], typo, *common(weights))
    assert rc == 1 and err.strip() == f"densetriton: error: {typo}: no such folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_predict_on_a_numbered_cuda_device_without_cuda_is_one_clear_error(weights, images, capsys):
    folder, _ = images
    rc, _, err = run_cli(capsys, "predict", folder, "--weights", weights, "--device", "cuda:0")
    assert rc == 1 and "no usable CUDA GPU" in err and "Traceback" not in err, err


def test_exif_rotation_reaches_the_model(weights, engine, images):
    """The rotated photo is classified upright: its batch differs from the unrotated pixels'."""
    _, kinds = images
    upright = load_image(kinds["exif"])
    assert upright.size == (30, 56)
    with Image.open(kinds["exif"]) as raw:
        assert raw.size == (56, 30)
        stored = raw.convert("RGB")
    assert not torch.equal(preprocess(upright, engine), preprocess(stored, engine))


def test_resume_processes_only_new_images(weights, engine, tmp_path, capsys, monkeypatch):
    import densetriton.stream as stream_module

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("resume")
    for name in ("b.jpg", "d.jpg", "f.jpg"):
        Image.fromarray(_noise(rng, 40, 40)).save(folder / name)
    out = tmp_path / "results.csv"
    args = ["predict", folder, *common(weights, "--out", out, "--workers", "0", "--batch-size", "2")]
    assert run_cli(capsys, *args)[0] == 0
    first = read_csv(out)
    assert [Path(p).name for p, _ in first] == ["b.jpg", "d.jpg", "f.jpg"]

    for name in ("a.jpg", "e.jpg"):
        Image.fromarray(_noise(rng, 40, 40)).save(folder / name)
    seen = []
    real = stream_module.load_image
    monkeypatch.setattr(stream_module, "load_image", lambda p: seen.append(Path(p).name) or real(p))
    rc, _, err = run_cli(capsys, *args, "--resume")
    assert rc == 0
    assert seen == ["a.jpg", "e.jpg"]
    assert "classified 2 images" in err and "3 already done" in err
    second = read_csv(out)
    assert second[:3] == first and [Path(p).name for p, _ in second[3:]] == ["a.jpg", "e.jpg"]
    assert_matches_engine(second, engine, 3)

    # An interrupted run leaves half a row: it is dropped and that image classified again.
    data = out.read_bytes()
    out.write_bytes(data[:-9])
    seen.clear()
    assert run_cli(capsys, *args, "--resume")[0] == 0
    assert seen == ["e.jpg"]
    third = read_csv(out)
    assert [p for p, _ in third] == [p for p, _ in second]
    assert_matches_engine(third, engine, 3)

    # Nothing left to do: nothing read, nothing duplicated.
    seen.clear()
    rc, _, err = run_cli(capsys, *args, "--resume")
    assert rc == 0 and seen == [] and read_csv(out) == third and "classified 0 images" in err

    # Without --resume the file is replaced.
    assert run_cli(capsys, *args)[0] == 0
    assert [Path(p).name for p, _ in read_csv(out)] == ["a.jpg", "b.jpg", "d.jpg", "e.jpg", "f.jpg"]


def test_resume_never_mixes_two_models_rows(weights, engine, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("resume-models")
    Image.fromarray(_noise(rng, 40, 40)).save(folder / "one.png")
    retrained = tmp_path / "v2.safetensors"  # the same classes, other weights: a model's next version
    densetriton.save_weights(retrained, _tensors(SPEC, 1), SPEC, class_names=NAMES, preprocessing=PRE)
    for out in (tmp_path / "r.csv", tmp_path / "r.jsonl"):
        base = ["predict", folder, *common(weights, "--out", out, "--workers", "0", "--topk", "2")]
        assert run_cli(capsys, *base)[0] == 0
        before = out.read_bytes()
        Image.fromarray(_noise(rng, 40, 40)).save(folder / f"new-{out.suffix[1:]}.png")
        for argv in (
            ["predict", folder, *common(str(retrained), "--out", out, "--workers", "0", "--topk", "2", "--resume")],
            [*base, "--multi-label", "--resume"],
        ):  # sigmoids beside softmaxes
            rc, _, err = run_cli(capsys, *argv)
            assert rc == 1 and "holds rows of another model" in err and "resume with the model that wrote it" in err
            assert out.read_bytes() == before
        assert run_cli(capsys, *base, "--resume")[0] == 0  # the same model goes on
        assert_matches_engine(read_csv(out) if out.suffix == ".csv" else read_jsonl(out), engine, 2)
    # Another model with more classes at the same --topk: its rows are another model's (said
    # first), not a --topk slip.
    five = tmp_path / "five.safetensors"
    densetriton.save_weights(
        five,
        _tensors(SPEC.replace(num_classes=5), 2),
        SPEC.replace(num_classes=5),
        class_names=["a", "b", "c", "d", "e"],
        preprocessing=PRE,
    )
    wide = tmp_path / "wide.csv"
    assert run_cli(capsys, "predict", folder, *common(weights, "--out", wide, "--workers", "0", "--topk", "5"))[0] == 0
    rc, _, err = run_cli(
        capsys, "predict", folder, *common(str(five), "--out", wide, "--workers", "0", "--topk", "5", "--resume")
    )
    assert rc == 1 and "holds rows of another model" in err, err
    # A file written before rows named their model cannot be checked: refused, not guessed.
    old = tmp_path / "old.csv"
    old.write_text("path,label_1,prob_1,label_2,prob_2\n" + f"{folder / 'one.png'},cat,0.5,dog,0.25\n")
    rc, _, err = run_cli(
        capsys, "predict", folder, *common(weights, "--out", old, "--workers", "0", "--topk", "2", "--resume")
    )
    assert rc == 1 and "names no model in its rows" in err

    # Ctrl-C says where the results so far are, and how to go on.
    ctrl_c_on_second_batch(monkeypatch, "__call__")
    out = tmp_path / "stopped.csv"
    rc, _, err = run_cli(
        capsys, "predict", folder, *common(weights, "--out", out, "--workers", "0", "--batch-size", "1")
    )
    assert rc == 130 and f"1 images' results are in {out}: run the same command with --resume" in err
    assert len(read_csv(out)) == 1


def test_resume_jsonl_and_mismatched_topk(weights, engine, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("resume-jsonl")
    Image.fromarray(_noise(rng, 40, 40)).save(folder / "one.png")
    out = tmp_path / "r.jsonl"
    args = ["predict", folder, *common(weights, "--out", out, "--workers", "0", "--topk", "2")]
    assert run_cli(capsys, *args)[0] == 0
    Image.fromarray(_noise(rng, 40, 40)).save(folder / "two.png")
    assert run_cli(capsys, *args, "--resume")[0] == 0
    rows = read_jsonl(out)
    assert [Path(p).name for p, _ in rows] == ["one.png", "two.png"]
    assert_matches_engine(rows, engine, 2)

    rc, _, err = run_cli(
        capsys, "predict", folder, *common(weights, "--out", out, "--workers", "0", "--topk", "3", "--resume")
    )
    assert rc == 1 and "not --topk 3" in err and err.count("\n") == 1
    assert read_jsonl(out) == rows


def test_mixed_sizes_without_preprocessing(tmp_path, capsys):
    """A CIFAR-stem file without preprocessing: images at their own size, batched by size; an
    image too small for the network is skipped with the reason."""
    path = tmp_path / "cifar.safetensors"
    densetriton.save_weights(path, _tensors(CIFAR_SPEC, 3), CIFAR_SPEC, class_names=NAMES)
    eng = densetriton.load(path, device="cpu", backend="reference")
    assert eng.preprocessing is None
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = _rng("mixed")
    for name, size in [("a.png", 32), ("b.png", 24), ("c.png", 32), ("d.png", 1), ("e.png", 24)]:
        Image.fromarray(_noise(rng, size, size)).save(folder / name)
    out = tmp_path / "r.csv"
    rc, _, err = run_cli(
        capsys,
        "predict",
        folder,
        "--weights",
        path,
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--out",
        out,
        "--workers",
        "0",
        "--batch-size",
        "5",
    )
    assert rc == 0
    rows = read_csv(out)
    assert [Path(p).name for p, _ in rows] == ["a.png", "b.png", "c.png", "e.png"]
    assert_matches_engine(rows, eng, 3)
    assert "d.png: too small for the model" in err
    assert "no resize or crop" in err


def test_grayscale_model_sees_every_image_kind_as_luminance(images, tmp_path, capsys):
    """A 1-channel model (X-rays, CT slices): every readable kind of image reaches it as one
    channel, prepared as its file says; without a recorded preprocessing it is one clear error."""
    spec = SPEC.replace(in_channels=1)
    pre = {"resize_size": 40, "crop_size": 32, "mean": [0.45], "std": [0.25]}
    path = tmp_path / "gray.safetensors"
    densetriton.save_weights(path, _tensors(spec, 4), spec, class_names=NAMES, preprocessing=pre)
    eng = densetriton.load(path, device="cpu", backend="reference")
    folder, kinds = images
    assert preprocess(kinds["cmyk"], eng).shape == (1, 1, 32, 32)
    out = tmp_path / "gray.csv"
    rc, _, err = run_cli(capsys, "predict", folder, *common(str(path), "--out", out, "--workers", "0"))
    assert rc == 0, err
    rows = read_csv(out)
    assert len(rows) == 7  # the 9 image-suffixed files less the corrupt and the fake one
    assert_matches_engine(rows, eng, 3)
    assert "in_channels=1" in err  # the run's header names the model
    assert "grayscale, mean [0.45], std [0.25]" in err

    bare = tmp_path / "gray-bare.safetensors"
    densetriton.save_weights(bare, _tensors(spec, 4), spec, class_names=NAMES)
    rc, _, err = run_cli(capsys, "predict", kinds["gray"], *common(str(bare)))
    assert rc == 1 and "records no preprocessing" in err and "--mean" in err and err.count("\n") == 1, err
    # What the message asks for: convert the file again with the preprocessing; the class names stay.
    fixed = tmp_path / "gray-fixed.safetensors"
    rc, _, err = run_cli(
        capsys,
        "convert",
        "--checkpoint",
        bare,
        "--out",
        fixed,
        "--mean",
        "0.45",
        "--std",
        "0.25",
        "--resize-size",
        "40",
        "--crop-size",
        "32",
    )
    assert rc == 0, err
    assert densetriton.load(fixed, device="cpu", backend="reference").class_names == NAMES
    rc, out_text, err = run_cli(capsys, "predict", kinds["gray"], *common(str(fixed)))
    assert rc == 0 and direct(eng, kinds["gray"], 3)[0][0] in out_text, err


def test_one_process_resumes_the_parts_a_torchrun_run_left_unmerged(weights, engine, tmp_path, capsys):
    """A torchrun run stopped after its ranks wrote FILE.part0 and FILE.part1 and before rank 0
    merged them, resumed by a single process: their rows are kept (merged into FILE in input order,
    not classified again), the parts go. Without Predictions.resume merging them, every image is
    classified again and the parts stay behind; without Predictions.fresh removing them, a run
    without --resume leaves them too."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = _rng("parts")
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        Image.fromarray(_noise(rng, 40, 40)).save(folder / name)
    out = tmp_path / "r.csv"
    argv = ["predict", folder, *common(weights, "--out", out, "--workers", "0", "--topk", "2")]
    assert run_cli(capsys, *argv)[0] == 0
    header, *rows = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.unlink()  # as the ranks left them: every 2nd image each, no FILE yet
    Path(f"{out}.part0").write_text(header + "".join(rows[0::2]), encoding="utf-8")
    Path(f"{out}.part1").write_text(header + "".join(rows[1::2]), encoding="utf-8")
    Image.fromarray(_noise(rng, 40, 40)).save(folder / "f.png")
    rc, _, err = run_cli(capsys, *argv, "--resume")
    assert rc == 0 and "resuming: 5 of 6 images already in" in err and "classified 1 image " in err, err
    assert out.read_text(encoding="utf-8").splitlines(keepends=True)[:6] == [header, *rows]
    assert [Path(p).name for p, _ in read_csv(out)] == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    assert_matches_engine(read_csv(out), engine, 2)
    assert not list(tmp_path.glob("r.csv.part*"))
    Path(f"{out}.part1").write_text(header + rows[0], encoding="utf-8")
    assert run_cli(capsys, *argv)[0] == 0 and not list(tmp_path.glob("r.csv.part*"))
