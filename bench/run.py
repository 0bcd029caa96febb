"""The bench run: settings, the machine's description, and the loop over model x batch x dtype x peer.

Each record is measured by record.measure_peer; timing primitives are in timing.py.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from densetriton.engine import DTYPE_NAMES

from . import peers as P
from . import report
from . import roofline as R
from .record import RecordInterrupted, measure_peer, no_tf32, to_host

DEFAULT_MODELS = ["densenet121", "densenet201"]
DEFAULT_BATCHES = [1, 8, 64, 256]
QUICK_CPU_MODELS = ["densenet121"]
QUICK_CPU_BATCHES = [1, 2]
QUICK_CPU_IMAGE_SIZE = 224
DTYPES = DTYPE_NAMES  # "float16" -> torch.float16, ...
# bench/results/ in a checkout (an editable install); ./bench-results where the package is installed
# from a wheel (no results folder beside the module, and site-packages is no place for results).
_CHECKOUT_RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_DIR = _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.is_dir() else Path("bench-results")


# -- how much to repeat ---------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How much to repeat: timed calls fill target_s within [min_repeats, max_repeats]."""

    min_repeats: int
    max_repeats: int
    target_s: float
    warmup_s: float  # warm-up time after the accuracy sweep (at least 1 call)
    min_images: int  # images in the input pool (for accuracy), at least min_pool inputs
    min_pool: int
    max_pool: int
    roofline_repeats: int

    def pool_size(self, batch: int) -> int:
        return min(self.max_pool, max(self.min_pool, math.ceil(self.min_images / batch)))


POLICIES = {
    ("cuda", False): Policy(20, 200, 2.0, 0.5, 64, 4, 16, 10),
    ("cuda", True): Policy(5, 30, 0.3, 0.1, 16, 3, 8, 3),
    ("cpu", False): Policy(5, 50, 3.0, 0.5, 16, 3, 8, 5),
    ("cpu", True): Policy(3, 5, 0.5, 0.0, 4, 2, 3, 3),
}


# -- settings -------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    models: list[str]
    batches: list[int]
    dtypes: list[str]
    image_size: int
    peers: list[str]
    peers_named: bool
    quick: bool
    out: Path
    seed: int = 0
    repeats: int | None = None  # fixed repeat count instead of the policy's
    budget_s: float | None = None
    warm_caches: bool = False
    kinds_method: str = "graph"  # how densetriton's per-kind times are taken (layer_times.METHODS)
    chart: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def policy(self) -> Policy:
        return POLICIES[(self.device.type, self.quick)]

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("notes", "out")}
        d["device"] = str(self.device)
        d["policy"] = dataclasses.asdict(self.policy)
        return d


def resolve(args) -> Settings:
    """Settings from parsed CLI arguments, filling the defaults for the machine."""
    from densetriton.spec import get_spec

    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda given but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    cpu, quick, notes = device.type == "cpu", bool(args.quick), []

    models = list(dict.fromkeys(args.model or (QUICK_CPU_MODELS if cpu and quick else DEFAULT_MODELS)))
    batches = list(dict.fromkeys(args.batch_size or (QUICK_CPU_BATCHES if cpu and quick else DEFAULT_BATCHES)))
    image_size = args.image_size or (QUICK_CPU_IMAGE_SIZE if cpu and quick else 224)
    if args.dtype:
        dtypes = list(dict.fromkeys(args.dtype))
    else:
        dtypes = ["bfloat16" if cpu else "float16"]
        if cpu:
            notes.append("CPU: float16 is emulated there (~60x slower than float32), so the default dtype is bfloat16")
    if cpu and quick:
        notes.append(
            f"--quick on CPU: {', '.join(models)}, batch size {', '.join(map(str, batches))}, {image_size}x{image_size}, "
            f"{', '.join(dtypes)}, {POLICIES[('cpu', True)].min_repeats}-{POLICIES[('cpu', True)].max_repeats} "
            "timed repeats: a smoke run, not a measurement to quote"
        )
    for b in batches:
        if b < 1:
            raise ValueError(f"--batch-size must be positive, got {b}")
    for m in models:
        get_spec(m).feature_sizes(image_size, image_size)  # raises with the smallest size that works
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    peers = [p for p in P.PEERS if p in args.peers] if args.peers else list(P.PEERS)  # in the order
    if cpu and "densetriton" in peers:
        notes.append("CPU: the densetriton peer runs its reference backend (plain PyTorch), not the Triton kernels")
    if cpu and "torchvision-eager-fp16-cl" in peers:
        notes.append("CPU: torchvision-eager-fp16-cl runs in bfloat16 (model cast, channels_last)")
    return Settings(
        device=device,
        models=models,
        batches=batches,
        dtypes=dtypes,
        image_size=image_size,
        peers=peers,
        peers_named=bool(args.peers),
        quick=quick,
        out=Path(args.out) if args.out else RESULTS_DIR,
        seed=args.seed,
        repeats=args.repeats,
        budget_s=args.budget_s,
        warm_caches=args.warm_caches,
        notes=notes,
        kinds_method=getattr(args, "kinds_method", None) or "graph",
    )


