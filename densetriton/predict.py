"""`densetriton predict` and `densetriton embed`: classify images and folders, extract features.

Files are streamed through a DataLoader (worker processes decode and preprocess while the model
computes; pinned memory on CUDA), a progress bar shows images/s, and predictions are appended to
the output file batch by batch, so `--resume` can pick up an interrupted run.

Under torchrun (RANK and WORLD_SIZE in the environment) the work is sharded: rank r takes the
files i with i % world_size == r of the input list, runs on cuda:LOCAL_RANK (or the CPU with the
gloo backend), writes `<out>.part<r>`, and rank 0 merges the parts into --out in input order and
deletes them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .images import (
    ImageError, build_transform, describe_preprocessing, format_prob, is_image_path, load_image, resolve_preprocessing, topk,
)
from .spec import NO_CLASSIFIER

PREDICT_FORMATS = (".csv", ".jsonl")
EMBED_FORMATS = (".npy", ".safetensors")
SUMMARY_LIMIT = 50  # skipped files listed by name in the summary; the rest are counted


# -- the command line ---------------------------------------------------------------------------


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


_INPUTS_HELP = """\
Inputs: each PATH is an image file (always tried, whatever its name) or a folder, searched
recursively in sorted order for files with an image suffix; other files in folders are ignored.
{suffixes}
Images are read with PIL: EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images
become RGB (16-bit scaled from the full 0..65535 range); transparency is composited onto white;
DICOM files (with pydicom) get their rescale and first window (else their own range) onto 0..255,
MONOCHROME1 inverted; a grayscale (1-channel) model gets the luminance. Files that cannot be read are skipped, never
stopping the run, and listed in the final summary.

Preprocessing: as the weights define it -- torchvision's for pretrained ImageNet models (resize
256, center crop 224, ImageNet mean/std), a converted file's own when it carries one (densetriton
convert --mean --std --resize-size --crop-size). An RGB model without any (CIFAR-stem, no
preprocessing in the file) gets no resize or crop, only scaling to 0..1 and normalisation with
ImageNet's mean/std, so images should already be the size it expects; a grayscale model without
any is refused, since how its images were scaled cannot be guessed.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    from .spec import TORCHVISION_MODELS, list_models

    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", choices=list_models(), metavar="NAME",
        help="a registry model (see `densetriton info`). Alone: torchvision's pretrained weights, fetched and "
        "converted once, then cached (" + ", ".join(TORCHVISION_MODELS) + "). With --weights: the architecture the "
        "file must hold",
    )
    g.add_argument("--weights", metavar="FILE", help="a weights file (.safetensors, see `densetriton convert`)")
    g.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    g.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="triton (fused kernels), reference (plain PyTorch) or auto: triton on CUDA (default)")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="images per batch (default 32)")
    g.add_argument("--workers", type=_nonnegative_int, default=_default_workers(), metavar="W",
                   help="DataLoader worker processes decoding images (default %(default)s; 0 decodes in the main process)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")


