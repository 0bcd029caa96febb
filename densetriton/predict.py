"""`densetriton predict`: classify images and folders, top-k labels and probabilities to the
screen, a CSV or a JSON-lines file.

The run itself (inputs, lock, resume, torchrun, streaming, summary) is image_run's; this module
supplies what predict writes, `Predictions`. Rows are appended to the output file batch by batch,
so `--resume` can pick up an interrupted run; each row names the model that wrote it
(stream.model_id), and --resume drops a row cut short. Under torchrun each rank writes
`<out>.part<r>`, and rank 0 merges the parts into --out in input order and deletes them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from pathlib import Path

import torch

from .image_run import Output, Sink, run_image_command
from .images import format_prob, topk
from .outputs import part_name
from .spec import NO_CLASSIFIER
from .stream import (
    Dist,
    add_common_arguments,
    inputs_help,
    model_id,
    not_utf8,
    outcome_help,
    path_key,
    positive_int,
    print_summary,
    shown,
)

PREDICT_FORMATS = (".csv", ".jsonl")
_MODEL_ID = re.compile("[0-9a-f]{12}")  # stream.model_id


# -- the command line ---------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the `predict` subcommand to densetriton's command line."""
    p = subparsers.add_parser(
        "predict",
        help="classify images and folders: top-k labels and probabilities, to the screen, CSV or JSON lines",
        description="Classify images with a DenseNet: for each image, its top-k classes and their probabilities\n"
        "(softmax; --multi-label: a sigmoid per class). Class names come from the weights file (ImageNet's\n"
        "for pretrained models), else are class indices.",
        epilog=inputs_help()
        + """
Output: without --out, a table on stdout. With --out FILE.csv: columns path, label_1, prob_1, ...,
label_k, prob_k, model. With --out FILE.jsonl: one {"path": ..., "topk": [{"label": ..., "prob": ...},
...], "model": ...} per line. Probabilities are written as the shortest decimals that read back as
the same float32; "model" is 12 hex digits naming what decided the row (the weights, class names,
preprocessing, softmax or sigmoid), so that --resume refuses to mix another model's rows in.
Rows are appended batch by batch as they are computed; without --resume an existing FILE is replaced.
--resume keeps FILE's whole rows; a row cut short or garbled (a run stopped while writing it) is
dropped, with a warning, and its image classified again.

Several GPUs or nodes: run under torchrun, e.g.
  torchrun --nproc-per-node 4 -m densetriton predict photos/ --model densenet121 --out results.csv
Each rank classifies every world_size-th file and writes FILE.part<rank>; rank 0 merges the parts
into FILE in input order and deletes them. --resume, under torchrun or in one process, keeps the
rows of the parts an interrupted run left; a run without --resume deletes them.

Examples:
  densetriton predict cat.jpg --model densenet121
  densetriton predict photos/ --model densenet201 --topk 3 --out results.csv
  densetriton predict xrays/ --weights chexnet.safetensors --multi-label --topk 14 --out findings.jsonl --resume
"""
        + outcome_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument(
        "--topk",
        type=positive_int,
        default=5,
        metavar="K",
        help="classes reported per image (default 5; at most the number of classes)",
    )
    g.add_argument("--out", metavar="FILE", help="write results to FILE.csv or FILE.jsonl instead of the screen")
    g.add_argument(
        "--multi-label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="independent sigmoid probability per class instead of a softmax (multi-label models such as "
        "chest X-ray classifiers), calibrated to the file's operating points when it records them; default: what "
        "the weights file records (convert --multi-label), else softmax",
    )
    g.add_argument(
        "--resume", action="store_true", help="keep FILE's rows and classify only the images not already in it"
    )
    p.set_defaults(func=predict_command)


# -- output files ------------------------------------------------------------------------------


def _part_path(out: str, rank: int) -> str:
    return part_name(out, rank)


def _stale_parts(out: str, world: int) -> list[Path]:
    """Part files numbered `world` and up: an earlier run's with more ranks than this one (world 0:
    every part, for a run of one process)."""
    out_path = Path(out)
    parent = out_path.parent
    prefix = out_path.name + ".part"
    stale = []
    if parent.is_dir():
        for f in parent.iterdir():
            suffix = f.name[len(prefix) :]
            if f.name.startswith(prefix) and suffix.isdigit() and int(suffix) >= world:
                stale.append(f)
    return sorted(stale)


class _Records:
    """The rows of a CSV or JSON-lines prediction file, keyed by path; each names the model that
    wrote it (model_id)."""

    def __init__(self, fmt: str, k: int, model: str):
        self.fmt = fmt
        self.k = k
        self.model = model

    def header(self) -> list[str]:
        return ["path"] + [c for i in range(1, self.k + 1) for c in (f"label_{i}", f"prob_{i}")] + ["model"]

    def header_line(self) -> str:
        return self._csv_line(self.header()) if self.fmt == ".csv" else ""

    @staticmethod
    def _csv_line(row) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def line(self, path: str, top: list[tuple[str, float]]) -> str:
        if self.fmt == ".csv":
            return self._csv_line([path] + [v for name, p in top for v in (name, format_prob(p))] + [self.model])
        ranks = ", ".join(f'{{"label": {json.dumps(name)}, "prob": {format_prob(p)}}}' for name, p in top)
        return f'{{"path": {json.dumps(path)}, "topk": [{ranks}], "model": "{self.model}"}}\n'

    def _check_model(self, path: str, model) -> None:
        if model != self.model:
            raise ValueError(
                f"{path} holds rows of another model (model {model}), not of this run's ({self.model}: the "
                f"weights, class names, preprocessing and --multi-label decide it): resume with the model that "
                f"wrote it, or another --out"
                if model
                else f"{path} names no model in its rows (an earlier densetriton wrote it), so they cannot "
                f"be checked against this run's: use another --out"
            )

    def _csv_row_whole(self, row: list[str]) -> bool:
        """A row as this run writes them: its fields for --topk, parseable probabilities, a model id."""
        if len(row) != 2 * self.k + 2 or not _MODEL_ID.fullmatch(row[-1]) or "\0" in row[0]:
            return False  # no path holds a NUL: bytes that two writers (or a power cut) left
        try:
            [float(row[2 + 2 * i]) for i in range(self.k)]
        except ValueError:
            return False
        return True

    @staticmethod
    def _json_record(line: str):
        """(path, ranks, model) of a densetriton JSON line, None where it is cut short or garbled."""
        try:
            record = json.loads(line)
            path, ranks, model = record["path"], record["topk"], record.get("model")
            whole = (
                isinstance(path, str)
                and "\0" not in path
                and isinstance(ranks, list)
                and all(
                    isinstance(r["label"], str)
                    and isinstance(r["prob"], (int, float))
                    and not isinstance(r["prob"], bool)
                    for r in ranks
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return (path, ranks, model) if whole else None

    def _read_csv(self, path: str, text: str) -> tuple[list[tuple[str, str]], list[int]]:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return [], []
        if header != self.header():
            self._refuse_header(path, header, next(reader, None))
        records, torn = [], []
        for row in reader:
            if not row:
                continue
            if self._csv_row_whole(row):
                self._check_model(path, row[-1])
                records.append((row[0], self._csv_line(row)))
            else:
                torn.append(reader.line_num)
        return records, torn

    def _refuse_header(self, path: str, header: list[str], first) -> None:
        if header[:1] == ["path"] and header[-1:] != ["model"]:
            self._check_model(path, None)
        if header[:1] == ["path"] and first and _MODEL_ID.fullmatch(first[-1]):
            self._check_model(path, first[-1])  # another model first: its class count may differ
        width = (len(header) - 2) // 2
        raise ValueError(
            f"{path} has {width} ranks per row (columns {','.join(header[:3])},...), not --topk {self.k}: "
            f"use the same --topk to resume, or another --out"
            if header[:1] == ["path"]
            else f"{path} does not start with a densetriton CSV header; cannot resume from it"
        )

    def _read_jsonl(self, path: str, text: str) -> tuple[list[tuple[str, str]], list[int]]:
        records, torn = [], []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and friends are no line break here
            if not line.strip():
                continue
            record = self._json_record(line)
            if record is None:
                if not line.startswith('{"path": '):  # not a line this command writes: not its file
                    raise ValueError(f"{path}: line {n} is not a densetriton JSON record; cannot resume from it")
                torn.append(n)
                continue
            rec_path, ranks, model = record
            self._check_model(path, model)
            if len(ranks) != self.k:
                raise ValueError(
                    f"{path} has {len(ranks)} ranks per record, not --topk {self.k}: use the same --topk to resume, or another --out"
                )
            records.append((rec_path, line + "\n"))
        return records, torn

    def read(self, path: str) -> tuple[list[tuple[str, str]], int, list[int]]:
        """Complete records [(path, line)] of an existing file, the byte length of its complete lines
        (an unfinished last line, left by an interrupted run, is not counted), and the numbers of the
        lines that are cut short or garbled (their images are not done)."""
        data = Path(path).read_bytes()
        end = data.rfind(b"\n") + 1
        try:
            text = data[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a UTF-8 {self.fmt} results file; cannot resume from it") from None
        records, torn = self._read_csv(path, text) if self.fmt == ".csv" else self._read_jsonl(path, text)
        return records, end, torn


def _warn_torn(path: str, torn: list[int]) -> None:
    lines = ", ".join(map(str, torn[:5])) + (f" and {len(torn) - 5} more" if len(torn) > 5 else "")
    print(
        f"densetriton: warning: {path}: line{'s' if len(torn) > 1 else ''} {lines} cut short or garbled (a run "
        f"stopped while writing {'them' if len(torn) > 1 else 'it'}): dropped, and their images classified again",
        file=sys.stderr,
    )


def _open_for_append(path: str, records: _Records, resume: bool):
    """Open the results file for appending: on --resume after its last whole row (rows cut short
    are dropped), else fresh."""
    from .atomic import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if resume and os.path.isfile(path):
        kept, end, torn = records.read(path)
        if torn:  # rewritten without them, whole rows only
            text = records.header_line() + "".join(line for _, line in kept)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))
        else:
            with open(path, "r+b") as f:  # drop an unfinished last line from an interrupted run
                f.truncate(end)
        f = open(path, "a", encoding="utf-8", newline="")
        if end == 0:
            f.write(records.header_line())
        return f
    f = open(path, "w", encoding="utf-8", newline="")
    f.write(records.header_line())
    f.flush()
    return f


def _print_table(rows, write) -> None:
    for _, path, top in rows:
        lines = [shown(path)]
        for rank, (name, p) in enumerate(top, 1):
            lines.append(f"  {rank:>2}. {100 * p:7.3f}%  {name}")
        write("\n".join(lines))


# -- the command ------------------------------------------------------------------------------


def predict_command(args) -> int:
    out = args.out
    fmt = None
    if out is not None:
        fmt = os.path.splitext(out)[1].lower()
        if fmt not in PREDICT_FORMATS:
            raise ValueError(f"--out must end in .csv or .jsonl, got {out!r}")
    elif args.resume:
        raise ValueError("--resume needs --out FILE (the results file to resume)")
    return run_image_command(args, Predictions(out, fmt))


class Predictions(Output):
    """predict's output: top-k rows appended to --out (each rank its part under torchrun, merged by
    rank 0), or a table on the screen."""

    command = "predict"
    appended = True
    screen_under_torchrun = (
        "under torchrun, give --out FILE.csv or FILE.jsonl: each rank writes a part and rank 0 merges them"
    )

    def __init__(self, out: str | None, fmt: str | None):
        self.path, self.fmt = out, fmt
        self.records: _Records | None = None

    def written_with(self, dist: Dist) -> list[str]:
        return [_part_path(self.path, r) for r in range(dist.world)] if dist.active else []

    def start(self, engine, args, files: list[str]) -> None:
        if not engine.spec.num_classes:
            raise ValueError(f"{args.weights or args.model}: {NO_CLASSIFIER}")
        if args.multi_label is None:
            args.multi_label = engine.multi_label
        self.engine, self.multi_label, self.k = engine, args.multi_label, min(args.topk, engine.spec.num_classes)
        self.files = files
        if self.fmt:
            self.records = _Records(self.fmt, self.k, model_id(engine, head=True, multi_label=self.multi_label))

    def model_call(self, engine):
        return engine

    def labelled(self, rows) -> list:
        """[(index, path, logits)] -> [(index, path, [(class name, probability)] * k)]."""
        tops = topk(
            torch.stack([r[2] for r in rows]),
            self.k,
            self.engine.class_names,
            multi_label=self.multi_label,
            operating_points=self.engine.operating_points if self.multi_label else None,
        )
        return [(i, p, t) for (i, p, _), t in zip(rows, tops)]

    def resume(self, dist: Dist) -> set[str]:
        if not dist.active and _stale_parts(self.path, 0):
            # Parts a torchrun run left unmerged, resumed by one process: merged into --out first.
            _merge_predictions(self.path, self.records, self.files, 0, keep_old=True)
        return _resume_from(dist, self.path, self.records)

    def fresh(self, dist: Dist) -> None:
        if self.path is not None and dist.rank == 0:  # --out is replaced, and with it the parts an earlier run left
            for stale in _stale_parts(self.path, dist.world if dist.active else 0):
                stale.unlink()

    def set_aside_rules(self) -> list:
        # A UTF-8 text file: a name that is not UTF-8 cannot be written there.
        return [(not_utf8, "its name is not valid UTF-8 (use --out FILE.jsonl)")] if self.fmt == ".csv" else []

    def resuming(self, already: int, total: int) -> str:
        return f"resuming: {already} of {total} images already in {self.path}"

    def open(self, dist: Dist, resume: bool) -> Sink:
        if self.path is None:
            return _Table(self)
        target = _part_path(self.path, dist.rank) if dist.active else self.path
        return _RowFile(self, target, _open_for_append(target, self.records, resume))

    def merge(self, dist: Dist, files: list[str], done: int, resume: bool) -> None:
        if dist.active:
            _merge_predictions(self.path, self.records, files, dist.world, keep_old=resume)

    def summarise(self, done: int, skipped: list, elapsed: float, already: int) -> None:
        print_summary("classified", done, skipped, elapsed, already=already, out=self.path)


class _RowFile(Sink):
    """Rows appended to the results file (or this rank's part) batch by batch, flushed as they come."""

    def __init__(self, predictions: Predictions, target: str, file):
        self.predictions, self.target, self.file, self.written = predictions, target, file, 0

    def add(self, rows) -> None:
        line = self.predictions.records.line
        self.file.write("".join(line(p, t) for _, p, t in self.predictions.labelled(rows)))
        self.file.flush()
        self.written += len(rows)

    def finish(self) -> None:
        os.fsync(self.file.fileno())  # a finished run's rows survive a power cut

    def stopped(self) -> None:
        if self.written:
            print(
                f"densetriton: {self.written} images' results are in {self.target}: run the same command with "
                f"--resume to go on",
                file=sys.stderr,
            )

    def close(self) -> None:
        self.file.close()


class _Table(Sink):
    """Without --out: a table per image on the screen, above the progress bar."""

    def __init__(self, predictions: Predictions):
        self.predictions = predictions

    def add(self, rows) -> None:
        from tqdm.auto import tqdm

        _print_table(self.predictions.labelled(rows), lambda s: tqdm.write(s, file=sys.stdout))


def _resume_from(dist: Dist, out: str, records: _Records) -> set[str]:
    """The keys of the images --resume skips: the rows of --out, and under torchrun those of any
    part left behind (a run stopped before rank 0 merged them)."""
    sources = [out]
    if dist.active:
        sources += [_part_path(out, r) for r in range(dist.world)] + [str(p) for p in _stale_parts(out, dist.world)]
    done_keys: set[str] = set()
    for source in sources:
        if os.path.isfile(source):
            kept, _, torn = records.read(source)
            if torn and dist.rank == 0:
                _warn_torn(source, torn)
            done_keys.update(path_key(p) for p, _ in kept)
    return done_keys


def _merge_predictions(out: str, records: _Records, files: list[str], world: int, *, keep_old: bool) -> None:
    """Rank 0: --out's old rows (with --resume), then the parts' rows in input order; delete the parts."""
    from .atomic import atomic_write

    order = {path_key(p): i for i, p in enumerate(files)}
    old = records.read(out)[0] if keep_old and os.path.isfile(out) else []
    seen = {path_key(p) for p, _ in old}
    parts = [Path(_part_path(out, r)) for r in range(world)] + (_stale_parts(out, world) if keep_old else [])
    new = []
    for part in parts:
        if part.is_file():
            for p, line in records.read(str(part))[0]:  # rows cut short were classified again
                key = path_key(p)
                if key not in seen:
                    seen.add(key)
                    new.append((order.get(key, len(files)), len(new), line))
    new.sort()
    text = records.header_line() + "".join(line for _, line in old) + "".join(line for _, _, line in new)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(out, write)
    for part in parts:
        if part.is_file():
            part.unlink()
