"""`densetriton predict`: classify images and folders, top-k labels and probabilities to the
screen, a CSV or a JSON-lines file.

Rows are appended to the output file batch by batch (stream.py feeds them), so `--resume` can
pick up an interrupted run; each row names the model that wrote it (stream.model_id). Under
torchrun each rank writes `<out>.part<r>`, and rank 0 merges the parts into --out in input order
and deletes them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from .images import format_prob, topk
from .spec import NO_CLASSIFIER
from .outputs import check_target, lock_outputs, part_name, refuse_inputs_as_outputs, remove_stale_temps
from .stream import (
    Dist, add_common_arguments, collect_files, describe_run, exit_status, inputs_help, load_engine, model_id, not_utf8,
    outcome_help, path_key, positive_int, print_summary, progress_label, set_aside, shown, stream_images,
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
        epilog=inputs_help() + """
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
into FILE in input order and deletes them.

Examples:
  densetriton predict cat.jpg --model densenet121
  densetriton predict photos/ --model densenet201 --topk 3 --out results.csv
  densetriton predict xrays/ --weights chexnet.safetensors --multi-label --topk 14 --out findings.jsonl --resume
""" + outcome_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--topk", type=positive_int, default=5, metavar="K", help="classes reported per image (default 5; at most the number of classes)")
    g.add_argument("--out", metavar="FILE", help="write results to FILE.csv or FILE.jsonl instead of the screen")
    g.add_argument("--multi-label", action=argparse.BooleanOptionalAction, default=None,
                   help="independent sigmoid probability per class instead of a softmax (multi-label models such as "
                   "chest X-ray classifiers), calibrated to the file's operating points when it records them; default: what "
                   "the weights file records (convert --multi-label), else softmax")
    g.add_argument("--resume", action="store_true", help="keep FILE's rows and classify only the images not already in it")
    p.set_defaults(func=predict_command)


# -- output files ------------------------------------------------------------------------------


def _part_path(out: str, rank: int) -> str:
    return part_name(out, rank)


def _stale_parts(out: str, world: int) -> list[Path]:
    """Part files of an earlier run with more ranks than this one."""
    out_path = Path(out)
    parent = out_path.parent
    prefix = out_path.name + ".part"
    stale = []
    if parent.is_dir():
        for f in parent.iterdir():
            suffix = f.name[len(prefix):]
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
                if model else f"{path} names no model in its rows (an earlier densetriton wrote it), so they cannot "
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
            whole = isinstance(path, str) and "\0" not in path and isinstance(ranks, list) and all(
                isinstance(r["label"], str) and isinstance(r["prob"], (int, float)) and not isinstance(r["prob"], bool)
                for r in ranks)
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
            if header[:1] == ["path"] else f"{path} does not start with a densetriton CSV header; cannot resume from it"
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
    print(f"densetriton: warning: {path}: line{'s' if len(torn) > 1 else ''} {lines} cut short or garbled (a run "
          f"stopped while writing {'them' if len(torn) > 1 else 'it'}): dropped, and their images classified again",
          file=sys.stderr)


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


def _print_table(rows, multi_label: bool, write) -> None:
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
    dist = Dist.from_env(args.device)
    try:
        if out is None:
            if dist.active:
                raise ValueError("under torchrun, give --out FILE.csv or FILE.jsonl: each rank writes a part and rank 0 "
                                 "merges them")
            return _predict(args, dist, out, fmt)
        check_target(out, [_part_path(out, dist.rank)] if dist.active else [], appended=True)
        with lock_outputs(out, dist):  # one run per output, before any work
            return _predict(args, dist, out, fmt)
    finally:
        dist.close()


def _resume_from(args, dist: Dist, out: str, records: _Records) -> set[str]:
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


def _predict(args, dist: Dist, out: str | None, fmt: str | None) -> int:
    from tqdm.auto import tqdm

    files = collect_files(args.paths)
    if not files:
        raise ValueError("no image files found in " + ", ".join(args.paths))
    if out is not None:
        outputs = [out] + ([_part_path(out, r) for r in range(dist.world)] if dist.active else [])
        refuse_inputs_as_outputs(outputs, files + ([args.weights] if args.weights else []))
        if dist.rank == 0:
            remove_stale_temps([out])
    engine = load_engine(args, dist)
    if not engine.spec.num_classes:
        raise ValueError(f"{args.weights or args.model}: {NO_CLASSIFIER}")
    if args.multi_label is None:
        args.multi_label = engine.multi_label
    k = min(args.topk, engine.spec.num_classes)
    records = _Records(fmt, k, model_id(engine, head=True, multi_label=args.multi_label)) if fmt else None
    show = dist.rank == 0

    done_keys = _resume_from(args, dist, out, records) if args.resume else set()
    if not args.resume and dist.active and dist.rank == 0:
        for stale in _stale_parts(out, dist.world):
            stale.unlink()
    indexed = list(enumerate(files))
    todo = [(i, p) for i, p in indexed if path_key(p) not in done_keys]
    already = len(files) - len(todo)
    mine = [(i, p) for i, p in todo if i % dist.world == dist.rank]
    pre_skipped = []
    if fmt == ".csv":  # a UTF-8 text file: a name that is not UTF-8 cannot be written there
        mine, pre_skipped = set_aside(mine, [(not_utf8, "its name is not valid UTF-8 (use --out FILE.jsonl)")])
    if show:
        print(describe_run(engine, args), file=sys.stderr)
        if already:
            print(f"resuming: {already} of {len(files)} images already in {out}", file=sys.stderr)
    dist.barrier()  # every rank has read the old results before any rank writes

    target = _part_path(out, dist.rank) if dist.active else out
    sink = _open_for_append(target, records, args.resume) if out is not None else None
    start = time.perf_counter()

    written = 0

    def on_batch(rows):
        nonlocal written
        tops = topk(torch.stack([r[2] for r in rows]), k, engine.class_names, multi_label=args.multi_label,
                    operating_points=engine.operating_points if args.multi_label else None)
        labelled = [(i, p, t) for (i, p, _), t in zip(rows, tops)]
        if sink is not None:
            sink.write("".join(records.line(p, t) for _, p, t in labelled))
            sink.flush()
            written += len(labelled)
        else:
            _print_table(labelled, args.multi_label, lambda s: tqdm.write(s, file=sys.stdout))

    try:
        tally = stream_images(engine, mine, args, run=engine, on_batch=on_batch, desc=progress_label("predict", dist), show=show)
        if sink is not None:
            os.fsync(sink.fileno())  # a finished run's rows survive a power cut
    except BaseException:
        if written:
            print(f"densetriton: {written} images' results are in {target}: run the same command with --resume to go on",
                  file=sys.stderr)
        raise
    finally:
        if sink is not None:
            sink.close()
    tally.skipped = pre_skipped + tally.skipped
    elapsed = time.perf_counter() - start

    tallies = dist.all_gather((tally.done, tally.skipped))  # also a barrier: every part is complete
    done = sum(d for d, _ in tallies)
    skipped = [s for _, sk in tallies for s in sk]
    if dist.active and dist.rank == 0:
        _merge_predictions(out, records, files, dist.world, keep_old=args.resume)
    dist.barrier()
    if show:
        print_summary("classified", done, skipped, elapsed, already=already, out=out)
    return exit_status(done, already)


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
