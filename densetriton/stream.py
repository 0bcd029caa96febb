"""What `densetriton predict` and `densetriton embed` share: their common arguments, the input
list, torchrun, and the stream of images through the model.

Files are streamed through a DataLoader (worker processes decode and preprocess while the model
computes; pinned memory on CUDA), a progress bar shows images/s, and each batch's rows go to the
command as they come, in input order, so that its output can grow batch by batch and `--resume`
can pick up an interrupted run.

Under torchrun (RANK and WORLD_SIZE in the environment) the work is sharded: rank r takes the
files i with i % world_size == r of the input list and runs on cuda:LOCAL_RANK (or the CPU with
the gloo backend); each command says how its ranks' rows are put together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .images import (
    ImageError,
    build_transform,
    describe_preprocessing,
    is_image_path,
    load_image,
    resolve_preprocessing,
)

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


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def default_workers() -> int:
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
stopping the run, and listed in the final summary. With --decode gpu (the default on CUDA), colour and
grayscale JPEGs are decoded and preprocessed in batches on the device instead (the same rules, the same
answers up to the resize's rounding), and every other file, or a JPEG the decoder refuses, by PIL.

Preprocessing: as the weights define it -- torchvision's for pretrained ImageNet models (resize
256, center crop 224, ImageNet mean/std), a converted file's own when it carries one (densetriton
convert --mean --std --resize-size --crop-size). An RGB model without any (CIFAR-stem, no
preprocessing in the file) gets no resize or crop, only scaling to 0..1 and normalisation with
ImageNet's mean/std, so images should already be the size it expects; a grayscale model without
any is refused, since how its images were scaled cannot be guessed.
"""


def inputs_help() -> str:
    """The epilog paragraphs predict and embed share: what PATH may be, how images are read."""
    from .images import IMAGE_SUFFIXES

    suffixes = textwrap.fill(
        "Image suffixes: " + " ".join(sorted(IMAGE_SUFFIXES)) + ".",
        width=98,
        initial_indent="  ",
        subsequent_indent="  ",
    )
    return _INPUTS_HELP.format(suffixes=suffixes)


_OUTCOME_HELP = """
One run per output: a run holds a lock on its --out (.FILE.lock beside it, naming the run's pid, host
and command) until it ends; a second run on the same output is refused at once, naming the first.
An --out that is one of the inputs (the same file under any name) is refused.

Exit status, the same for a first run and a resumed one: 0 when at least one image has its result
in the output (from this run, or kept from an earlier run by --resume), even if others were
skipped (they are listed); 1 when none has -- every image tried could not be read -- or on an
error; 2 when a file is refused before it is read (a weights file beyond densetriton's limits);
130 on Ctrl-C.
"""


def outcome_help() -> str:
    """The epilog paragraphs predict and embed share after their own: locks and the exit status."""
    return _OUTCOME_HELP


def exit_status(done: int, already: int) -> int:
    """The one rule for predict and embed, first run or resumed: 0 when some image has its result
    (`done` by this run, `already` kept from an earlier one), however many were skipped; 1 when
    no image has one, every image tried having been skipped."""
    return 0 if done + already else 1


def add_dtype_and_backend(g) -> None:
    """--dtype and --backend, as every command that builds an engine takes them."""
    g.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="compute dtype (default: float16 on CUDA, float32 on CPU)",
    )
    g.add_argument(
        "--backend",
        choices=("auto", "reference", "triton"),
        default="auto",
        help="triton (fused kernels), reference (plain PyTorch) or auto: triton on CUDA (default)",
    )


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    from .spec import TORCHVISION_MODELS, list_models

    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=list_models(),
        metavar="NAME",
        help="a registry model (see `densetriton info`). Alone: torchvision's pretrained weights, fetched and "
        "converted once, then cached (" + ", ".join(TORCHVISION_MODELS) + "). With --weights: the architecture the "
        "file must hold",
    )
    g.add_argument("--weights", metavar="FILE", help="a weights file (.safetensors, see `densetriton convert`)")
    g.add_argument(
        "--device", help="cuda, cuda:N or cpu (default: cuda when available; cuda:LOCAL_RANK under torchrun)"
    )
    add_dtype_and_backend(g)
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per batch (default 32)")
    g.add_argument(
        "--workers",
        type=nonnegative_int,
        default=default_workers(),
        metavar="W",
        help="DataLoader worker processes decoding images (default %(default)s; 0 decodes in the main process)",
    )
    g.add_argument(
        "--decode",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="gpu: workers read JPEG bytes and the model's device decodes and preprocesses them in batches "
        "(nvJPEG on CUDA; other files, and JPEGs it refuses, go through Pillow); cpu: Pillow decodes "
        "and preprocesses every image in the workers; auto (default): gpu on CUDA, cpu otherwise",
    )


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
                found.extend(
                    f for f in (os.path.join(root, n) for n in names) if os.path.isfile(f) and is_image_path(f)
                )
            for f in sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep)):
                add(f)
        elif path.endswith(("/", os.sep)) and not os.path.exists(path):
            raise ValueError(f"{path}: no such folder")  # a mistyped folder, not an unreadable image
        else:
            # A missing or non-image file is reported as skipped when it is read: one image deleted
            # from a list (IM0001 included) does not stop the rest.
            add(path)
    return files


