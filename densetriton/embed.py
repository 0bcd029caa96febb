"""`densetriton embed`: the pooled features (engine.features) of images and folders, to a .npy
or .safetensors file.

FILE is written once, atomically, when every image has been processed; until then each rank
keeps the rows it has computed in FILE.partial/ (a chunk every 30 s and when the run stops), so
`--resume` loses at most that much. Every file names the model whose features it holds
(stream.model_id), so that --resume never mixes two models' rows. Under torchrun rank 0 writes
FILE from every rank's chunks, in input order. The run itself (inputs, lock, resume, torchrun,
streaming, summary) is image_run's; this module supplies what embed writes, `Features`.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .image_run import Output, Sink, run_image_command
from .stream import (
    Dist,
    add_common_arguments,
    inputs_help,
    model_id,
    not_utf8,
    outcome_help,
    path_key,
    print_summary,
)

EMBED_FORMATS = (".npy", ".safetensors")
# The paths of a .safetensors features file live in its header, which safetensors caps at 100 MB.
_SAFETENSORS_PATHS_LIMIT = 90_000_000


# -- the command line -------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the `embed` subcommand to densetriton's command line."""
    p = subparsers.add_parser(
        "embed",
        help="extract pooled features (what the classifier sees) for images and folders, to .npy or .safetensors",
        description="Extract each image's pooled features as float32: engine.features, the global average pool\n"
        "after the final BatchNorm-ReLU, which is what the classifier sees.",
        epilog=inputs_help()
        + """
Output (written atomically, once every image has been processed):
  FILE.npy          a float32 array [N, features]; the N image paths, one per line (UTF-8), go to
                    FILE.npy.paths.txt, and FILE.npy.json names the model ("model", "model_id")
                    -- e.g. feats.npy, feats.npy.paths.txt and feats.npy.json
  FILE.safetensors  a float32 tensor "features" [N, features]; metadata "paths" holds the paths as a
                    JSON list, "model" describes the network, "model_id" names the weights and
                    preprocessing (12 hex digits), so that --resume refuses another model's rows
Row i belongs to path i; skipped images have no row, the rest are in input order. Until FILE is
written, the rows computed so far are kept in FILE.partial/ (every 30 s, and when the run stops,
by an error or Ctrl-C); --resume embeds only the images in neither FILE nor FILE.partial/ and
writes FILE with the old rows first; if FILE cannot be written (a full disk), its rows stay in
FILE.partial/ and --resume writes it. Without --resume FILE.partial/ is cleared and FILE replaced;
--resume after such a run was interrupted goes on replacing FILE (its old rows are not kept).
Paths are separated by "\\n" alone. Under torchrun each rank takes every world_size-th image and
rank 0 writes FILE.

Examples:
  densetriton embed photos/ --model densenet121 --out feats.npy
  torchrun --nproc-per-node 2 -m densetriton embed photos/ --model densenet121 --out feats.safetensors
  densetriton embed photos/ --model densenet121 --out feats.npy --resume   # after an interruption
"""
        + outcome_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.npy (plus FILE.npy.paths.txt and FILE.npy.json) or FILE.safetensors",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep FILE's rows and those an interrupted run left in FILE.partial/; embed only the other images",
    )
    p.set_defaults(func=embed_command)


# -- the output file ------------------------------------------------------------------------------


_FILE_ROWS_AT_ONCE = 1 << 16  # rows copied from the old FILE into the new one at a time