def register(subparsers) -> None:
    """Add the `predict` and `embed` subcommands to densetriton's command line."""
    from .images import IMAGE_SUFFIXES

    suffixes = textwrap.fill(
        "Image suffixes: " + " ".join(sorted(IMAGE_SUFFIXES)) + ".", width=98, initial_indent="  ", subsequent_indent="  "
    )
    p = subparsers.add_parser(
        "predict",
        help="classify images and folders: top-k labels and probabilities, to the screen, CSV or JSON lines",
        description="Classify images with a DenseNet: for each image, its top-k classes and their probabilities\n"
        "(softmax; --multi-label: a sigmoid per class). Class names come from the weights file (ImageNet's\n"
        "for pretrained models), else are class indices.",
        epilog=_INPUTS_HELP.format(suffixes=suffixes) + """
Output: without --out, a table on stdout. With --out FILE.csv: columns path, label_1, prob_1, ...,
label_k, prob_k, model. With --out FILE.jsonl: one {"path": ..., "topk": [{"label": ..., "prob": ...},
...], "model": ...} per line. Probabilities are written as the shortest decimals that read back as
the same float32; "model" is 12 hex digits naming what decided the row (the weights, class names,
preprocessing, softmax or sigmoid), so that --resume refuses to mix another model's rows in.
Rows are appended batch by batch as they are computed; without --resume an existing FILE is replaced.

Several GPUs or nodes: run under torchrun, e.g.
  torchrun --nproc-per-node 4 -m densetriton predict photos/ --model densenet121 --out results.csv
Each rank classifies every world_size-th file and writes FILE.part<rank>; rank 0 merges the parts
into FILE in input order and deletes them.

Examples:
  densetriton predict cat.jpg --model densenet121
  densetriton predict photos/ --model densenet201 --topk 3 --out results.csv
  densetriton predict xrays/ --weights chexnet.safetensors --multi-label --topk 14 --out findings.jsonl --resume
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    g = p.add_argument_group("output")
    g.add_argument("--topk", type=_positive_int, default=5, metavar="K", help="classes reported per image (default 5; at most the number of classes)")
    g.add_argument("--out", metavar="FILE", help="write results to FILE.csv or FILE.jsonl instead of the screen")
    g.add_argument("--multi-label", action=argparse.BooleanOptionalAction, default=None,
                   help="independent sigmoid probability per class instead of a softmax (multi-label models such as "
                   "chest X-ray classifiers), calibrated to the file's operating points when it records them; default: what "
                   "the weights file records (convert --multi-label), else softmax")
    g.add_argument("--resume", action="store_true", help="keep FILE's rows and classify only the images not already in it")
    p.set_defaults(func=predict_command)

    p = subparsers.add_parser(
        "embed",
        help="extract pooled features (what the classifier sees) for images and folders, to .npy or .safetensors",
        description="Extract each image's pooled features as float32: engine.features, the global average pool\n"
        "after the final BatchNorm-ReLU, which is what the classifier sees.",
        epilog=_INPUTS_HELP.format(suffixes=suffixes) + """
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
writes FILE with the old rows first. Without --resume FILE.partial/ is cleared and FILE replaced;
--resume after such a run was interrupted goes on replacing FILE (its old rows are not kept).
Paths are separated by "\n" alone. Under torchrun each rank takes every world_size-th image and
rank 0 writes FILE.

Examples:
  densetriton embed photos/ --model densenet121 --out feats.npy
  torchrun --nproc-per-node 2 -m densetriton embed photos/ --model densenet121 --out feats.safetensors
  densetriton embed photos/ --model densenet121 --out feats.npy --resume   # after an interruption
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.npy (plus FILE.npy.paths.txt and FILE.npy.json) or FILE.safetensors")
    p.add_argument("--resume", action="store_true",
                   help="keep FILE's rows and those an interrupted run left in FILE.partial/; embed only the other images")
    p.set_defaults(func=embed_command)


# -- inputs ----------------------------------------------------------------------------------


def collect_files(paths) -> list[str]:
    """The input list: files as named, folders expanded (recursively, sorted, image files only:
    `is_image_path`).

    Each path keeps the spelling it was given (folder + relative path); duplicates (the same file
    reached twice) are kept once, at their first position.
    """
    files: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            files.append(path)

    paths = [os.fspath(p) for p in paths]
    if paths and not any(os.path.exists(p) for p in paths):  # a mistyped argument: one error before any work
        raise ValueError(f"{paths[0]}: no such file or folder")
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                # Regular files only: opening a named pipe (even "x.png") would block forever.
                found.extend(f for f in (os.path.join(root, n) for n in names) if os.path.isfile(f) and is_image_path(f))
            for f in sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep)):
                add(f)
        elif path.endswith(("/", os.sep)) and not os.path.exists(path):
            raise ValueError(f"{path}: no such folder")  # a mistyped folder, not an unreadable image
        else:
            # A missing or non-image file is reported as skipped when it is read: one image deleted
            # from a list (IM0001 included) does not stop the rest.
            add(path)
    return files


