"""Measurement: settings, timing, and the loop over model x batch x dtype x peer.

Per record: a fresh peer is built and run once on the first input (cold start: build, weights
to the device, compile, first result); one untimed sweep over the input pool gives the logits for
the accuracy figures and warms up; more warm-up until the warm-up time is spent; one forward
after a reset of the peak-memory counter; then the timed repeats, rotating over the pool
(CUDA events on GPU, time.perf_counter on CPU).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import itertools
import importlib.metadata
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from densetriton.engine import DTYPE_NAMES

from . import peers as P
from . import roofline as R

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


# -- timing --------------------------------------------------------------------------------


class Timer:
    """Per-call wall times in ms of fn over inputs rotated in order (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, inputs, *, repeats: int, warmup: int = 0, start: int = 0) -> list[float]:
        if not inputs:
            raise ValueError("no inputs to time")
        for i in range(warmup):
            fn(inputs[(start + i) % len(inputs)])
        start += warmup
        if self.cuda:
            self.sync()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
            for i, (a, b) in enumerate(events):
                x = inputs[(start + i) % len(inputs)]
                a.record()
                fn(x)
                b.record()
            self.sync()
            return [a.elapsed_time(b) for a, b in events]
        times = []
        for i in range(repeats):
            x = inputs[(start + i) % len(inputs)]
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1e3)
        return times


def summarize(times_ms) -> dict:
    """Median and 90th percentile (linear interpolation between order statistics, numpy's default)."""
    a = np.asarray(times_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no times to summarize")
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90))}


