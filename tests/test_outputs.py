"""What predict, embed and convert write never loses or mixes rows, nor destroys an input: one run
per output (a lock), a full disk, rows cut short, an output that is an input, a folder at --out,
temporary files a killed run left, and files synced before and after their rename.

Each test names, in its docstring, the change to densetriton that makes it fail."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rel_err
from image_commands import (  # noqa: F401 -- fixtures are used by name
    NAMES,
    PRE,
    REPO,
    SPEC,
    _noise,
    _rng,
    _tensors,
    assert_matches_engine,
    common,
    engine,
    one_thread,
    read_csv,
    read_jsonl,
    run_cli,
    weights,
)
from PIL import Image

import densetriton
import densetriton.embed
import densetriton.image_run
from densetriton.images import load_image, preprocess
from densetriton.outputs import OutputLock


def _photos(folder: Path, n: int, seed: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for i in range(n):
        Image.fromarray(_noise(rng, 36, 40)).save(folder / f"img{i:02d}.png")
    return [str(folder / f"img{i:02d}.png") for i in range(n)]


def _no_work(monkeypatch):
    """Record every image read and fail on any model load: a refusal must come before both."""
    import densetriton.stream as stream_module

    read = []
    monkeypatch.setattr(stream_module, "load_image", lambda p: read.append(p))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(densetriton.image_run, "load_engine", no_model)
    return read


def _features(model, paths):
    return torch.cat([model.features(preprocess(load_image(p), model)) for p in paths])


# -- one run per output ---------------------------------------------------------------------------

_PAUSED_RUN = """
import sys
import densetriton.engine
real, calls = densetriton.engine.Engine.__call__, []
def paused(self, x):  # the second batch waits for a line on stdin: a run caught mid-way
    calls.append(1)
    if len(calls) == 2:
        print("paused", flush=True)
        sys.stdin.readline()
    return real(self, x)
densetriton.engine.Engine.__call__ = paused
from densetriton.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_run_on_one_output_is_refused_at_once(weights, engine, tmp_path, capsys, monkeypatch):
    """A real predict run is paused mid-way (one row written); a second run on its --out, with and
    without --resume, is refused in one line naming the first run's pid, before loading a model or
    reading an image, and the file is untouched; the first then finishes with one model's rows, each
    image once. Without the lock (predict_command calling _predict directly) the second run writes."""
    files = _photos(tmp_path / "photos", 3, "lock")
    out = tmp_path / "r.csv"
    argv = ["predict", tmp_path / "photos", *common(weights, "--out", out, "--workers", "0", "--batch-size", "1")]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_RUN, *map(str, argv)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert first.stdout.readline() == "paused\n", first.stderr.read()
        before = out.read_bytes()
        assert before.count(b"\n") == 2  # the header and the first batch's row
        read = _no_work(monkeypatch)
        for extra in ([], ["--resume"]):
            start = time.perf_counter()
            rc, _, err = run_cli(capsys, *argv, *extra)
            assert rc == 1 and err.count("\n") == 1, err
            assert f"--out {out} is being written by another run (pid {first.pid} on " in err
            assert "predict" in err and "wait for it to finish" in err
            assert read == [] and time.perf_counter() - start < 5
            assert out.read_bytes() == before
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    monkeypatch.undo()
    rows = read_csv(out)
    assert [p for p, _ in rows] == files
    assert_matches_engine(rows, engine, 3)
    assert not (tmp_path / ".r.csv.lock").exists()  # removed by the run that held it
    assert run_cli(capsys, *argv, "--resume")[0] == 0  # free again once the first run ended


def test_embed_and_convert_are_refused_while_another_run_holds_the_output(weights, tmp_path, capsys, monkeypatch):
    """The same for embed and convert (the lock is taken in this process; flock is per open file,
    so it excludes this process's own second open too). Without lock_outputs/OutputLock in
    embed_command and cli._convert they go on."""
    _photos(tmp_path / "photos", 1, "lock-embed")
    read = _no_work(monkeypatch)
    out = tmp_path / "feats.npy"
    with OutputLock(out):
        rc, _, err = run_cli(capsys, "embed", tmp_path / "photos", *common(weights, "--out", out))
        assert rc == 1 and f"--out {out} is being written by another run (pid {os.getpid()} on" in err, err
        assert err.count("\n") == 1 and read == []
    converted = tmp_path / "w.safetensors"
    with OutputLock(converted):
        rc, _, err = run_cli(capsys, "convert", "--checkpoint", weights, "--out", converted)
        assert rc == 1 and f"--out {converted} is being written by another run" in err, err
    assert not converted.exists()
    assert run_cli(capsys, "convert", "--checkpoint", weights, "--out", converted)[0] == 0