def load_engine(args, dist: Dist):
    import densetriton

    from .spec import TORCHVISION_MODELS

    if args.model is None and args.weights is None:
        raise ValueError(
            "give --model NAME (torchvision's pretrained weights) or --weights FILE (a converted weights file)"
        )
    device = args.device
    if dist.active and torch.cuda.is_available() and device in (None, "cuda"):
        device = f"cuda:{dist.local_rank}"
    if (
        device is not None
        and torch.device(device).type == "cuda"
        and torch.device(device).index is not None
        and torch.cuda.is_available()
    ):  # without CUDA, load() says so clearly
        torch.cuda.set_device(torch.device(device))
    if args.weights is not None:
        return densetriton.load(
            args.model or args.weights, weights=args.weights, device=device, dtype=args.dtype, backend=args.backend
        )
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
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    _initialised_here: bool = False

    @classmethod
    def from_env(cls, device: str | None) -> Dist:
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
class Tally:
    done: int = 0
    skipped: list = field(default_factory=list)  # (index, path, reason)


class _Batches:
    """The DataLoader over items and how one of its batches becomes [(indices, paths, x on the
    device)] + failures: Pillow in the workers (--decode cpu), or JPEG bytes from the workers decoded
    and preprocessed on the device (--decode gpu: densetriton.decode, on a second CUDA stream)."""

    def __init__(self, engine, items, args):
        from .decode import EncodedImages, TensorPreprocess, collate_encoded, use_tensor_decoding

        self.device = engine.device
        self.pin = engine.device.type == "cuda"
        self.transform = build_transform(engine)
        self.tensor = use_tensor_decoding(getattr(args, "decode", "auto"), engine.device)
        if self.tensor:
            self.pre = TensorPreprocess(engine, engine.device)
            dataset, collate = EncodedImages(items, self.transform, resolve_preprocessing(engine)), collate_encoded
        else:
            dataset, collate = _ImageDataset(items, self.transform), _collate
        self.side = torch.cuda.Stream(engine.device) if self.tensor and self.pin else None
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=min(args.workers, len(items)),
            collate_fn=collate,
            pin_memory=self.pin,
        )

    def prepare(self, batch) -> tuple[list, list]:
        """A loader batch -> ([(indices, paths, x on the device)], failed [(index, path, reason)])."""
        if not self.tensor:
            groups, failed = batch
            return [(i, p, x.to(self.device, non_blocking=self.pin)) for i, p, x in groups], failed
        from .decode import decode_batch, group_by_shape

        jpegs, pillow, failed = batch
        with torch.cuda.stream(self.side) if self.side is not None else nullcontext():
            prepared, fallen, refused = decode_batch(jpegs, self.pre, lambda path: self.transform(load_image(path)))
            groups = group_by_shape(prepared, self.pre, pillow + fallen, self.device, non_blocking=self.pin)
        if self.side is not None:  # the engine's stream waits for the decode, and owns its tensors from here
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.side)
            for _, _, x in groups:
                x.record_stream(main)
        return groups, failed + refused


def _launch(engine, run, groups, tally: Tally) -> list:
    """Run the model on each group (asynchronously on CUDA); [(indices, paths, output on the device)]."""
    launched = []
    for indices, paths, x in groups:
        try:
            engine.spec.feature_sizes(x.shape[2], x.shape[3])
        except ValueError as e:
            tally.skipped.extend((i, p, f"too small for the model ({e})") for i, p in zip(indices, paths))
            continue
        launched.append((indices, paths, run(x)))
    return launched


def _finish(launched, count: int, tally: Tally, on_batch, bar) -> None:
    """Wait for a batch's outputs, hand its rows over in input order, and count it."""
    results = []
    for indices, paths, out in launched:
        results.extend(zip(indices, paths, out.float().cpu()))
    results.sort(key=lambda r: r[0])
    if results:
        on_batch(results)
    tally.done += len(results)
    bar.update(count)
    if tally.skipped:
        bar.set_postfix(skipped=len(tally.skipped), refresh=False)


