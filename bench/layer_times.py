"""Where densetriton's time goes: every kernel launch of a plan timed alone, summed per layer kind.

    python -m densetriton.bench.layer_times [--model densenet201] [--batch-size 256] [--dtype float16]

The bench times whole forwards (one CUDA graph replay each). To see which layer kind is far from
its roofline floor, this runs a plan launch by launch with a CUDA event pair around each launch
(on the CPU, under Triton's interpreter: the wall clock) and sums the times per kind of
bench.roofline.KINDS: stem (conv0 and its max-pool), dense_1x1, dense_3x3, transition, head
(norm5-ReLU-pool and the classifier). Launching one by one adds the gaps a graph hides, so the
kinds' sum can exceed the bench's median; the table prints both.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np
import torch

from .roofline import KINDS
from .timing import Timer, summarize


def stage_kind(stage) -> str:
    """The roofline kind a plan stage's launch belongs to."""
    if stage.op == "max_pool" or stage.name == "conv0":
        return "stem"
    if stage.op == "transition":
        return "transition"
    if stage.op in ("head", "classifier"):
        return "head"
    return "dense_3x3" if stage.kernel_size == 3 else "dense_1x1"


def layer_times(engine, x: torch.Tensor, *, repeats: int = 5) -> dict[str, dict]:
    """Per kind: launches per forward and the median over repeats of its launches' summed ms."""
    if engine.backend != "triton":
        raise ValueError(f"layer times need backend='triton', not {engine.backend!r}")
    executor, timer = engine._model, Timer(engine.device)
    cuda = timer.cuda
    n, _, height, width = x.shape
    logits = torch.empty(n, engine.spec.num_classes, dtype=torch.float32, device=engine.device)
    totals = {kind: [] for kind in KINDS}
    with engine._lock, torch.inference_mode(), (torch.cuda.device(engine.device) if cuda else contextlib.nullcontext()):
        plan = executor.plan(n, height, width)
        plan.run(x, logits)  # every kernel compiled before the clock starts
        kinds = [stage_kind(stage) for stage, _ in plan.launches]
        for _ in range(repeats):
            if cuda:
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in plan.launches]
                timer.sync()
                for (_, launch), (start, end) in zip(plan.launches, events):
                    start.record()
                    launch(x, logits)
                    end.record()
                timer.sync()
                ms = [start.elapsed_time(end) for start, end in events]
            else:
                ms = []
                for _, launch in plan.launches:
                    t = time.perf_counter()
                    launch(x, logits)
                    ms.append((time.perf_counter() - t) * 1e3)
            for kind in KINDS:
                totals[kind].append(sum(m for m, k in zip(ms, kinds) if k == kind))
    return {kind: {"launches": kinds.count(kind), "ms": float(np.median(totals[kind]))} for kind in KINDS}


def table(times: dict[str, dict], floors: dict[str, dict] | None = None) -> str:
    """A plain-text table: per kind launches, ms, share of the sum, and % of its floor when known."""
    total = sum(d["ms"] for d in times.values())
    lines = [f"{'kind':<11} {'launches':>8} {'ms':>9} {'share':>6}" + (f" {'floor ms':>9} {'% floor':>8}" if floors else "")]
    for kind, d in times.items():
        line = f"{kind:<11} {d['launches']:>8} {d['ms']:>9.4g} {100 * d['ms'] / total:>5.1f}%"
        if floors:
            floor = floors[kind]["floor_ms"]
            line += f" {floor:>9.4g} " + (f"{100 * floor / d['ms']:>7.1f}%" if d["launches"] else f"{'-':>8}")
        lines.append(line)
    lines.append(f"{'sum':<11} {sum(d['launches'] for d in times.values()):>8} {total:>9.4g}")
    return "\n".join(lines)


def timing_engine(parser: argparse.ArgumentParser, args):
    """The Triton engine a timing tool's --model names (a registry name gets random weights, a
    file its own), with a classifier: the timed forward is a logits call. What cannot be loaded
    is one argparse error line, not a traceback (no GPU and no interpreter, an unknown name)."""
    import densetriton

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: only time is measured
        weights = None if args.model in densetriton.list_models() else "DEFAULT"
        try:
            engine = densetriton.load(args.model, weights=weights, dtype=args.dtype, backend="triton")
        except (RuntimeError, ValueError) as e:
            parser.error(str(e))
    if not engine.spec.num_classes:
        parser.error(f"{args.model} has no classifier (a backbone, features only): time a model with one")
    return engine


def main(argv=None) -> int:

    from . import roofline
    from .peers import dtype_name

    parser = argparse.ArgumentParser(prog="python -m densetriton.bench.layer_times", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet201")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default=None, help="default: the engine's (float16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    engine = timing_engine(parser, args)
    g = torch.Generator(device=engine.device).manual_seed(0)
    x = torch.randn(args.batch_size, engine.spec.in_channels, args.image_size, args.image_size, generator=g,
                    device=engine.device, dtype=engine.dtype)
    times = layer_times(engine, x, repeats=args.repeats)
    entry = roofline.roofline_entry(engine.spec, args.model, args.batch_size, args.image_size,
                                    dtype_name(engine.dtype), engine.dtype.itemsize,
                                    roofline.matmul_rate(engine.dtype, engine.device),
                                    roofline.copy_bandwidth(engine.device))
    whole = summarize(Timer(engine.device).time(engine, [x], repeats=args.repeats, warmup=2))["median_ms"]
    print(f"{engine!r}, input {tuple(x.shape)}, median of {args.repeats}")
    print(table(times, entry["kinds"]))
    print(f"whole forward (as the bench times it): {whole:.4g} ms; network floor {entry['floor_ms']:.4g} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