def _load_engine(args, dist: "_Dist"):
    import densetriton

    from .spec import TORCHVISION_MODELS

    if args.model is None and args.weights is None:
        raise ValueError("give --model NAME (torchvision's pretrained weights) or --weights FILE (a converted weights file)")
    device = args.device
    if dist.active and torch.cuda.is_available() and device in (None, "cuda"):
        device = f"cuda:{dist.local_rank}"
    if (device is not None and torch.device(device).type == "cuda" and torch.device(device).index is not None
            and torch.cuda.is_available()):  # without CUDA, load() says so clearly
        torch.cuda.set_device(torch.device(device))
    if args.weights is not None:
        return densetriton.load(args.model or args.weights, weights=args.weights, device=device, dtype=args.dtype, backend=args.backend)
    if args.model not in TORCHVISION_MODELS:
        raise ValueError(
            f"no pretrained weights are published for {args.model}; pass --weights FILE (a converted file, "
            f"see `densetriton convert`)"
        )
    if dist.active:  # one rank fetches and converts torchvision's file into the cache, then all load it
        from .engine import pretrained_weights

        if dist.rank == 0:
            pretrained_weights(args.model)
        dist.barrier()
    return densetriton.load(args.model, device=device, dtype=args.dtype, backend=args.backend)


# -- torch.distributed ---------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    _initialised_here: bool = False

    @classmethod
    def from_env(cls, device: str | None) -> "_Dist":
        """torchrun's environment -> an initialised process group (nccl on CUDA, gloo otherwise)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if world <= 1 or "RANK" not in os.environ:
            return cls()
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        initialised_here = False
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            initialised_here = True
        return cls(rank, world, local_rank, True, initialised_here)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self._initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._initialised_here = False


def _part_path(out: str, rank: int) -> str:
    return f"{out}.part{rank}"


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


# -- streaming images through the model ----------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    """(index, path) items -> (index, path, tensor or None, reason or None); never raises."""

    def __init__(self, items: list[tuple[int, str]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        index, path = self.items[i]
        try:
            return index, path, self.transform(load_image(path)), None
        except ImageError as e:
            return index, path, None, e.reason
        except Exception as e:  # an image that breaks a transform must not stop the run
            return index, path, None, f"cannot preprocess ({type(e).__name__}: {e})"


def _collate(samples):
    """Group the batch's readable images by size (one stacked tensor per size); list the failures."""
    groups: dict[tuple, list] = {}
    failed = []
    for index, path, tensor, reason in samples:
        if tensor is None:
            failed.append((index, path, reason))
        else:
            groups.setdefault(tuple(tensor.shape), []).append((index, path, tensor))
    stacked = [
        ([i for i, _, _ in members], [p for _, p, _ in members], torch.stack([t for _, _, t in members]))
        for members in groups.values()
    ]
    return stacked, failed


@dataclass
class _Tally:
    done: int = 0
    skipped: list = field(default_factory=list)  # (index, path, reason)


