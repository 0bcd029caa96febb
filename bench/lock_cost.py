"""What sharing one engine between threads costs: the engine's lock, alone and under contention.

    python -m densetriton.bench.lock_cost [--model densenet121] [--batch-size 1] [--threads 8] [--calls 400]

An engine serialises calls with one lock (a plan's buffers serve one call at a time). On CUDA the
lock is held while a call queues its kernels, not while the GPU runs them, so it can only cost host
time. This prints, for one engine and input shape:
- the lock's own cost, uncontended (acquire plus release);
- a call's wall time from one thread, with the lock and with it replaced by a no-op;
- calls per second from one thread and from N threads sharing the engine (same total calls).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
import timeit

import torch

from .timing import Timer


def _calls_per_s(engine, x: torch.Tensor, calls: int, threads: int) -> float:
    per_thread = max(calls // threads, 1)

    def work():
        for _ in range(per_thread):
            engine(x)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    timer = Timer(engine.device)
    timer.sync()
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    timer.sync()
    return per_thread * threads / (time.perf_counter() - start)


def measure(engine, x: torch.Tensor, *, calls: int = 400, threads: int = 8) -> dict:
    lock = threading.Lock()
    uncontended_ns = (
        min(timeit.repeat("with lock: pass", globals={"lock": lock}, number=100_000, repeat=5)) / 100_000 * 1e9
    )
    for _ in range(3):  # plan built, kernels compiled, CUDA graph captured
        engine(x)
    one_thread = _calls_per_s(engine, x, calls, 1)
    engine_lock = engine._lock
    engine._lock = contextlib.nullcontext()  # one thread only: nothing else touches the buffers
    try:
        no_lock = _calls_per_s(engine, x, calls, 1)
    finally:
        engine._lock = engine_lock
    return {
        "uncontended_lock_ns": uncontended_ns,
        "call_ms_with_lock": 1e3 / one_thread,
        "call_ms_without_lock": 1e3 / no_lock,
        "calls_per_s_1_thread": one_thread,
        f"calls_per_s_{threads}_threads": _calls_per_s(engine, x, calls, threads),
    }


def main(argv=None) -> int:
    from .layer_times import timing_engine

    parser = argparse.ArgumentParser(prog="python -m densetriton.bench.lock_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default=None, help="default: the engine's (float16 on CUDA)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    engine = timing_engine(parser, args)
    x = torch.randn(args.batch_size, engine.spec.in_channels, args.image_size, args.image_size, device=engine.device)
    print(f"{engine!r}, input {tuple(x.shape)}, {args.calls} calls")
    for key, value in measure(engine, x, calls=args.calls, threads=args.threads).items():
        print(f"{key:>24}: {value:,.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