# -- the machine ---------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_detail(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD, dirty) of the checkout densetriton runs from; (None, None) when it is not one.

    $DENSETRITON_BENCH_COMMIT (40 hex digits), when set, names the commit instead (dirty is then
    unknown: None): a GPU host handed a copy of the work tree may hold a stale .git beside it
    (the 2026-12-04 H200 run recorded the session's first commit, "with uncommitted changes").
    """
    import densetriton

    named = os.environ.get("DENSETRITON_BENCH_COMMIT", "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{40}", named):
        return named, None
    root = Path(densetriton.__file__).resolve().parent.parent

    def git(*a):
        return subprocess.run(
            ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == root:
            return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return None, None


def output_stem(out: Path, device_slug: str, today: str, also: tuple[Path, ...] = ()) -> str:
    """<date>-<device>, with -2, -3, ... when an earlier run of the day took the name, in out or in
    the also folders (bench/results/: a GPU run writing into a fresh folder must not take the name
    of a committed result)."""
    stem, n = f"{today}-{device_slug}", 1
    while any((d / f"{stem}{ext}").exists() for d in (out, *also) for ext in (".json", ".md", ".png")):
        n += 1
        stem = f"{today}-{device_slug}-{n}"
    return stem


# -- the run ---------------------------------------------------------------------------------


def new_document(s: Settings, name: str, commit, dirty, now) -> dict:
    """The results document before any record: what ran, where, from which code."""
    return {
        "schema_version": 1,
        "device": name,
        "device_detail": device_detail(s.device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "torchvision": package_version("torchvision"),
        "python": platform.python_version(),
        "commit": commit,
        "commit_dirty": dirty,
        "created": now.isoformat(timespec="seconds"),
        "settings": s.to_json(),
        "notes": list(s.notes),
        "weights": {},
        "machine": {},
        "roofline": [],
        "results": [],
        "skipped": [],
        "complete": False,
    }


def machine_rates(s: Settings) -> dict:
    """Copy bandwidth and matmul rate per dtype, timed in this run for the roofline floors."""
    repeats = s.policy.roofline_repeats
    rates = {"copy_bytes_per_s": R.copy_bandwidth(s.device, repeats=repeats), "matmul_flops_per_s": {}}
    for d in s.dtypes:
        rates["matmul_flops_per_s"][d] = R.matmul_rate(DTYPES[d], s.device, repeats=repeats)
        if (
            d == "float32" and s.device.type == "cuda"
        ):  # the floor uses TF32; densetriton's float32 kernels compute IEEE
            rates["matmul_flops_per_s"]["float32-ieee"] = R.matmul_rate(
                torch.float32, s.device, repeats=repeats, allow_tf32=False
            )
    return rates


class BenchRun:
    """One bench run's document and bookkeeping: which records are done or skipped, the budget, saving."""

    def __init__(self, s: Settings, doc: dict, save, bar, runnable: list[str]):
        self.s, self.doc, self.save, self.bar, self.runnable = s, doc, save, bar, runnable
        self.started = time.perf_counter()
        self.done = set()  # (model, batch, dtype, peer) with a record or a skipped entry

    def budget_spent(self) -> bool:
        s = self.s
        return s.budget_s is not None and time.perf_counter() - self.started > s.budget_s

    def budget_reason(self) -> str:
        return f"not run: --budget-s {self.s.budget_s:g} spent"

    def skip(self, model, batch, d, peer, reason, update=True, **extra) -> None:
        self.doc["skipped"].append(
            {
                "peer": peer,
                "model": model,
                "batch": batch,
                "dtype": d,
                "image_size": self.s.image_size,
                "reason": reason,
                **extra,
            }
        )
        self.done.add((model, batch, d, peer))
        if update:
            self.bar.update()

    def skip_rest(self, reason, models=None, batches=None) -> None:
        s = self.s
        for model, batch, d, peer in itertools.product(
            models or s.models, batches or s.batches, s.dtypes, self.runnable
        ):
            if (model, batch, d, peer) not in self.done:
                self.skip(model, batch, d, peer, reason)

    def run_model(self, model: str, workdir: Path) -> None:
        s = self.s
        if self.budget_spent():
            self.skip_rest(self.budget_reason(), models=[model])
            return
        w = P.prepare_weights(model, workdir, seed=s.seed, image_size=s.image_size)
        self.doc["weights"][model] = w.source
        ref_net = P.torchvision_model(model, w.spec)
        P.load_weights_into(ref_net, w.tensors)
        ref_net = ref_net.to(s.device).eval()
        for batch in s.batches:
            if self.budget_spent():  # before the inputs and the float32 references, which take time too
                self.skip_rest(self.budget_reason(), models=[model], batches=[batch])
                continue
            self.run_batch(model, w, ref_net, batch)
        del ref_net
        gc.collect()

    def run_batch(self, model: str, w, ref_net, batch: int) -> None:
        s = self.s
        g = torch.Generator(device=s.device).manual_seed(s.seed * 1000003 + batch)
        pool = [
            P.bench_images(batch, s.image_size, generator=g, device=s.device) for _ in range(s.policy.pool_size(batch))
        ]
        with torch.inference_mode(), no_tf32():
            refs = [to_host(ref_net(x)) for x in pool]
        rates = self.doc["machine"]
        for d in s.dtypes:
            dtype = DTYPES[d]
            entry = R.roofline_entry(
                w.spec,
                model,
                batch,
                s.image_size,
                d,
                dtype.itemsize,
                rates["matmul_flops_per_s"][d],
                rates["copy_bytes_per_s"],
            )
            self.doc["roofline"].append(entry)
            for peer in self.runnable:
                self.bar.set_postfix_str(f"{model} b{batch} {d} {peer}")
                if self.budget_spent():
                    self.skip(model, batch, d, peer, self.budget_reason())
                    continue
                self.record(model, batch, d, peer, w, pool, refs, entry)
                self.bar.update()
                self.save()

    def record(self, model, batch, d, peer, w, pool, refs, entry) -> None:
        """Measure one peer; a failure (out of memory, a bug) is a skipped entry, not the end of the run."""
        s = self.s
        try:
            rec = measure_peer(peer, w, s, DTYPES[d], batch, pool, refs)
        except RecordInterrupted as e:  # its time so far, in its own skipped entry; then the run stops
            self.skip(model, batch, d, peer, str(e), update=False, elapsed_s=round(e.elapsed_s, 3))
            raise
        except Exception as e:
            msg = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self.skip(model, batch, d, peer, msg[:500], update=False)
            self.bar.write(f"bench: {model} batch {batch} {d} {peer} {msg[:300]}", file=sys.stderr)
        else:
            where = {"model": model, "batch": batch, "dtype": d, "image_size": s.image_size}
            rec = {**where, **rec, "floor_ms": entry["floor_ms"]}
            rec["pct_of_floor"] = 100.0 * entry["floor_ms"] / rec["median_ms"]
            self.doc["results"].append(report.order_record(rec))  # the fields first, the raw times last
            self.done.add((model, batch, d, peer))
        finally:
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()


def run(s: Settings, *, progress: bool = True) -> tuple[dict, dict[str, Path]]:
    """Run the whole bench; writes JSON and Markdown after every record and the chart at the end."""
    from tqdm import tqdm

    cuda = s.device.type == "cuda"
    name = device_name(s.device)
    commit, dirty = git_commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    s.out.mkdir(parents=True, exist_ok=True)
    # GPU runs are committed to bench/results/: a run into another folder must not reuse a name there.
    stem = output_stem(s.out, slug(name), now.strftime("%Y-%m-%d"), also=(RESULTS_DIR,) if cuda else ())
    doc = new_document(s, name, commit, dirty, now)
    paths = {}

    def save(final=False):
        paths.update(report.write(doc, s.out, stem, chart=final and s.chart))

    runnable = []
    for peer in s.peers:
        reason = P.skip_reason(peer, s.device, s.peers_named)
        if reason:
            doc["skipped"].append({"peer": peer, "reason": reason})
        else:
            runnable.append(peer)
    workdir = Path(tempfile.mkdtemp(prefix="densetriton-bench-"))
    saved_env = None if s.warm_caches else P.fresh_compile_caches(workdir / "caches")
    if not s.warm_caches:
        doc["notes"].append(
            "Triton's and Inductor's on-disk caches started empty: the first record of each peer "
            "compiles from scratch; later ones reuse what this process compiled"
        )
    bar = tqdm(
        total=len(s.models) * len(s.batches) * len(s.dtypes) * len(runnable),
        disable=not progress,
        desc="bench",
        unit="run",
        file=sys.stderr,
    )
    bench = BenchRun(s, doc, save, bar, runnable)
    saved_cudnn_benchmark = torch.backends.cudnn.benchmark
    if cuda:
        torch.backends.cudnn.benchmark = (
            True  # what a user after speed sets for eager convolutions (restored at the end)
        )
    try:
        doc["machine"] = machine_rates(s)
        for model in s.models:
            bench.run_model(model, workdir)
        doc["complete"] = True
    except KeyboardInterrupt:
        doc["notes"].append("interrupted: the results are partial")
        bench.skip_rest("not run: the bench was interrupted")
        raise
    finally:
        torch.backends.cudnn.benchmark = saved_cudnn_benchmark
        bar.close()
        doc["wall_s"] = round(time.perf_counter() - bench.started, 3)
        save(final=True)
        if saved_env is not None:
            P.restore_env(saved_env)
        shutil.rmtree(workdir, ignore_errors=True)
    return doc, paths