def _stream(engine, items, args, *, run, on_batch, desc: str, show: bool) -> _Tally:
    """Decode, preprocess and run `run(x)` over items; on_batch([(index, path, row)]) in input order."""
    from tqdm.auto import tqdm

    tally = _Tally()
    if not items:
        return tally
    pin = engine.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        _ImageDataset(items, build_transform(engine)),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=min(args.workers, len(items)),
        collate_fn=_collate,
        pin_memory=pin,
    )
    bar = tqdm(total=len(items), unit="img", desc=desc, disable=None if show else True, dynamic_ncols=True, smoothing=0.1)
    try:
        for groups, failed in loader:
            tally.skipped.extend(failed)
            results = []
            for indices, paths, x in groups:
                try:
                    engine.spec.feature_sizes(x.shape[2], x.shape[3])
                except ValueError as e:
                    tally.skipped.extend((i, p, f"too small for the model ({e})") for i, p in zip(indices, paths))
                    continue
                out = run(x.to(engine.device, non_blocking=pin)).float().cpu()
                results.extend(zip(indices, paths, out))
            results.sort(key=lambda r: r[0])
            if results:
                on_batch(results)
            tally.done += len(results)
            bar.update(sum(len(g[0]) for g in groups) + len(failed))
            if tally.skipped:
                bar.set_postfix(skipped=len(tally.skipped), refresh=False)
    finally:
        bar.close()
    return tally


def _print_summary(verb: str, done: int, skipped: list, elapsed: float, *, already: int = 0, out: str | None = None) -> None:
    rate = f" in {elapsed:.1f} s ({done / elapsed:.1f} images/s)" if done and elapsed > 0 else ""
    line = f"{verb} {done} image{'s' if done != 1 else ''}{rate}"
    if already:
        line += f"; {already} already done (--resume)"
    if skipped:
        line += f"; skipped {len(skipped)}:"
    else:
        line += "; skipped 0"
    print(line, file=sys.stderr)
    for _, path, reason in sorted(skipped, key=lambda s: s[0])[:SUMMARY_LIMIT]:
        print(f"  {_shown(path)}: {reason}", file=sys.stderr)
    if len(skipped) > SUMMARY_LIMIT:
        print(f"  ... and {len(skipped) - SUMMARY_LIMIT} more", file=sys.stderr)
    if out is not None and (done or already):
        print(f"results: {out}", file=sys.stderr)


# -- predict: output files --------------------------------------------------------------------------


def _canonical_preprocessing(pre: dict) -> dict:
    """One spelling for each preprocessing: Resize((40,)) is Resize(40), CenterCrop((32, 32)) is
    CenterCrop(32), a mean of 0 is a mean of 0.0 -- so model_id changes only when the images do."""
    def size(value, square_is_one: bool):
        if isinstance(value, (list, tuple)):
            value = [int(v) for v in value]
            if len(value) == 1 or (square_is_one and len(value) == 2 and value[0] == value[1]):
                return value[0]
            return value
        return None if value is None else int(value)

    return {"resize_size": size(pre.get("resize_size"), square_is_one=False),  # Resize((s, s)) is not Resize(s)
            "crop_size": size(pre.get("crop_size"), square_is_one=True),
            "mean": [float(v) for v in pre["mean"]], "std": [float(v) for v in pre["std"]]}