def choose_repeats(estimate_ms: float, target_s: float, lo: int, hi: int) -> int:
    """Enough repeats to fill target_s at estimate_ms per call, within [lo, hi]."""
    if estimate_ms <= 0 or not math.isfinite(estimate_ms):
        return hi
    return int(min(hi, max(lo, math.ceil(target_s * 1e3 / estimate_ms))))


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
        device=device, models=models, batches=batches, dtypes=dtypes, image_size=image_size, peers=peers,
        peers_named=bool(args.peers), quick=quick, out=Path(args.out) if args.out else RESULTS_DIR, seed=args.seed,
        repeats=args.repeats, budget_s=args.budget_s, warm_caches=args.warm_caches, notes=notes,
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
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _proc_status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    """glibc keeps freed memory resident; give it back to the OS (best effort, glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux 4.0+); False where it can't."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


class HostMemory:
    """Peak resident memory of the process on CPU, relative to a baseline taken before the peer exists.

    On Linux the peak mark is reset right before the measured forward, so the figure is the weights
    and buffers the peer holds plus its forward's peak ("cpu_rss_peak"); elsewhere it falls back to
    the growth of ru_maxrss over the peer's whole run ("cpu_maxrss_growth", coarse: 0 when the
    process had been higher before).
    """

    def __init__(self):
        _malloc_trim()  # hand freed heap pages back, so that this peer's allocations show up in RSS
        rss = _proc_status_kib("VmRSS")
        self.base = rss * 1024 if rss is not None else None
        self.maxrss0 = peak_rss_bytes()
        self.kind = "cpu_maxrss_growth"

    def before_forward(self) -> None:
        if self.base is not None and reset_rss_peak():
            self.kind = "cpu_rss_peak"

    def peak(self) -> int:
        if self.kind == "cpu_rss_peak":
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return peak_rss_bytes() - self.maxrss0


# -- accuracy -------------------------------------------------------------------------------


def accuracy(outs, refs) -> tuple[float | None, float]:
    """(max relative error, top-1 agreement) of logits against reference logits.

    max relative error: the largest, over images, of ||out - ref||_2 / ||ref||_2 of the image's
    logit vector, in float64; None when any output is NaN or infinite. top-1 agreement: the share
    of images whose arg-max class equals the reference's.
    """
    out = torch.cat([o.double() for o in outs])
    ref = torch.cat([r.double() for r in refs])
    agree = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    if not torch.isfinite(out).all():
        return None, agree
    err = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return err.max().item(), agree


class _no_tf32:
    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _to_host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32, copy=True)


# -- one record -------------------------------------------------------------------------------


def measure_peer(peer: str, w, s: Settings, dtype: torch.dtype, batch: int, pool, refs) -> dict:
    """Build peer, run it, and return its record (without model/batch/dtype/floor fields)."""
    started = time.perf_counter()
    device, timer, policy = s.device, Timer(s.device), s.policy
    cuda = device.type == "cuda"
    pdtype = P.peer_dtype(peer, dtype, device)
    inputs = [P.prepare_input(peer, x, pdtype) for x in pool]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        timer.sync()
        base_mem = torch.cuda.memory_allocated(device)
    host = HostMemory()

    with torch.inference_mode():
        t0 = time.perf_counter()
        built = P.build(peer, w, device, pdtype)
        first = built.fn(inputs[0])
        timer.sync()
        cold_start_s = time.perf_counter() - t0
        outs = [_to_host(first)]
        del first
        for x in inputs[1:]:  # the accuracy sweep, untimed; it warms up too
            outs.append(_to_host(built.fn(x)))
        max_rel_err, top1 = accuracy(outs, refs)

        calls, t = 0, time.perf_counter()
        while calls < 1 or time.perf_counter() - t < policy.warmup_s:
            built.fn(inputs[calls % len(inputs)])
            timer.sync()
            calls += 1
        estimate_ms = (time.perf_counter() - t) * 1e3 / calls

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            host.before_forward()
        built.fn(inputs[0])
        timer.sync()
        peak_mem = torch.cuda.max_memory_allocated(device) - base_mem if cuda else host.peak()

        repeats = s.repeats or choose_repeats(estimate_ms, policy.target_s, policy.min_repeats, policy.max_repeats)
        times = timer.time(built.fn, inputs, repeats=repeats, start=1)

    planned = None
    plan_fn = getattr(built.engine, "planned_memory_bytes", None)
    if callable(plan_fn):
        planned = plan_fn(batch, s.image_size, s.image_size)
    kinds_ms = None
    if getattr(built.engine, "backend", None) == "triton":  # where the time goes, per layer kind
        from .layer_times import layer_times

        try:  # an extra: its failure must not cost the record
            kinds_ms = {k: d["ms"] for k, d in layer_times(built.engine, inputs[0], repeats=min(repeats, 10)).items()}
        except Exception as e:
            print(f"bench: {peer} batch {batch}: per-kind times failed ({type(e).__name__}: {e})", file=sys.stderr)
    stats = summarize(times)
    del built, inputs
    return {
        "peer": peer,
        "backend": P.peer_backend(peer, device),
        "peer_dtype": P.dtype_name(pdtype),
        **stats,
        "images_per_s": batch / (stats["median_ms"] / 1e3),
        "peak_mem_bytes": int(peak_mem),
        "peak_mem_kind": "cuda_max_allocated" if cuda else host.kind,
        "planned_mem_bytes": None if planned is None else int(planned),
        "kinds_ms": kinds_ms,
        "cold_start_s": cold_start_s,
        "max_rel_err": max_rel_err,
        "top1_agree": top1,
        "accuracy_images": batch * len(pool),
        "repeats": len(times),
        "wall_s": round(time.perf_counter() - started, 3),  # this record's whole measurement
        "times_ms": [round(t, 6) for t in times],
    }


# -- the run ---------------------------------------------------------------------------------


def run(s: Settings, *, progress: bool = True) -> tuple[dict, dict[str, Path]]:
    """Run the whole bench; writes JSON and Markdown after every record and the chart at the end."""
    from tqdm import tqdm

    from . import report

    started = time.perf_counter()
    cuda = s.device.type == "cuda"
    name = device_name(s.device)
    commit, dirty = git_commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    s.out.mkdir(parents=True, exist_ok=True)
    # GPU runs are committed to bench/results/: a run into another folder must not reuse a name there.
    stem = output_stem(s.out, slug(name), now.strftime("%Y-%m-%d"), also=(RESULTS_DIR,) if cuda else ())
    doc = {
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
    paths = {}

    def save(final=False):
        paths.update(report.write(doc, s.out, stem, chart=final and s.chart))

    named = s.peers_named
    runnable = []
    for peer in s.peers:
        reason = P.skip_reason(peer, s.device, named)
        if reason:
            doc["skipped"].append({"peer": peer, "reason": reason})
        else:
            runnable.append(peer)

    workdir = Path(tempfile.mkdtemp(prefix="densetriton-bench-"))
    saved_env = None if s.warm_caches else P.fresh_compile_caches(workdir / "caches")
    if not s.warm_caches:
        doc["notes"].append("Triton's and Inductor's on-disk caches started empty: the first record of each peer "
                            "compiles from scratch; later ones reuse what this process compiled")
    bar = tqdm(total=len(s.models) * len(s.batches) * len(s.dtypes) * len(runnable), disable=not progress,
               desc="bench", unit="run", file=sys.stderr)
    done = set()  # (model, batch, dtype, peer) with a record or a skipped entry

    def budget_spent() -> bool:
        return s.budget_s is not None and time.perf_counter() - started > s.budget_s

    def skip(model, batch, d, peer, reason, update=True):
        doc["skipped"].append({"peer": peer, "model": model, "batch": batch, "dtype": d, "image_size": s.image_size,
                               "reason": reason})
        done.add((model, batch, d, peer))
        if update:
            bar.update()

    def skip_rest(reason, models=s.models, batches=s.batches):
        for model, batch, d, peer in itertools.product(models, batches, s.dtypes, runnable):
            if (model, batch, d, peer) not in done:
                skip(model, batch, d, peer, reason)

    saved_cudnn_benchmark = torch.backends.cudnn.benchmark
    if cuda:
        torch.backends.cudnn.benchmark = True  # what a user after speed sets for eager convolutions (restored at the end)
    try:
        pol = s.policy
        doc["machine"] = {"copy_bytes_per_s": R.copy_bandwidth(s.device, repeats=pol.roofline_repeats),
                          "matmul_flops_per_s": {}}
        for d in s.dtypes:
            doc["machine"]["matmul_flops_per_s"][d] = R.matmul_rate(DTYPES[d], s.device, repeats=pol.roofline_repeats)
            if d == "float32" and cuda:  # the floor uses TF32; densetriton's float32 kernels compute IEEE
                doc["machine"]["matmul_flops_per_s"]["float32-ieee"] = R.matmul_rate(
                    torch.float32, s.device, repeats=pol.roofline_repeats, allow_tf32=False)
        for model in s.models:
            if budget_spent():
                skip_rest(f"not run: --budget-s {s.budget_s:g} spent", models=[model])
                continue
            w = P.prepare_weights(model, workdir, seed=s.seed, image_size=s.image_size)
            doc["weights"][model] = w.source
            ref_net = P.torchvision_model(model, w.spec)
            P.load_weights_into(ref_net, w.tensors)
            ref_net = ref_net.to(s.device).eval()
            for batch in s.batches:
                if budget_spent():  # before the inputs and the float32 references, which take time too
                    skip_rest(f"not run: --budget-s {s.budget_s:g} spent", models=[model], batches=[batch])
                    continue
                g = torch.Generator(device=s.device).manual_seed(s.seed * 1000003 + batch)
                pool = [P.bench_images(batch, s.image_size, generator=g, device=s.device)
                        for _ in range(pol.pool_size(batch))]
                with torch.inference_mode(), _no_tf32():
                    refs = [_to_host(ref_net(x)) for x in pool]
                for d in s.dtypes:
                    dtype = DTYPES[d]
                    entry = R.roofline_entry(w.spec, model, batch, s.image_size, d, dtype.itemsize,
                                             doc["machine"]["matmul_flops_per_s"][d], doc["machine"]["copy_bytes_per_s"])
                    doc["roofline"].append(entry)
                    for peer in runnable:
                        where = {"model": model, "batch": batch, "dtype": d, "image_size": s.image_size}
                        bar.set_postfix_str(f"{model} b{batch} {d} {peer}")
                        if budget_spent():
                            skip(model, batch, d, peer, f"not run: --budget-s {s.budget_s:g} spent")
                            continue
                        try:
                            rec = measure_peer(peer, w, s, dtype, batch, pool, refs)
                        except Exception as e:  # one peer failing (out of memory, a bug) does not stop the run
                            msg = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                            skip(model, batch, d, peer, msg[:500], update=False)
                            bar.write(f"bench: {model} batch {batch} {d} {peer} {msg[:300]}", file=sys.stderr)
                        else:
                            rec = {**where, **rec, "floor_ms": entry["floor_ms"]}
                            rec["pct_of_floor"] = 100.0 * entry["floor_ms"] / rec["median_ms"]
                            # key order: the fields first, the raw times last
                            doc["results"].append(report.order_record(rec))
                            done.add((model, batch, d, peer))
                        finally:
                            gc.collect()
                            if cuda:
                                torch.cuda.empty_cache()
                        bar.update()
                        save()
                del pool, refs
            del ref_net
            gc.collect()
        doc["complete"] = True
    except KeyboardInterrupt:
        doc["notes"].append("interrupted: the results are partial")
        skip_rest("not run: the bench was interrupted")
        raise
    finally:
        torch.backends.cudnn.benchmark = saved_cudnn_benchmark
        bar.close()
        doc["wall_s"] = round(time.perf_counter() - started, 3)
        save(final=True)
        if saved_env is not None:
            P.restore_env(saved_env)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return doc, paths
