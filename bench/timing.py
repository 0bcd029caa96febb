"""Timing and host-memory primitives shared by the bench, the roofline's rates and the per-kind times."""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


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
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
            ]
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


# -- host memory ----------------------------------------------------------------------------


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