def model_id(engine, *, head: bool, multi_label: bool = False) -> str:
    """12 hex digits naming what fixes a run's rows, kept with them so that --resume never mixes
    two models' rows in one file: the weights, the spec and the preprocessing, and for predict
    (head=True) the classifier, class names and how probabilities are made (softmax, sigmoid,
    operating points). embed's rows depend on the features alone (head=False)."""
    spec = engine.spec if head else engine.spec.replace(num_classes=1)
    what = {"spec": json.loads(spec.to_json()), "preprocessing": _canonical_preprocessing(resolve_preprocessing(engine))}
    if head:
        what.update(class_names=engine.class_names, multi_label=bool(multi_label),
                    operating_points=engine.operating_points if multi_label else None)
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode())
    for name in sorted(engine.weights.tensors):
        if not head and name.startswith("classifier."):
            continue
        t = engine.weights.tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


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

    def read(self, path: str) -> tuple[list[tuple[str, str]], int]:
        """Complete records [(path, line)] of an existing file, and the byte length they span
        (an unfinished last line, left by an interrupted run, is not counted)."""
        data = Path(path).read_bytes()
        end = data.rfind(b"\n") + 1
        try:
            text = data[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a UTF-8 {self.fmt} results file; cannot resume from it") from None
        records = []
        if self.fmt == ".csv":
            rows = list(csv.reader(io.StringIO(text, newline="")))
            if not rows:
                return [], 0
            if rows[0] != self.header():
                if rows[0][:1] == ["path"] and rows[0][-1:] != ["model"]:
                    self._check_model(path, None)
                if rows[0][:1] == ["path"] and len(rows) > 1 and rows[1]:
                    self._check_model(path, rows[1][-1])  # another model first: its class count may differ
                width = (len(rows[0]) - 2) // 2
                raise ValueError(
                    f"{path} has {width} ranks per row (columns {','.join(rows[0][:3])},...), not --topk {self.k}: "
                    f"use the same --topk to resume, or another --out"
                    if rows[0][:1] == ["path"] else f"{path} does not start with a densetriton CSV header; cannot resume from it"
                )
            for row in rows[1:]:
                if row:
                    self._check_model(path, row[-1])
                    records.append((row[0], self._csv_line(row)))
        else:
            for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and friends are no line break here
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    rec_path, ranks = record["path"], record["topk"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}: line {n} is not a densetriton JSON record; cannot resume from it") from None
                self._check_model(path, record.get("model"))
                if len(ranks) != self.k:
                    raise ValueError(
                        f"{path} has {len(ranks)} ranks per record, not --topk {self.k}: use the same --topk to resume, or another --out"
                    )
                records.append((rec_path, line + "\n"))
        return records, end


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _open_for_append(path: str, records: _Records, resume: bool):
    """Open the results file for appending: on --resume after its last complete row, else fresh."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if resume and os.path.isfile(path):
        _, end = records.read(path)
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


def _not_utf8(path: str) -> bool:
    """A file name that is not valid UTF-8 (Python keeps its bytes as surrogates): a UTF-8 text
    file cannot hold it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _set_aside(items: list, rules: list) -> tuple[list, list]:
    """(index, path) items split into those to run and those skipped up front, each with the
    reason of the first rule (predicate, reason) its path meets."""
    kept, skipped = [], []
    for i, p in items:
        reason = next((why for meets, why in rules if meets(p)), None)
        if reason is None:
            kept.append((i, p))
        else:
            skipped.append((i, p, reason))
    return kept, skipped


def _shown(path: str) -> str:
    """A path to print: a name that is not UTF-8 shows its bytes escaped instead of failing the print."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _print_table(rows, multi_label: bool, write) -> None:
    for _, path, top in rows:
        lines = [_shown(path)]
        for rank, (name, p) in enumerate(top, 1):
            lines.append(f"  {rank:>2}. {100 * p:7.3f}%  {name}")
        write("\n".join(lines))


def predict_command(args) -> int:
    out = args.out
    fmt = None
    if out is not None:
        fmt = os.path.splitext(out)[1].lower()
        if fmt not in PREDICT_FORMATS:
            raise ValueError(f"--out must end in .csv or .jsonl, got {out!r}")
    elif args.resume:
        raise ValueError("--resume needs --out FILE (the results file to resume)")
    dist = _Dist.from_env(args.device)
    try:
        return _predict(args, dist, out, fmt)
    finally:
        dist.close()


def _predict(args, dist: _Dist, out: str | None, fmt: str | None) -> int:
    from tqdm.auto import tqdm

    if dist.active and out is None:
        raise ValueError("under torchrun, give --out FILE.csv or FILE.jsonl: each rank writes a part and rank 0 merges them")
    files = collect_files(args.paths)
    if not files:
        raise ValueError("no image files found in " + ", ".join(args.paths))
    engine = _load_engine(args, dist)
    if not engine.spec.num_classes:
        raise ValueError(f"{args.weights or args.model}: {NO_CLASSIFIER}")
    if args.multi_label is None:
        args.multi_label = engine.multi_label
    k = min(args.topk, engine.spec.num_classes)
    records = _Records(fmt, k, model_id(engine, head=True, multi_label=args.multi_label)) if fmt else None
    show = dist.rank == 0

    # What --resume skips: the rows of --out, and under torchrun those of any part left behind.
    done_keys: set[str] = set()
    if args.resume:
        sources = [out] + ([_part_path(out, r) for r in range(dist.world)] + [str(p) for p in _stale_parts(out, dist.world)] if dist.active else [])
        for source in sources:
            if os.path.isfile(source):
                done_keys.update(_path_key(p) for p, _ in records.read(source)[0])
    elif dist.active and dist.rank == 0:
        for stale in _stale_parts(out, dist.world):
            stale.unlink()
    indexed = list(enumerate(files))
    todo = [(i, p) for i, p in indexed if _path_key(p) not in done_keys]
    already = len(files) - len(todo)
    mine = [(i, p) for i, p in todo if i % dist.world == dist.rank]
    pre_skipped = []
    if fmt == ".csv":  # a UTF-8 text file: a name that is not UTF-8 cannot be written there
        mine, pre_skipped = _set_aside(mine, [(_not_utf8, "its name is not valid UTF-8 (use --out FILE.jsonl)")])
    if show:
        print(_describe_run(engine, args), file=sys.stderr)
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
        tally = _stream(engine, mine, args, run=engine, on_batch=on_batch, desc=_desc("predict", dist), show=show)
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
        _print_summary("classified", done, skipped, elapsed, already=already, out=out)
    return 1 if done == 0 and skipped else 0


def _merge_predictions(out: str, records: _Records, files: list[str], world: int, *, keep_old: bool) -> None:
    """Rank 0: --out's old rows (with --resume), then the parts' rows in input order; delete the parts."""
    from .weights import atomic_write

    order = {_path_key(p): i for i, p in enumerate(files)}
    old = records.read(out)[0] if keep_old and os.path.isfile(out) else []
    seen = {_path_key(p) for p, _ in old}
    parts = [Path(_part_path(out, r)) for r in range(world)] + (_stale_parts(out, world) if keep_old else [])
    new = []
    for part in parts:
        if part.is_file():
            for p, line in records.read(str(part))[0]:
                key = _path_key(p)
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


def _describe_run(engine, args) -> str:
    from .weights import describe_spec

    source = args.weights if args.weights is not None else "torchvision's pretrained weights"
    dtype = str(engine.dtype).replace("torch.", "")
    outputs = "; a sigmoid per class (multi-label)" if getattr(args, "multi_label", False) else ""
    if outputs and engine.operating_points is not None:
        outputs += ", each class's operating point at 0.5"
    return (
        f"{describe_spec(engine.spec)} ({source}) on {engine.device}, {dtype}, {engine.backend} backend; "
        f"preprocessing: {describe_preprocessing(engine)}{outputs}"
    )


def _desc(verb: str, dist: _Dist) -> str:
    return f"{verb} (rank 0 of {dist.world})" if dist.active else verb


# -- embed ----------------------------------------------------------------------------------------


_FILE_ROWS_AT_ONCE = 1 << 16  # rows copied from the old FILE into the new one at a time


def _write_features(out: str, width: int, model: str, model_id: str, paths: list[str], *, file_rows: int,
                    resumed: bool) -> None:
    """Write FILE: row i is path i's features. The first file_rows rows are the old FILE's (a
    resumed run), every later one the first row FILE.partial/'s chunks hold for its path. Rows
    stream from FILE and one chunk at a time into the new file (a memory map for .npy), so a
    large FILE is never held in memory, let alone several copies of it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .weights import atomic_write

    position = {_path_key(p): i for i, p in enumerate(paths[file_rows:], start=file_rows)}
    block = _FILE_ROWS_AT_ONCE

    def fill(rows) -> None:
        """rows: a [len(paths), width] float32 array or tensor, written in place."""
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
            take = [(j, position.pop(_path_key(p))) for j, p in enumerate(chunk_paths) if _path_key(p) in position]
            if take:
                with safe_open(str(chunk), framework="pt") as f:
                    features = f.get_tensor("features")
                source, target = zip(*take)
                picked = features[list(source)]
                rows[list(target)] = picked.numpy() if isinstance(rows, np.ndarray) else picked
        if position:  # FILE.partial/ changed under this run: write nothing rather than rows never computed
            raise RuntimeError(f"{len(position)} rows, {next(iter(position))!r} first, vanished from "
                               f"{_progress_dir(out)}/ before {out} was written; run again with --resume")

    if out.lower().endswith(".npy"):
        def write_npy(tmp):
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(paths), width))
            fill(rows)
            rows.flush()
            del rows

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
        fill(rows)
        metadata = {"format": "densetriton-features", "paths": json.dumps(paths), "model": model, "model_id": model_id}
        atomic_write(out, lambda tmp: save_file({"features": rows}, tmp, metadata=metadata))


