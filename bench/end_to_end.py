"""`densetriton bench --end-to-end [DIR]`: files -> predictions in images/s.

Peers, in one process, over the same JPEG folder (DIR, or generated photos: 500x375 and 1024x768
in both orientations, quality 90, every eighth with an EXIF rotation), the same model, batch,
dtype and DataLoader workers:

* engine-only: the engine on an already preprocessed batch on the device (the ceiling);
* densetriton --decode gpu and --decode cpu: the real `densetriton predict` command, --out to a
  CSV file; its images/s is the command's own (the stream from first read to the last row
  written, without loading the model);
* torchvision: the pipeline a user would write -- a folder dataset of Pillow images, torchvision's
  Resize/CenterCrop/ToTensor/Normalize, a DataLoader with the same workers and pinned memory,
  torchvision's DenseNet (float16 channels_last on CUDA), top-5 written as CSV.

The breakdown (read, decode, preprocess, engine, write) times each stage alone, serially in the
main process over a sample of the folder (one core, one CUDA stream), for each decode path: it says
where the time goes, not what workers in parallel reach. Results: <date>-<device>-end-to-end.json
and .md under --out (bench/results/ by default).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

PHOTO_SIZES = ((500, 375), (1024, 768), (375, 500), (768, 1024))
DEFAULT_IMAGES = {"cuda": 8192, "cpu": 16}  # on CUDA enough that the workers' start is a small part


@dataclass
class E2ESettings:
    device: torch.device
    model: str  # a registry name, or a description of `spec` (tests: a tiny model)
    batch: int
    dtype: str
    workers: int
    out: Path
    folder: Path | None = None  # None: generate `images` JPEGs of `sizes`
    images: int = 8192
    sizes: tuple = PHOTO_SIZES
    seed: int = 0
    backend: str = "auto"
    spec: object = None  # DenseNetSpec; None: the registry's for `model`
    tensors: dict | None = None  # weights; None: peers.prepare_weights's (pretrained or calibrated random)
    preprocessing: dict | None = None  # None: torchvision's ImageNet preprocessing
    sample: int = 64  # images in the breakdown's sample
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("spec", "tensors", "notes", "out")}
        d.update(
            device=str(self.device),
            folder=None if self.folder is None else str(self.folder),
            sizes=[list(s) for s in self.sizes],
        )
        return d


# -- inputs -----------------------------------------------------------------------------------


def generate_jpegs(folder: Path, count: int, sizes=PHOTO_SIZES, seed: int = 0, unique: int = 256) -> list[Path]:
    """count photo-like JPEGs (smooth colour fields plus grain; quality 90) cycling through sizes;
    every eighth carries an EXIF orientation (6, 3, 8 in turn). The first `unique` are drawn, the
    rest are copies of their bytes under new names (decoding costs the same; drawing takes time)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, encoded = [], []
    for i in range(count):
        path = folder / f"photo_{i:05d}.jpg"
        if i >= unique:
            path.write_bytes(encoded[i % unique])
            paths.append(path)
            continue
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-10, 11, (h, w, 3)), 0, 255).astype(np.uint8)
        exif = Image.Exif()
        if i % 8 == 7:
            exif[0x0112] = (6, 3, 8)[(i // 8) % 3]
        Image.fromarray(pixels).save(path, "JPEG", quality=90, exif=exif.tobytes())
        encoded.append(path.read_bytes())
        paths.append(path)
    return paths


def weights_file(s: E2ESettings, workdir: Path) -> tuple[Path, dict, object, dict]:
    """(file, tensors, spec, preprocessing): one weights file every peer reads, with class names and
    the preprocessing recorded (predict reads them from the file)."""
    from densetriton.spec import get_spec
    from densetriton.weights import IMAGENET_PREPROCESSING, save_weights

    from . import peers as P

    spec = s.spec if s.spec is not None else get_spec(s.model)
    tensors = s.tensors
    if tensors is None:
        tensors = P.prepare_weights(s.model, workdir, seed=s.seed).tensors
    pre = dict(s.preprocessing or IMAGENET_PREPROCESSING)
    names = [f"class_{i}" for i in range(spec.num_classes)]
    path = save_weights(workdir / "end-to-end.safetensors", tensors, spec, class_names=names, preprocessing=pre)
    return Path(path), tensors, spec, pre


# -- the peers --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_SUMMARY = re.compile(r"classified (\d+) images? in [0-9.]+ s \(([0-9.]+) images/s\)")


def command_peer(s: E2ESettings, folder: Path, weights: Path, decode: str, workdir: Path) -> dict:
    """`densetriton predict FOLDER --decode ...` run for real; its own elapsed time (the stream)."""
    from densetriton.cli import main

    out = workdir / f"predict-{decode}.csv"
    argv = [
        "predict",
        str(folder),
        "--weights",
        str(weights),
        "--device",
        str(s.device),
        "--dtype",
        s.dtype,
        "--backend",
        s.backend,
        "--batch-size",
        str(s.batch),
        "--workers",
        str(s.workers),
        "--decode",
        decode,
        "--out",
        str(out),
        "--topk",
        "5",
    ]
    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    wall = time.perf_counter() - started
    found = _SUMMARY.search(err.getvalue())
    if rc != 0 or found is None:
        raise RuntimeError(f"predict --decode {decode} failed (exit {rc}): {err.getvalue()[-500:]}")
    done, rate = int(found.group(1)), float(found.group(2))  # the rate has more digits than the seconds
    rows = sum(1 for _ in open(out, encoding="utf-8")) - 1
    out.unlink()
    return {
        "peer": f"densetriton --decode {decode}",
        "images": done,
        "rows_written": rows,
        "elapsed_s": done / rate,
        "images_per_s": rate,
        "wall_with_load_s": round(wall, 3),
    }


class _FolderDataset(torch.utils.data.Dataset):
    """What a user writes (ImageFolder without classes): Pillow opens, converts to RGB, transforms."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), i


def torchvision_peer(s: E2ESettings, files: list, tensors: dict, spec, pre: dict, workdir: Path) -> dict:
    """The torchvision pipeline: DataLoader(workers, pinned) -> torchvision DenseNet -> top-5 CSV."""
    from torchvision import transforms

    from . import peers as P

    steps = (
        [transforms.Resize(pre["resize_size"]), transforms.CenterCrop(pre["crop_size"])] if pre.get("crop_size") else []
    )
    transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(pre["mean"], pre["std"])])
    cuda = s.device.type == "cuda"
    dtype = getattr(torch, s.dtype)
    net = P.load_weights_into(P.torchvision_model(s.model if s.spec is None else "custom", spec), tensors)
    net = net.to(s.device, dtype).eval()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        _FolderDataset(files, transform), batch_size=s.batch, num_workers=s.workers, pin_memory=cuda
    )
    out_path, done = workdir / "torchvision.csv", 0
    started = time.perf_counter()
    with torch.inference_mode(), open(out_path, "w", newline="") as f:
        writer = csv.writer(f)
        for x, idx in loader:
            x = x.to(s.device, dtype, non_blocking=cuda)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            p, k = torch.softmax(net(x).float(), 1).topk(min(5, spec.num_classes), 1)
            for i, pi, ki in zip(idx.tolist(), p.cpu().tolist(), k.cpu().tolist()):
                writer.writerow([str(files[i])] + [v for pair in zip(ki, pi) for v in pair])
            done += len(idx)
    elapsed = time.perf_counter() - started
    out_path.unlink()
    return {
        "peer": "torchvision pipeline",
        "images": done,
        "elapsed_s": elapsed,
        "images_per_s": done / elapsed,
        "model_dtype": s.dtype,
        "channels_last": cuda,
    }


def engine_peer(s: E2ESettings, engine, pre: dict, repeats: int) -> dict:
    """The engine alone on a preprocessed batch already on the device."""
    side = pre.get("crop_size") or 224
    side = side[0] if isinstance(side, (list, tuple)) else side
    x = torch.randn(s.batch, engine.spec.in_channels, side, side, generator=torch.Generator().manual_seed(s.seed))
    x = x.to(engine.device)
    for _ in range(2):
        engine(x)
    _sync(engine.device)
    started = time.perf_counter()
    for _ in range(repeats):
        engine(x)
    _sync(engine.device)
    elapsed = time.perf_counter() - started
    return {
        "peer": "engine only",
        "images": repeats * s.batch,
        "elapsed_s": elapsed,
        "images_per_s": repeats * s.batch / elapsed,
    }


# -- the breakdown ------------------------------------------------------------------------------


class _Stages:
    """Seconds per stage, each stage timed alone (synchronised on CUDA)."""

    def __init__(self, device):
        self.device, self.seconds = device, {k: 0.0 for k in ("read", "decode", "preprocess", "engine", "write")}

    @contextlib.contextmanager
    def stage(self, name):
        _sync(self.device)
        started = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name] += time.perf_counter() - started


def _stage_batch(st: _Stages, engine, paths, decode: str, transform, tensor_pre):
    """One batch through the stages; returns the engine's output."""
    from densetriton.decode import decode_jpegs, jpeg_header, orient, preprocess_decoded
    from densetriton.images import load_image

    with st.stage("read"):
        datas = [open(p, "rb").read() for p in paths]
        headers = [jpeg_header(str(p), d) for p, d in zip(paths, datas)] if decode == "gpu" else None
    if decode == "gpu":
        with st.stage("decode"):
            imgs = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], engine.device)
        with st.stage("preprocess"):
            x = tensor_pre.batch(preprocess_decoded([orient(img, h[2]) for img, h in zip(imgs, headers)], tensor_pre))
    else:
        with st.stage("decode"):
            imgs = [load_image(p) for p in paths]  # Pillow reads the file again, from the page cache
        with st.stage("preprocess"):
            x = torch.stack([transform(img) for img in imgs]).to(engine.device)
    with st.stage("engine"):
        out = engine(x)
    return out


