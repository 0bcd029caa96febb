"""One record: build a peer, run it, and measure it.

A fresh peer is built and run once on the first input (cold start: build, weights to the device,
compile, first result); one untimed sweep over the input pool gives the logits for the accuracy
figures and warms up; more warm-up until the warm-up time is spent; one forward after a reset of
the peak-memory counter; then the timed repeats, rotating over the pool (CUDA events on GPU,
time.perf_counter on CPU).
"""

from __future__ import annotations

import gc
import sys
import time

import torch

from . import peers as P
from .layer_times import layer_times
from .timing import HostMemory, Timer, choose_repeats, summarize


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


class no_tf32:
    """Full float32 matmuls and convolutions on CUDA for the float32 reference logits."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32, copy=True)


# -- one record -------------------------------------------------------------------------------


class RecordInterrupted(KeyboardInterrupt):
    """The bench was interrupted (SIGINT, e.g. at gpu_run.sh's time limit) inside a record: the
    record's skipped entry keeps how long it had run and in which step (a compile that never
    finished says how long it had compiled)."""

    def __init__(self, peer: str, elapsed_s: float, step: str):
        super().__init__(f"interrupted after {elapsed_s:.1f} s of this record, {step}")
        self.peer, self.elapsed_s, self.step = peer, elapsed_s, step


def measure_peer(peer: str, w, s, dtype: torch.dtype, batch: int, pool, refs) -> dict:
    """Build peer, run it, and return its record (without model/batch/dtype/floor fields);
    RecordInterrupted when interrupted."""
    progress = {"started": time.perf_counter(), "step": "before its first result (building, compiling)"}
    try:
        return _measure(peer, w, s, dtype, batch, pool, refs, progress)
    except KeyboardInterrupt:
        raise RecordInterrupted(peer, time.perf_counter() - progress["started"], progress["step"]) from None


def _measure(peer: str, w, s, dtype: torch.dtype, batch: int, pool, refs, progress: dict) -> dict:
    started = progress["started"]
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
        progress["step"] = f"after its first result ({cold_start_s:.1f} s: build, compile, first call)"
        outs = [to_host(first)]
        del first
        for x in inputs[1:]:  # the accuracy sweep, untimed; it warms up too
            outs.append(to_host(built.fn(x)))
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
    kinds_ms = kinds_method = None
    if getattr(built.engine, "backend", None) == "triton":  # where the time goes, per layer kind
        try:  # an extra: its failure must not cost the record
            kinds = layer_times(built.engine, inputs[0], repeats=min(repeats, 10), method=s.kinds_method)
            kinds_ms, kinds_method = kinds.ms(), kinds.method
        except Exception as e:
            print(f"bench: {peer} batch {batch}: per-kind times failed ({type(e).__name__}: {e})", file=sys.stderr)
    stats = summarize(times)
    detail = built.detail
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
        "kinds_method": kinds_method,
        "peer_detail": detail,
        "cold_start_s": cold_start_s,
        "max_rel_err": max_rel_err,
        "top1_agree": top1,
        "accuracy_images": batch * len(pool),
        "repeats": len(times),
        "wall_s": round(time.perf_counter() - started, 3),  # this record's whole measurement
        "times_ms": [round(t, 6) for t in times],
    }