def _other_model(where: str, found, model_id: str) -> ValueError:
    if not found:
        return ValueError(f"{where} names no model (an earlier densetriton wrote it), so its rows cannot be checked "
                          f"against this run's: use another --out")
    return ValueError(f"{where} holds features of another model (model {found}), not of this run's ({model_id}: the "
                      f"weights and preprocessing decide it): resume with the model that wrote it, or another --out")


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
            raise ValueError(f"{out}.json should name the model of {out}, and cannot be read ({e}); "
                             f"cannot resume from it") from None
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
        raise ValueError(f"{out} holds {shape[1]} features per image, this model gives {width}: "
                         f"resume with the model that wrote it, or another --out")
    return paths


# The paths of a .safetensors features file live in its header, which safetensors caps at 100 MB.
_SAFETENSORS_PATHS_LIMIT = 90_000_000


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


class _ChunkWriter:
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

        from .weights import atomic_write

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


def embed_command(args) -> int:
    out = args.out
    if not out.lower().endswith(EMBED_FORMATS):
        raise ValueError(f"--out must end in .npy or .safetensors, got {out!r}")
    dist = _Dist.from_env(args.device)
    try:
        return _embed(args, dist, out)
    finally:
        dist.close()


def _embed(args, dist: _Dist, out: str) -> int:
    from .weights import describe_spec

    files = collect_files(args.paths)
    if not files:
        raise ValueError("no image files found in " + ", ".join(args.paths))
    engine = _load_engine(args, dist)
    show = dist.rank == 0
    width = engine.spec.num_features
    mid = model_id(engine, head=False)

    if not out.lower().endswith(".npy") and len(json.dumps(files)) > _SAFETENSORS_PATHS_LIMIT:
        # safetensors keeps metadata in a header of at most 100 MB: say so now, not after the run.
        raise ValueError(f"{len(files):,} paths do not fit in a safetensors header (100 MB); use --out FILE.npy")
    order = {_path_key(p): i for i, p in enumerate(files)}

    def unseen_in_input_order(paths: list[str], seen: set[str]) -> list[int]:
        """Indices of the paths not in `seen` (each once; `seen` takes them), in input order:
        chunks are written per rank, and may repeat rows FILE already holds."""
        new = [j for j, p in enumerate(paths) if _path_key(p) not in seen and not seen.add(_path_key(p))]
        return sorted(new, key=lambda j: order.get(_path_key(paths[j]), len(order)))

    # What --resume keeps: FILE's rows, then the chunks an interrupted run left behind (a run
    # stopped after writing FILE but before clearing FILE.partial/ leaves rows in both). Only
    # their paths are read now; rank 0 copies the rows into the new FILE at the end.
    file_paths, old_paths, recovered = [], [], 0
    # A run without --resume replaces FILE, and says so in FILE.partial/: resuming it after an
    # interruption goes on replacing FILE (its rows are not kept, nor its model checked).
    replacing = not args.resume or (_progress_dir(out) / _REPLACES_FILE).is_file()
    if args.resume:
        if os.path.isfile(out) and not replacing:
            file_paths = _feature_file_paths(out, width, mid)
        partial_paths = _progress_paths(out, width, mid)
        fresh = unseen_in_input_order(partial_paths, {_path_key(p) for p in file_paths})
        recovered = len(fresh)
        old_paths = file_paths + [partial_paths[j] for j in fresh]
    elif dist.rank == 0:
        shutil.rmtree(_progress_dir(out), ignore_errors=True)  # an earlier run's, not to be mixed in
        _progress_dir(out).mkdir(parents=True, exist_ok=True)
        (_progress_dir(out) / _REPLACES_FILE).write_text(f"this run replaces {Path(out).name}\n", encoding="utf-8")
    dist.barrier()  # every rank has read (or rank 0 has cleared) the old rows before any rank writes
    done_keys = {_path_key(p) for p in old_paths}
    todo = [(i, p) for i, p in enumerate(files) if _path_key(p) not in done_keys]
    already = len(files) - len(todo)
    items = [(i, p) for i, p in todo if i % dist.world == dist.rank]
    pre_skipped = []
    if out.lower().endswith(".npy"):  # the .paths.txt sidecar: UTF-8, one path per line
        items, pre_skipped = _set_aside(items, [
            (lambda p: "\n" in p or "\r" in p, "its path contains a line break (use --out FILE.safetensors)"),
            (_not_utf8, "its name is not valid UTF-8 (use --out FILE.safetensors)"),
        ])
    if show:
        print(_describe_run(engine, args), file=sys.stderr)
        if already:
            print(f"resuming: {already} of {len(files)} images already embedded", file=sys.stderr)

    chunks = _ChunkWriter(out, dist.rank, mid)
    start = time.perf_counter()
    try:
        tally = _stream(engine, items, args, run=engine.features, on_batch=chunks.add, desc=_desc("embed", dist), show=show)
    except BaseException:
        try:
            chunks.flush()  # an error or Ctrl-C keeps what was computed, for --resume
        except Exception:  # noqa: BLE001 -- the first error is the one to report
            pass
        if chunks.written:
            print(f"densetriton: {chunks.written} images' features are kept in {chunks.folder}/: run the same command "
                  f"with --resume to go on", file=sys.stderr)
        raise
    chunks.flush()
    tally.skipped = pre_skipped + tally.skipped
    elapsed = time.perf_counter() - start

    tallies = dist.all_gather((tally.done, tally.skipped))  # also a barrier: every rank's chunks are written
    done = sum(d for d, _ in tallies)
    skipped = [s for _, sk in tallies for s in sk]
    if dist.rank == 0 and (done or recovered):
        # The old rows as they were, then this run's in input order (chunks from every rank).
        new_paths = _progress_paths(out, width, mid)
        new_rows = unseen_in_input_order(new_paths, set(done_keys))
        _write_features(out, width, describe_spec(engine.spec), mid, old_paths + [new_paths[j] for j in new_rows],
                        file_rows=len(file_paths), resumed=not replacing)
        shutil.rmtree(_progress_dir(out), ignore_errors=True)
    elif dist.rank == 0:  # nothing new: FILE stays (a resumed run's leftover rows were in it)
        shutil.rmtree(_progress_dir(out), ignore_errors=True)
    dist.barrier()
    if show:
        written = out + (f", {out}.paths.txt and {out}.json" if out.lower().endswith(".npy") else "")
        _print_summary("embedded", done, skipped, elapsed, already=already, out=written if done or already else None)
        if not done and not already:
            print(f"nothing written to {out}: no image could be read", file=sys.stderr)
    return 1 if done == 0 and not already else 0