def breakdown(s: E2ESettings, engine, files: list, decode: str, workdir: Path) -> dict:
    """ms per image of each stage over the first s.sample files, one batch at a time, serially."""
    from densetriton.decode import TensorPreprocess
    from densetriton.images import build_transform, topk

    sample = files[: s.sample]
    st = _Stages(engine.device)
    transform, tensor_pre = build_transform(engine), TensorPreprocess(engine, engine.device)
    with open(workdir / f"breakdown-{decode}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        for start in range(0, len(sample), s.batch):
            chunk = sample[start : start + s.batch]
            out = _stage_batch(st, engine, chunk, decode, transform, tensor_pre)
            with st.stage("write"):
                for p, top in zip(chunk, topk(out, 5, engine.class_names)):
                    writer.writerow([str(p)] + [v for pair in top for v in pair])
    n = max(len(sample), 1)
    return {"decode": decode, "images": len(sample), "ms_per_image": {k: 1000 * v / n for k, v in st.seconds.items()}}


# -- the run ------------------------------------------------------------------------------------


def measure(s: E2ESettings, workdir: Path) -> dict:
    """Every peer and both breakdowns; the results document."""
    import densetriton

    folder = s.folder
    if folder is None:
        folder = workdir / "photos"
        generate_jpegs(folder, s.images, s.sizes, s.seed)
        s.notes.append(
            f"{s.images} generated JPEGs ({', '.join(f'{w}x{h}' for w, h in s.sizes)}, quality 90, "
            f"every eighth with an EXIF rotation; the first 256 drawn, the rest copies of their bytes)"
        )
    from densetriton.stream import collect_files

    files = collect_files([str(folder)])
    if not files:
        raise ValueError(f"{folder}: no image files")
    weights, tensors, spec, pre = weights_file(s, workdir)
    engine = densetriton.load(weights, device=s.device, dtype=s.dtype, backend=s.backend)
    results = [engine_peer(s, engine, pre, repeats=max(3, min(50, len(files) // s.batch)))]
    results += [command_peer(s, folder, weights, d, workdir) for d in ("gpu", "cpu")]
    results.append(torchvision_peer(s, files, tensors, spec, pre, workdir))
    stages = [breakdown(s, engine, files, d, workdir) for d in ("gpu", "cpu")]
    return {"files": len(files), "results": results, "breakdown": stages, "ratios": ratios(results)}


def ratios(results: list[dict]) -> dict:
    """The issue's target figures: --decode gpu against the engine, torchvision and --decode cpu."""
    rate = {r["peer"]: r["images_per_s"] for r in results}
    gpu = rate.get("densetriton --decode gpu")

    def over(name):
        other = rate.get(name)
        return None if not gpu or not other else gpu / other

    return {
        "gpu_decode_over_engine_only": over("engine only"),
        "gpu_decode_over_torchvision": over("torchvision pipeline"),
        "gpu_decode_over_cpu_decode": over("densetriton --decode cpu"),
    }


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"# End to end: files -> predictions, {doc['device']}",
        "",
        f"{s['model']}, batch {s['batch']}, {s['dtype']}, {s['workers']} DataLoader workers, "
        f"{doc.get('files', '?')} files; {doc['device_detail']}; torch {doc['torch']}, torchvision "
        f"{doc['torchvision']}; commit {doc['commit']}",
        "",
    ]
    lines += ["| peer | images/s | images | seconds |", "|---|---:|---:|---:|"]
    for r in doc.get("results", []):
        lines.append(f"| {r['peer']} | {r['images_per_s']:.1f} | {r['images']} | {r['elapsed_s']:.3f} |")
    lines += ["", "Target figures (densetriton --decode gpu against ...):", ""]
    for k, v in doc.get("ratios", {}).items():
        lines.append(f"- {k.replace('_', ' ')}: {'n/a' if v is None else f'{v:.2f}'}")
    lines += [
        "",
        "Breakdown, ms per image, each stage alone in the main process (one core, one stream):",
        "",
        "| decode | read | decode | preprocess | engine | write |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in doc.get("breakdown", []):
        ms = b["ms_per_image"]
        lines.append(
            f"| {b['decode']} | "
            + " | ".join(f"{ms[k]:.3f}" for k in ("read", "decode", "preprocess", "engine", "write"))
            + " |"
        )
    lines += [""] + [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


def run(s: E2ESettings) -> tuple[dict, dict[str, Path]]:
    """Measure, then write <date>-<device>-end-to-end.json and .md under s.out."""
    from densetriton.atomic import atomic_write

    from .run import RESULTS_DIR, device_detail, device_name, git_commit, output_stem, package_version, slug

    commit, dirty = git_commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    name = device_name(s.device)
    doc = {
        "schema_version": 1,
        "kind": "end-to-end",
        "device": name,
        "device_detail": device_detail(s.device),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "python": platform.python_version(),
        "commit": commit,
        "commit_dirty": dirty,
        "created": now.isoformat(timespec="seconds"),
    }
    workdir = Path(tempfile.mkdtemp(prefix="densetriton-e2e-"))
    try:
        doc.update(measure(s, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc["settings"], doc["notes"] = s.to_json(), list(s.notes)
    s.out.mkdir(parents=True, exist_ok=True)
    also = (RESULTS_DIR,) if s.device.type == "cuda" else ()
    stem = output_stem(s.out, slug(name) + "-end-to-end", now.strftime("%Y-%m-%d"), also=also)
    paths = {"json": s.out / f"{stem}.json", "md": s.out / f"{stem}.md"}
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(markdown(doc)))
    return doc, paths


def settings_from_args(args) -> E2ESettings:
    """The bench's options as the end-to-end run reads them (one model, one batch, one dtype)."""
    from densetriton.stream import default_workers

    from .run import RESULTS_DIR

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = getattr(args, "workers", None)
    return E2ESettings(
        device=device,
        model=(args.model or ["densenet121"])[0],
        batch=(args.batch_size or [256 if cuda else 4])[0],
        dtype=(args.dtype or ["float16" if cuda else "float32"])[0],
        workers=workers if workers is not None else (max(1, cpus - 1) if cuda else default_workers()),
        out=Path(args.out) if args.out else RESULTS_DIR,
        folder=Path(args.end_to_end) if args.end_to_end else None,
        images=DEFAULT_IMAGES["cuda" if cuda else "cpu"] if not args.quick else (2048 if cuda else 8),
        seed=args.seed,
        sample=(args.batch_size or [256])[0] if cuda else 8,  # one whole batch on CUDA
    )


def main_from_cli(args) -> int:
    doc, paths = run(settings_from_args(args))
    print(markdown(doc), end="")
    for p in paths.values():
        print(f"wrote {p}")
    return 0