# -- a full disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    """A small filesystem of its own at `folder`, or the test skipped saying why there is none."""
    folder.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, leave_pages: int) -> Path:
    """Fill the filesystem of `folder` until leave_pages pages are free."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\1" * (st.f_bavail * st.f_frsize - leave_pages * os.sysconf("SC_PAGE_SIZE")))
    return filler


_FULL_DISK_RUN = """
import os, sys
import densetriton.embed
real = densetriton.embed._write_features
def full(out, *args, **kwargs):  # every row is in FILE.partial/ now; the disk fills up before FILE
    st = os.statvfs(os.path.dirname(out))
    with open(os.path.join(os.path.dirname(out), "filler"), "wb") as f:
        f.write(b"\\1" * (st.f_bavail * st.f_frsize - int(os.environ["LEAVE_PAGES"]) * os.sysconf("SC_PAGE_SIZE")))
    return real(out, *args, **kwargs)
densetriton.embed._write_features = full
from densetriton.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_keeps_every_row_and_says_how_to_go_on(tmp_path, capsys):
    """The disk fills up after every row reached FILE.partial/: writing FILE.npy is one OSError
    line saying the rows are safe in FILE.partial/ and to --resume, no temporary file stays, and
    --resume once there is space writes every row. Two pages are left for FILE.npy: with
    np.lib.format.open_memmap its header and last page are written, then the first row in between
    is a SIGBUS (exit status -7, no message, the temporary file left)."""
    wide = SPEC.replace(num_init_features=512)  # ~1 KB of features per image: FILE spans 4 pages
    path = tmp_path / "wide.safetensors"
    densetriton.save_weights(path, _tensors(wide, 0), wide, class_names=NAMES, preprocessing=PRE)
    files = _photos(tmp_path / "photos", 14, "full")
    with _tmpfs(tmp_path / "disk", "512k") as disk:
        out = disk / "feats.npy"
        argv = ["embed", tmp_path / "photos", *common(str(path), "--out", out, "--workers", "0")]
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            LEAVE_PAGES="4",
            OMP_NUM_THREADS="1",
        )  # FILE.npy.json and .paths.txt: a page each
        proc = subprocess.run(
            [sys.executable, "-c", _FULL_DISK_RUN, *map(str, argv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
        last = proc.stderr.splitlines()[-1]
        assert last.startswith(
            f"densetriton: error: cannot write {out} (No space left on device); its 14 rows are "
            f"safe in {out}.partial/: free space (feats.npy needs about "
        ), proc.stderr[-2000:]
        assert last.endswith("MB) and run the same command with --resume")
        assert not out.exists() and not [p for p in os.listdir(disk) if p.endswith(".tmp")]
        assert list((disk / "feats.npy.partial").glob("chunk-*.safetensors"))
        (disk / "filler").unlink()
        engine = densetriton.load(str(path), device="cpu", backend="reference")
        rc, _, err = run_cli(capsys, *argv, "--resume")
        assert rc == 0 and "resuming: 14 of 14 images already embedded" in err, err
        assert (disk / "feats.npy.paths.txt").read_text(encoding="utf-8").splitlines() == files
        assert rel_err(torch.from_numpy(np.load(out)), _features(engine, files)) < 1e-5
        assert not (disk / "feats.npy.partial").exists()


def test_a_full_disk_under_a_safetensors_file_is_one_error(weights, engine, tmp_path, capsys, monkeypatch):
    """The same for FILE.safetensors, whose writer (safetensors) raises its own SafetensorError:
    without write_safetensors turning it into an OSError, the error names neither FILE.partial/
    nor --resume."""
    files = _photos(tmp_path / "photos", 3, "full-st")
    real = densetriton.embed._write_features

    def full(out, *args, **kwargs):
        _fill(Path(out).parent, 0)
        return real(out, *args, **kwargs)

    monkeypatch.setattr(densetriton.embed, "_write_features", full)
    with _tmpfs(tmp_path / "disk", "256k") as disk:
        out = disk / "feats.safetensors"
        argv = ["embed", tmp_path / "photos", *common(weights, "--out", out, "--workers", "0")]
        rc, _, err = run_cli(capsys, *argv)
        assert (
            rc == 1
            and err.splitlines()[-1].startswith(
                f"densetriton: error: cannot write {out} (No space left on device); its 3 rows are safe in {out}.partial/"
            )
            and err.endswith("run the same command with --resume\n")
        ), err
        assert not out.exists() and not [p for p in os.listdir(disk) if p.endswith(".tmp")]
        monkeypatch.setattr(densetriton.embed, "_write_features", real)
        (disk / "filler").unlink()
        rc, _, err = run_cli(capsys, *argv, "--resume")
        assert rc == 0, err
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as f:
            assert rel_err(f.get_tensor("features"), _features(engine, files)) < 1e-5


# -- rows cut short ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [".csv", ".jsonl"])
def test_resume_drops_rows_cut_short_and_classifies_their_images_again(weights, engine, tmp_path, capsys, fmt):
    """A row cut mid-way, ending in a newline or not, one whose last field happens to be a model id,
    and one with NUL bytes (two writers, a power cut) are dropped with a warning naming their lines;
    their images are classified again and each image is in the file once. Without the shape check
    (_csv_row_whole / _json_record) the CSV row ending in a newline is taken for another model's and
    the cut row ending in the model id counts its image as done (it goes missing)."""
    files = _photos(tmp_path / "photos", 4, "torn" + fmt)
    out = tmp_path / f"r{fmt}"
    argv = ["predict", tmp_path / "photos", *common(weights, "--out", out, "--workers", "0", "--topk", "3")]
    assert run_cli(capsys, *argv)[0] == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    body = 1 if fmt == ".csv" else 0  # the first row's line
    if fmt == ".csv":
        model = lines[body].rsplit(",", 1)[1]
        lines[body + 1] = lines[body + 1][: len(lines[body + 1]) // 2]  # cut mid-way, then a newline
        lines[body + 2] = lines[body + 2].split(",")[0] + ",cat,0.5," + model  # cut, ending in the model id
    else:
        model = json.loads(lines[body])["model"]
        lines[body + 1] = lines[body + 1][: len(lines[body + 1]) // 2]
        lines[body + 2] = lines[body + 2][: lines[body + 2].index('"topk"')] + '"model": "' + model + '"}'
    lines[body] = lines[body].replace("img00", "img\0\0")  # NUL bytes in a path: no real file's
    last = lines[body + 3]
    text = "\n".join(lines[: body + 3]) + "\n" + last[: len(last) // 2]  # the last row cut, no newline
    out.write_text(text, encoding="utf-8")

    rc, _, err = run_cli(capsys, *argv, "--resume")
    assert rc == 0, err
    numbers = [body + 1, body + 2, body + 3]  # 1-based line numbers of the first three rows
    assert f"warning: {out}: lines {', '.join(map(str, numbers))} cut short or garbled" in err, err
    assert "classified 4 images" in err
    rows = (read_csv if fmt == ".csv" else read_jsonl)(out)
    assert sorted(p for p, _ in rows) == files  # each once, none missing
    assert_matches_engine(rows, engine, 3)
    rc, _, err = run_cli(capsys, *argv, "--resume")  # the file is whole again: nothing to warn of, nothing to do
    assert rc == 0 and "warning" not in err and "classified 0 images" in err


# -- an output that is an input ---------------------------------------------------------------------


def test_an_output_that_is_an_input_is_refused(weights, tmp_path, capsys, monkeypatch):
    """predict and embed refuse an --out that is an input image (named as given, or a hard link of
    it) or the weights file; convert an --out that is its checkpoint under another spelling. Each
    input is left as it was. Without refuse_inputs_as_outputs each of them is overwritten."""
    photos = tmp_path / "photos"
    _photos(photos, 1, "same")
    scan = tmp_path / "scan.csv"  # an image with a misleading name: named as a file, it is read
    Image.fromarray(_noise(_rng("scan"), 40, 40)).save(scan, format="PNG")
    alias = tmp_path / "alias.jsonl"
    os.link(scan, alias)
    kept = {p: p.read_bytes() for p in (scan, Path(weights))}
    read = _no_work(monkeypatch)
    cases = [
        (
            ["predict", photos, scan, *common(weights, "--out", scan)],
            f"--out {scan} is the same file as the input {scan}",
        ),
        (
            ["predict", scan, *common(weights, "--out", alias, "--resume")],
            f"--out {alias} is the same file as the input {scan}",
        ),
        (
            ["embed", photos, *common(weights, "--out", weights)],
            f"--out {weights} is the same file as the input {weights}",
        ),
    ]
    feats = tmp_path / "feats.safetensors"
    os.link(weights, feats)
    cases.append(
        (["embed", photos, *common(weights, "--out", feats)], f"--out {feats} is the same file as the input {weights}")
    )
    for argv, message in cases:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 1 and message in err and err.count("\n") == 1, err
    assert read == [] and all(p.read_bytes() == data for p, data in kept.items())
    monkeypatch.undo()
    spelled = tmp_path / "sub" / ".." / Path(weights).name
    (tmp_path / "sub").mkdir()
    ck = tmp_path / Path(weights).name
    ck.write_bytes(kept[Path(weights)])
    rc, _, err = run_cli(capsys, "convert", "--checkpoint", ck, "--out", spelled)
    assert rc == 1 and f"--out {spelled} is the same file as the input {ck}" in err, err
    assert ck.read_bytes() == kept[Path(weights)]


# -- the output checked before any work --------------------------------------------------------------


def test_embed_checks_its_output_before_reading_an_image(weights, tmp_path, capsys, monkeypatch):
    """A folder at --out (or at FILE.npy.paths.txt), and --resume into a read-only folder, are
    refused before any image is read or a model loaded. Without check_target in embed_command the
    folder is found only when FILE is written, after all the work."""
    _photos(tmp_path / "photos", 1, "check")
    read = _no_work(monkeypatch)
    (tmp_path / "feats.npy").mkdir()
    (tmp_path / "g.npy.paths.txt").mkdir()
    for out, message in (
        (tmp_path / "feats.npy", f"{tmp_path / 'feats.npy'} is a folder"),
        (tmp_path / "g.npy", f"{tmp_path / 'g.npy.paths.txt'} is a folder"),
    ):
        rc, _, err = run_cli(capsys, "embed", tmp_path / "photos", *common(weights, "--out", out))
        assert rc == 1 and message in err and err.count("\n") == 1, err
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        (disk / "feats.npy.partial").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        rc, _, err = run_cli(
            capsys, "embed", tmp_path / "photos", *common(weights, "--out", disk / "feats.npy", "--resume")
        )
        assert rc == 1 and f"the folder {disk} cannot be written" in err, err
    assert read == []


# -- leftovers and durability -----------------------------------------------------------------------


def test_temporary_files_a_killed_run_left_are_removed_by_the_next(weights, tmp_path, capsys):
    """`.NAME.XXXXXXXX.tmp` files of this output (and of FILE.npy's sidecars) go at the next run;
    other names stay, and so do they while another run holds the output. Without
    remove_stale_temps they pile up."""
    _photos(tmp_path / "photos", 1, "stale")
    stale = [".feats.npy.k2j_8x0q.tmp", ".feats.npy.paths.txt.abcdefgh.tmp", ".feats.npy.json.12345678.tmp"]
    others = [".feats.npy.short.tmp", ".other.npy.abcdefgh.tmp", "feats.npy.abcdefgh.tmp", ".feats.npy.ABCDEFGH.tmp"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"x" * 100)
    argv = ["embed", tmp_path / "photos", *common(weights, "--out", tmp_path / "feats.npy", "--workers", "0")]
    with OutputLock(tmp_path / "feats.npy"):
        assert run_cli(capsys, *argv)[0] == 1
    assert all((tmp_path / n).exists() for n in stale)
    assert run_cli(capsys, *argv)[0] == 0
    assert not any((tmp_path / n).exists() for n in stale) and all((tmp_path / n).exists() for n in others)
    (tmp_path / ".r.csv.abcdefgh.tmp").write_bytes(b"x")
    (tmp_path / ".w.safetensors.abcdefgh.tmp").write_bytes(b"x")
    assert run_cli(capsys, "predict", tmp_path / "photos", *common(weights, "--out", tmp_path / "r.csv"))[0] == 0
    assert run_cli(capsys, "convert", "--checkpoint", weights, "--out", tmp_path / "w.safetensors")[0] == 0
    assert not (tmp_path / ".r.csv.abcdefgh.tmp").exists() and not (tmp_path / ".w.safetensors.abcdefgh.tmp").exists()


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the fsync calls in atomic_write, a power cut just after it returned can leave an
    empty file or the old one."""
    import stat

    from densetriton.atomic import atomic_write

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else f"fsync {os.fstat(fd).st_size} bytes")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f.txt", lambda tmp: Path(tmp).write_text("hello"))
    assert events == ["fsync 5 bytes", "rename", "fsync folder"]
    assert (tmp_path / "f.txt").read_text() == "hello"