def stream_images(engine, items, args, *, run, on_batch, desc: str, show: bool) -> Tally:
    """Decode, preprocess and run `run(x)` over items; on_batch([(index, path, row)]) in input order.

    Batch k+1 is prepared (decoded on the device, or copied from pinned memory) before batch k's
    outputs are waited for, so that preparing it overlaps the engine's work on batch k; the model
    is called again only after its previous outputs were read. The bar shows images/s."""
    from tqdm.auto import tqdm

    tally = Tally()
    if not items:
        return tally
    batches = _Batches(engine, items, args)
    bar = tqdm(
        total=len(items), unit="img", desc=desc, disable=None if show else True, dynamic_ncols=True, smoothing=0.1
    )
    pending = None
    try:
        for batch in batches.loader:
            groups, failed = batches.prepare(batch)
            finished, pending = pending, None  # cleared first: rows are never handed over twice
            if finished is not None:
                _finish(*finished, tally, on_batch, bar)
            tally.skipped.extend(failed)
            pending = (_launch(engine, run, groups, tally), sum(len(g[0]) for g in groups) + len(failed))
    except BaseException:  # Ctrl-C while the next batch is prepared: the last computed rows still go out
        finished, pending = pending, None
        if finished is not None:
            _finish(*finished, tally, on_batch, bar)
        raise
    else:
        if pending is not None:
            _finish(*pending, tally, on_batch, bar)
    finally:
        bar.close()
    return tally


def print_summary(
    verb: str, done: int, skipped: list, elapsed: float, *, already: int = 0, out: str | None = None
) -> None:
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
        print(f"  {shown(path)}: {reason}", file=sys.stderr)
    if len(skipped) > SUMMARY_LIMIT:
        print(f"  ... and {len(skipped) - SUMMARY_LIMIT} more", file=sys.stderr)
    if out is not None and (done or already):
        print(f"results: {out}", file=sys.stderr)


# -- what names the model behind a row --------------------------------------------------------


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

    return {
        "resize_size": size(pre.get("resize_size"), square_is_one=False),  # Resize((s, s)) is not Resize(s)
        "crop_size": size(pre.get("crop_size"), square_is_one=True),
        "mean": [float(v) for v in pre["mean"]],
        "std": [float(v) for v in pre["std"]],
    }


def model_id(engine, *, head: bool, multi_label: bool = False) -> str:
    """12 hex digits naming what fixes a run's rows, kept with them so that --resume never mixes
    two models' rows in one file: the weights, the spec and the preprocessing, and for predict
    (head=True) the classifier, class names and how probabilities are made (softmax, sigmoid,
    operating points). embed's rows depend on the features alone (head=False)."""
    spec = engine.spec if head else engine.spec.replace(num_classes=1)
    what = {
        "spec": json.loads(spec.to_json()),
        "preprocessing": _canonical_preprocessing(resolve_preprocessing(engine)),
    }
    if head:
        what.update(
            class_names=engine.class_names,
            multi_label=bool(multi_label),
            operating_points=engine.operating_points if multi_label else None,
        )
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode())
    for name in sorted(engine.weights.tensors):
        if not head and name.startswith("classifier."):
            continue
        t = engine.weights.tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


# -- paths ------------------------------------------------------------------------------------


def path_key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def not_utf8(path: str) -> bool:
    """A file name that is not valid UTF-8 (Python keeps its bytes as surrogates): a UTF-8 text
    file cannot hold it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def set_aside(items: list, rules: list) -> tuple[list, list]:
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


def shown(path: str) -> str:
    """A path to print: a name that is not UTF-8 shows its bytes escaped instead of failing the print."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_run(engine, args) -> str:
    from .spec import describe_spec

    source = args.weights if args.weights is not None else "torchvision's pretrained weights"
    dtype = str(engine.dtype).replace("torch.", "")
    outputs = "; a sigmoid per class (multi-label)" if getattr(args, "multi_label", False) else ""
    if outputs and engine.operating_points is not None:
        outputs += ", each class's operating point at 0.5"
    from .decode import use_tensor_decoding

    decoding = (
        f"JPEGs decoded in batches on {engine.device}, other files by Pillow"
        if use_tensor_decoding(getattr(args, "decode", "auto"), engine.device)
        else "Pillow in the workers"
    )
    return (
        f"{describe_spec(engine.spec)} ({source}) on {engine.device}, {dtype}, {engine.backend} backend; "
        f"preprocessing: {describe_preprocessing(engine)}{outputs}; decoding: {decoding}"
    )


def progress_label(verb: str, dist: Dist) -> str:
    return f"{verb} (rank 0 of {dist.world})" if dist.active else verb