def _fill_rows(rows, out: str, width: int, model_id: str, paths: list[str], file_rows: int) -> None:
    """rows: a [len(paths), width] float32 array or tensor, written in place: the old FILE's first
    file_rows rows, then each later path's first row in FILE.partial/'s chunks."""
    from safetensors import safe_open

    position = {path_key(p): i for i, p in enumerate(paths[file_rows:], start=file_rows)}
    block = _FILE_ROWS_AT_ONCE
    if file_rows and out.lower().endswith(".npy"):
        old = np.load(out, mmap_mode="r", allow_pickle=False)
        for i in range(0, file_rows, block):
            j = min(i + block, file_rows)
            rows[i:j] = old[i:j]  # .npy to .npy: both numpy
        del old
    elif file_rows:
        with safe_open(out, framework="pt") as f:
            old = f.get_slice("features")
            for i in range(0, file_rows, block):
                j = min(i + block, file_rows)
                rows[i:j] = old[i:j]  # .safetensors to .safetensors: both torch
    for chunk, chunk_paths in _progress_chunks(out, width, model_id):
        take = [(j, position.pop(path_key(p))) for j, p in enumerate(chunk_paths) if path_key(p) in position]
        if take:
            with safe_open(str(chunk), framework="pt") as f:
                features = f.get_tensor("features")
            source, target = zip(*take)
            picked = features[list(source)]
            rows[list(target)] = picked
    if position:  # FILE.partial/ changed under this run: write nothing rather than rows never computed
        raise RuntimeError(
            f"{len(position)} rows, {next(iter(position))!r} first, vanished from "
            f"{_progress_dir(out)}/ before {out} was written; run again with --resume"
        )


def _write_features(
    out: str, width: int, model: str, model_id: str, paths: list[str], *, file_rows: int, resumed: bool
) -> None:
    """Write FILE: row i is path i's features. The first file_rows rows are the old FILE's (a
    resumed run), every later one the first row FILE.partial/'s chunks hold for its path. Rows
    stream from FILE and one chunk at a time into the new file (a memory map for .npy), so a
    large FILE is never held in memory, let alone several copies of it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from .atomic import atomic_write

    if out.lower().endswith(".npy"):

        def write_npy(tmp):
            with _NpyRows(tmp, len(paths), width) as rows:
                _fill_rows(rows, out, width, model_id, paths, file_rows)

        def write_paths(tmp):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write("".join(p + "\n" for p in paths))

        def write_model(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": "densetriton-features", "model": model, "model_id": model_id}, f, indent=1)
                f.write("\n")

        # Three files cannot be replaced at once, so the order makes a stop between them harmless:
        # the model, then the paths, then the rows. A resumed FILE's model is the same and its rows
        # are the new list's first ones, so --resume then reads the old rows against a prefix of
        # the paths; a new FILE's old rows go first, so they are never paired with the new model
        # or paths (FILE.partial/ still has every row).
        if not resumed and os.path.isfile(out):
            os.unlink(out)
        atomic_write(out + ".json", write_model)
        atomic_write(out + ".paths.txt", write_paths)
        atomic_write(out, write_npy)
    else:
        rows = torch.empty(len(paths), width)
        _fill_rows(rows, out, width, model_id, paths, file_rows)
        metadata = {"format": "densetriton-features", "paths": json.dumps(paths), "model": model, "model_id": model_id}

        def write_safetensors(tmp):
            try:
                save_file({"features": rows}, tmp, metadata=metadata)
            except SafetensorError as e:  # writing a file only fails by I/O: a full disk, a quota
                code = re.search(r"os error (\d+)", str(e))
                raise (OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(str(e))) from None

        atomic_write(out, write_safetensors)


class _NpyRows:
    """A float32 [n, width] .npy file written row by row with plain writes at each row's offset.
    Its space is allocated first where the filesystem can, and a memory map is never used: on a
    full disk a write through one is a SIGBUS that kills the process; here it is an OSError."""

    def __init__(self, path: str, n: int, width: int):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (n, width)},
        )
        self.start, self.row_bytes = len(header.getvalue()), 4 * width
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                if hasattr(os, "posix_fallocate"):  # not on macOS: the writes then find a full disk
                    os.posix_fallocate(self.fd, 0, self.start + n * self.row_bytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise  # no space: say so before any row is copied
            self._write(header.getvalue(), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def _write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def __setitem__(self, rows, values) -> None:
        """rows: a slice, or a list of row indices, values one row per index."""
        values = np.ascontiguousarray(values.numpy() if isinstance(values, torch.Tensor) else values, dtype="<f4")
        if isinstance(rows, slice):
            self._write(values.tobytes(), self.start + rows.start * self.row_bytes)
            return
        i = 0
        while i < len(rows):  # one write per run of consecutive rows
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            self._write(values[i:j].tobytes(), self.start + rows[i] * self.row_bytes)
            i = j

    def __enter__(self) -> _NpyRows:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _other_model(where: str, found, model_id: str) -> ValueError:
    if not found:
        return ValueError(
            f"{where} names no model (an earlier densetriton wrote it), so its rows cannot be checked "
            f"against this run's: use another --out"
        )
    return ValueError(
        f"{where} holds features of another model (model {found}), not of this run's ({model_id}: the "
        f"weights and preprocessing decide it): resume with the model that wrote it, or another --out"
    )


def _feature_file_paths(out: str, width: int, model_id: str) -> list[str]:
    """The paths of an earlier run's FILE (.npy with its .paths.txt, or .safetensors), to resume
    from; FILE must name this run's model (a .npy in FILE.npy.json). Its rows are not read."""
    from safetensors import SafetensorError, safe_open

    npy = out.lower().endswith(".npy")
    try:
        if npy:
            if not os.path.isfile(out + ".paths.txt"):
                raise ValueError(f"no {out}.paths.txt beside it")
        else:
            with safe_open(out, framework="pt") as f:
                metadata = f.metadata() or {}
            if metadata.get("format") != "densetriton-features":
                raise ValueError("its metadata does not say format densetriton-features")
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{out} is not a densetriton features file ({e}); cannot resume from it") from None
    if npy:
        try:
            with open(out + ".json", encoding="utf-8") as f:
                found = json.load(f).get("model_id")
        except FileNotFoundError:
            found = None  # written by densetriton before FILE.npy.json
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{out}.json should name the model of {out}, and cannot be read ({e}); cannot resume from it"
            ) from None
    else:
        found = metadata.get("model_id")
    if found != model_id:  # checked before any row is read: another model's rows are never mixed in
        raise _other_model(out, found, model_id)
    try:
        if npy:
            shape = np.load(out, mmap_mode="r", allow_pickle=False).shape  # the header, not the rows
            # One path per "\n" exactly (as written): splitlines() would also break a path at U+2028,
            # a form feed or a lone "\r", pairing later rows with the wrong paths.
            with open(out + ".paths.txt", encoding="utf-8", newline="") as f:
                paths = f.read().split("\n")
            if paths[-1] == "":
                paths.pop()  # the last path's own "\n"
        else:
            with safe_open(out, framework="pt") as f:
                shape, paths = tuple(f.get_slice("features").get_shape()), json.loads(f.metadata()["paths"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"{out} is not a densetriton features file ({e}); cannot resume from it") from None
    if not isinstance(paths, list) or len(shape) != 2 or shape[0] > len(paths):
        raise ValueError(f"{out} holds {tuple(shape)} features for {len(paths)} paths; cannot resume from it")
    paths = paths[: shape[0]]  # a run stopped between writing FILE.paths.txt and FILE
    if shape[1] != width:
        raise ValueError(
            f"{out} holds {shape[1]} features per image, this model gives {width}: "
            f"resume with the model that wrote it, or another --out"
        )
    return paths


# -- FILE.partial/: the rows so far -----------------------------------------------------------


_REPLACES_FILE = "replaces-FILE"  # in FILE.partial/: written by a run without --resume


def _progress_dir(out: str) -> Path:
    """Where a run keeps the rows it has computed, chunk by chunk, until FILE is written."""
    return Path(out + ".partial")


def _progress_paths(out: str, width: int, model_id: str) -> list[str]:
    """The paths of every row FILE.partial/ holds, chunk after chunk."""
    return [p for _, paths in _progress_chunks(out, width, model_id) for p in paths]


def _progress_chunks(out: str, width: int, model_id: str) -> list[tuple[Path, list[str]]]:
    """Every chunk an interrupted run (any rank) left behind, with the paths of its rows; a chunk
    cut short is ignored, one of another model refused. Only headers are read."""
    from safetensors import SafetensorError, safe_open

    chunks = []
    folder = _progress_dir(out)
    for chunk in sorted(folder.glob("chunk-*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(chunk), framework="pt") as f:
                metadata = f.metadata()
                shape, paths = tuple(f.get_slice("features").get_shape()), json.loads(metadata["paths"])
                found = metadata.get("model_id")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            continue  # written atomically, so only a foreign file can be unreadable
        if found != model_id:  # another model's rows: never mixed in, nor deleted unasked
            raise _other_model(str(folder), found, model_id)
        if isinstance(paths, list) and shape == (len(paths), width):
            chunks.append((chunk, paths))
    return chunks


class _ChunkWriter(Sink):
    """Keeps one rank's new rows on disk every `every` seconds (and at the end), so that an
    interrupted run loses at most that much work: `embed --resume` reads the chunks back."""

    def __init__(self, out: str, rank: int, model_id: str, every: float = 30.0):
        self.folder, self.rank, self.model_id, self.every = _progress_dir(out), rank, model_id, every
        self.pending: list[tuple[int, str, torch.Tensor]] = []
        self.written = 0
        self.last = time.monotonic()

    def add(self, rows) -> None:
        self.pending.extend(rows)
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        from .atomic import atomic_write

        self.last = time.monotonic()
        if not self.pending:
            return
        features = torch.stack([r[2] for r in self.pending]).float().contiguous()
        paths = [r[1] for r in self.pending]
        # Rank, then a time stamp: chunks of a resumed run never overwrite an earlier run's.
        name = f"chunk-r{self.rank:04d}-{time.time_ns():020d}-{self.written:08d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"paths": json.dumps(paths), "model_id": self.model_id}
        atomic_write(self.folder / name, lambda tmp: save_file({"features": features}, tmp, metadata=metadata))
        self.written += len(self.pending)
        self.pending = []

    def finish(self) -> None:
        self.flush()

    def stopped(self) -> None:
        try:
            self.flush()  # an error or Ctrl-C keeps what was computed, for --resume
        except Exception:  # noqa: BLE001 -- the first error is the one to report
            pass
        if self.written:
            print(
                f"densetriton: {self.written} images' features are kept in {self.folder}/: run the same command "
                f"with --resume to go on",
                file=sys.stderr,
            )


def _not_written(out: str, error: OSError, rows: int, width: int) -> OSError:
    """A failure to write FILE (a full disk, a quota) as one line: the rows are safe, and how to go on."""
    reason = error.strerror or str(error)
    size = max(rows * width * 4 / 1e6, 0.1)
    failed = OSError(
        f"cannot write {out} ({reason}); its {rows} rows are safe in {_progress_dir(out)}/: free space "
        f"({Path(out).name} needs about {size:.1f} MB) and run the same command with --resume"
    )
    failed.errno = error.errno
    return failed


# -- the command ------------------------------------------------------------------------------


def _sidecars(out: str) -> list[str]:
    """The files written with FILE: a .npy's paths and model beside it."""
    return [out + ".paths.txt", out + ".json"] if out.lower().endswith(".npy") else []


def _check_progress_dir(out: str) -> None:
    folder = _progress_dir(out)
    if os.path.lexists(folder) and not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is not a folder; embed keeps its rows there until {out} is written")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder {folder} cannot be written")


def embed_command(args) -> int:
    out = args.out
    if not out.lower().endswith(EMBED_FORMATS):
        raise ValueError(f"--out must end in .npy or .safetensors, got {out!r}")
    return run_image_command(args, Features(out))


class Features(Output):
    """embed's output: FILE, written once by rank 0 from the rows every rank keeps in FILE.partial/
    (and, with --resume, FILE's own rows first)."""

    command = "embed"

    def __init__(self, out: str):
        self.path = out

    def written_with(self, dist: Dist) -> list[str]:
        return _sidecars(self.path)

    def replaced(self) -> list[str]:
        return [self.path, *_sidecars(self.path)]

    def check(self, dist: Dist) -> None:
        super().check(dist)
        _check_progress_dir(self.path)

    def start(self, engine, args, files: list[str]) -> None:
        if not self.path.lower().endswith(".npy") and len(json.dumps(files)) > _SAFETENSORS_PATHS_LIMIT:
            # safetensors keeps metadata in a header of at most 100 MB: say so now, not after the run.
            raise ValueError(f"{len(files):,} paths do not fit in a safetensors header (100 MB); use --out FILE.npy")
        self.width, self.model_id, self.spec = engine.spec.num_features, model_id(engine, head=False), engine.spec
        self.order = {path_key(p): i for i, p in enumerate(files)}
        # A run without --resume replaces FILE, and says so in FILE.partial/: resuming it after an
        # interruption goes on replacing FILE (its rows are not kept, nor its model checked).
        self.replacing = not args.resume or (_progress_dir(self.path) / _REPLACES_FILE).is_file()
        self.file_paths, self.old_paths, self.recovered = [], [], 0

    def model_call(self, engine):
        return engine.features

    def _unseen_in_input_order(self, paths: list[str], seen: set[str]) -> list[int]:
        """Indices of the paths not in `seen` (each once; `seen` takes them), in input order:
        chunks are written per rank, and may repeat rows FILE already holds."""
        new = [j for j, p in enumerate(paths) if path_key(p) not in seen and not seen.add(path_key(p))]
        return sorted(new, key=lambda j: self.order.get(path_key(paths[j]), len(self.order)))

    def resume(self, dist: Dist) -> set[str]:
        """FILE's rows, then the chunks an interrupted run left behind (a run stopped after writing
        FILE but before clearing FILE.partial/ leaves rows in both). Only their paths are read now;
        rank 0 copies the rows into the new FILE at the end."""
        if os.path.isfile(self.path) and not self.replacing:
            self.file_paths = _feature_file_paths(self.path, self.width, self.model_id)
        partial_paths = _progress_paths(self.path, self.width, self.model_id)
        fresh = self._unseen_in_input_order(partial_paths, {path_key(p) for p in self.file_paths})
        self.recovered = len(fresh)
        self.old_paths = self.file_paths + [partial_paths[j] for j in fresh]
        return {path_key(p) for p in self.old_paths}

    def fresh(self, dist: Dist) -> None:
        if dist.rank == 0:
            folder = _progress_dir(self.path)
            shutil.rmtree(folder, ignore_errors=True)  # an earlier run's, not to be mixed in
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _REPLACES_FILE).write_text(f"this run replaces {Path(self.path).name}\n", encoding="utf-8")

    def set_aside_rules(self) -> list:
        if not self.path.lower().endswith(".npy"):
            return []
        return [  # the .paths.txt sidecar: UTF-8, one path per line
            (lambda p: "\n" in p or "\r" in p, "its path contains a line break (use --out FILE.safetensors)"),
            (not_utf8, "its name is not valid UTF-8 (use --out FILE.safetensors)"),
        ]

    def resuming(self, already: int, total: int) -> str:
        return f"resuming: {already} of {total} images already embedded"

    def open(self, dist: Dist, resume: bool) -> Sink:
        return _ChunkWriter(self.path, dist.rank, self.model_id)

    def merge(self, dist: Dist, files: list[str], done: int, resume: bool) -> None:
        """FILE: the old rows as they were, then this run's in input order (chunks from every rank);
        then FILE.partial/ goes. With nothing new FILE stays (a resumed run's leftover rows were in it)."""
        from .spec import describe_spec

        if done or self.recovered:
            new_paths = _progress_paths(self.path, self.width, self.model_id)
            new_rows = self._unseen_in_input_order(new_paths, {path_key(p) for p in self.old_paths})
            paths = self.old_paths + [new_paths[j] for j in new_rows]
            try:
                _write_features(
                    self.path,
                    self.width,
                    describe_spec(self.spec),
                    self.model_id,
                    paths,
                    file_rows=len(self.file_paths),
                    resumed=not self.replacing,
                )
            except OSError as e:
                raise _not_written(self.path, e, len(paths), self.width) from None
        shutil.rmtree(_progress_dir(self.path), ignore_errors=True)

    def summarise(self, done: int, skipped: list, elapsed: float, already: int) -> None:
        out = self.path
        written = out + (f", {out}.paths.txt and {out}.json" if out.lower().endswith(".npy") else "")
        print_summary("embedded", done, skipped, elapsed, already=already, out=written if done or already else None)
        if not done and not already:
            print(f"nothing written to {out}: no image could be read", file=sys.stderr)
