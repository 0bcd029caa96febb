"""Where densetriton's time goes: a plan's launches timed per layer kind.

    python -m densetriton.bench.layer_times [--model densenet201] [--batch-size 256] [--dtype float16]
                                            [--method graph|ablation|kind-graphs|launches]

The bench times whole forwards (one CUDA graph replay each). To see which layer kind is far from
its roofline floor, this times each kind of bench.roofline.KINDS -- stem (conv0 and its
max-pool), dense_1x1, dense_3x3, transition, head (norm5-ReLU-pool and the classifier) -- in one
of four ways (the record says which; a method this torch or driver refuses falls to the next):

- graph (default): the whole forward captured as one CUDA graph with a timing event between
  consecutive launches of different kinds; each stretch between two events is summed into its
  kind. Nothing runs outside the graph, so the kinds add up to the forward as the bench times it.
- ablation: the whole forward as one graph, and per kind a graph of every launch but that
  kind's; a kind's time is the whole graph's less the graph without it (no event inside a graph,
  so nothing is added between launches; for a torch or driver without timing events in graphs).
- kind-graphs: each run of consecutive same-kind launches captured as its own graph, an event
  on each side of every replay (each replay's launch gap is added to its kind).
- launches: no graph, an event pair around each launch; adds the launch gaps a graph hides, so
  the kinds' sum can exceed the forward's median.

On the CPU (Triton's interpreter) events are wall-clock stamps and a "graph" is its list of
launches replayed in order: the same code path, timed by the host clock.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .roofline import KINDS
from .timing import Timer, summarize

METHODS = ("graph", "ablation", "kind-graphs", "launches")  # also the order of falling back


def stage_kind(stage) -> str:
    """The roofline kind a plan stage's launch belongs to."""
    if stage.op == "max_pool" or stage.name == "conv0":
        return "stem"
    if stage.op == "transition":
        return "transition"
    if stage.op in ("head", "classifier"):
        return "head"
    return "dense_3x3" if stage.kernel_size == 3 else "dense_1x1"


def kind_segments(launches) -> list[tuple[str, list]]:
    """A plan's (stage, launch) pairs as runs of consecutive launches of one kind, in order."""
    segments = []
    for stage, launch in launches:
        kind = stage_kind(stage)
        if segments and segments[-1][0] == kind:
            segments[-1][1].append(launch)
        else:
            segments.append((kind, [launch]))
    return segments


# -- clocks: CUDA events and graphs, or their host stand-ins ---------------------------------


class HostEvent:
    """A wall-clock stamp with torch.cuda.Event's record/elapsed_time."""

    def __init__(self):
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1e3


class HostGraph:
    """What capture recorded, run in order on replay (nothing runs while capturing, as on CUDA)."""

    def __init__(self, ops):
        self.ops = list(ops)

    def replay(self) -> None:
        for op in self.ops:
            op()


class HostClock:
    """On the CPU: host events and graphs (the interpreter's launches run as they are called)."""

    def event(self, in_graph: bool = False) -> HostEvent:
        return HostEvent()

    def capture(self, ops) -> HostGraph:
        return HostGraph(ops)

    def sync(self) -> None:
        pass


class CudaClock:
    """CUDA events and graphs on one device; captures on a stream of its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def event(self, in_graph: bool = False):
        # external: recorded inside a capture, the event becomes an event-record node of the
        # graph (otherwise it only orders streams and is never stamped).
        return torch.cuda.Event(enable_timing=True, external=True) if in_graph else torch.cuda.Event(enable_timing=True)

    def capture(self, ops):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            for op in ops:
                op()
        return graph

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else HostClock()


# -- one timed forward per method --------------------------------------------------------------


def _calls(launches, x, logits) -> list:
    return [lambda launch=launch: launch(x, logits) for launch in launches]


def summed(kinds, intervals):
    """A measure: each (start, end) event interval's ms added to its kind."""

    def measure() -> dict[str, float]:
        ms = {kind: 0.0 for kind in KINDS}
        for kind, (start, end) in zip(kinds, intervals):
            ms[kind] += start.elapsed_time(end)
        return ms

    return measure


def graph_forward(clock, segments, x, logits):
    """One graph of every launch, an event before the first and after each segment."""
    events = [clock.event(in_graph=True) for _ in range(len(segments) + 1)]
    ops = [events[0].record]
    for (_, launches), end in zip(segments, events[1:]):
        ops += _calls(launches, x, logits) + [end.record]
    return clock.capture(ops).replay, summed([kind for kind, _ in segments], list(zip(events, events[1:])))


def ablation_forward(clock, segments, x, logits):
    """Per kind a graph of every launch but that kind's, and a graph of every launch, each timed by
    one event pair around its replay: a kind's ms is the whole graph's less the graph without it.
    No event inside a graph; each kind's launches run in the whole graph's company."""
    kinds = list(dict.fromkeys(kind for kind, _ in segments))

    def graph_without(left_out):
        return clock.capture(
            [call for kind, launches in segments if kind != left_out for call in _calls(launches, x, logits)]
        )

    # The whole graph last: a graph without a kind leaves wrong values in the shared buffers (its
    # time does not depend on them); the whole forward after it leaves the right ones.
    graphs = {**{kind: graph_without(kind) for kind in kinds}, None: graph_without(None)}
    pairs = {name: (clock.event(), clock.event()) for name in graphs}

    def forward():
        for name, graph in graphs.items():
            start, end = pairs[name]
            start.record()
            graph.replay()
            end.record()

    def measure() -> dict[str, float]:
        ms = {name: start.elapsed_time(end) for name, (start, end) in pairs.items()}
        return {kind: max(0.0, ms[None] - ms[kind]) if kind in kinds else 0.0 for kind in KINDS}

    return forward, measure


def kind_graphs_forward(clock, segments, x, logits):
    """A graph per segment, replayed between events recorded outside the graphs."""
    graphs = [clock.capture(_calls(launches, x, logits)) for _, launches in segments]
    events = [clock.event() for _ in range(len(segments) + 1)]

    def forward():
        events[0].record()
        for graph, end in zip(graphs, events[1:]):
            graph.replay()
            end.record()

    return forward, summed([kind for kind, _ in segments], list(zip(events, events[1:])))


def launches_forward(clock, segments, x, logits):
    """No graph: an event pair around each launch (the gaps between launches are not counted)."""
    calls = [(kind, call) for kind, launches in segments for call in _calls(launches, x, logits)]
    pairs = [(clock.event(), clock.event()) for _ in calls]

    def forward():
        for (_, call), (start, end) in zip(calls, pairs):
            start.record()
            call()
            end.record()

    return forward, summed([kind for kind, _ in calls], pairs)


FORWARDS = {
    "graph": graph_forward,
    "ablation": ablation_forward,
    "kind-graphs": kind_graphs_forward,
    "launches": launches_forward,
}


def kind_ms_per_forward(plan, x, logits, clock, method: str, repeats: int) -> list[dict[str, float]]:
    """Per timed forward (repeats of them), the ms each kind took; the plan's kernels must be compiled."""
    if method not in METHODS:
        raise ValueError(f"unknown per-kind timing method {method!r}; one of {', '.join(METHODS)}")
    forward, measure = FORWARDS[method](clock, kind_segments(plan.launches), x, logits)
    per_forward = []
    for _ in range(repeats):
        clock.sync()
        forward()
        clock.sync()
        per_forward.append(measure())
    return per_forward


@dataclass
class KindTimes:
    """Per kind: launches per forward and the median ms over the timed forwards; how they were timed."""

    method: str
    kinds: dict  # kind -> {"launches": int, "ms": float}
    forward_ms: float  # median over the forwards of the kinds' sum

    def ms(self) -> dict[str, float]:
        return {kind: d["ms"] for kind, d in self.kinds.items()}


def _time_with_fallback(plan, x, logits, clock, method, repeats) -> tuple[str, list]:
    """The method asked for, else the next one down METHODS where this torch or driver refuses it."""
    for candidate in METHODS[METHODS.index(method) :]:
        try:
            return candidate, kind_ms_per_forward(plan, x, logits, clock, candidate, repeats)
        except (RuntimeError, TypeError) as e:
            if candidate == METHODS[-1]:
                raise
            warnings.warn(
                f"per-kind times: {candidate} failed ({type(e).__name__}: {e}); trying the next method", stacklevel=3
            )
    raise AssertionError("unreachable")


def layer_times(engine, x: torch.Tensor, *, repeats: int = 5, method: str = "graph", clock=None) -> KindTimes:
    """Per kind: launches per forward and the median over repeats of its ms (see the module doc)."""
    if engine.backend != "triton":
        raise ValueError(f"layer times need backend='triton', not {engine.backend!r}")
    if method not in METHODS:
        raise ValueError(f"unknown per-kind timing method {method!r}; one of {', '.join(METHODS)}")
    clock = clock or clock_for(engine.device)
    n, _, height, width = x.shape
    logits = torch.empty(n, engine.spec.num_classes, dtype=torch.float32, device=engine.device)
    cuda = engine.device.type == "cuda"
    with (
        torch.inference_mode(),
        torch.cuda.device(engine.device) if cuda else contextlib.nullcontext(),
        engine.exclusive_plan(n, height, width) as plan,
    ):
        plan.run(x, logits)  # every kernel compiled before capture and the clock
        used, per_forward = _time_with_fallback(plan, x, logits, clock, method, repeats)
    counts = [stage_kind(stage) for stage, _ in plan.launches]
    kinds = {
        kind: {"launches": counts.count(kind), "ms": float(np.median([f[kind] for f in per_forward]))} for kind in KINDS
    }
    return KindTimes(used, kinds, float(np.median([sum(f.values()) for f in per_forward])))


def table(times: dict[str, dict], floors: dict[str, dict] | None = None) -> str:
    """A plain-text table: per kind launches, ms, share of the sum, and % of its floor when known."""
    total = sum(d["ms"] for d in times.values())
    lines = [
        f"{'kind':<11} {'launches':>8} {'ms':>9} {'share':>6}" + (f" {'floor ms':>9} {'% floor':>8}" if floors else "")
    ]
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

    parser = argparse.ArgumentParser(
        prog="python -m densetriton.bench.layer_times", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="densenet201")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default=None, help="default: the engine's (float16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="graph",
        help="graph: one CUDA graph, events between kinds (default); ablation: the whole graph's "
        "time less that of a graph without the kind; kind-graphs: a graph per run of one kind; "
        "launches: an event pair around each launch, no graph",
    )
    args = parser.parse_args(argv)
    engine = timing_engine(parser, args)
    g = torch.Generator(device=engine.device).manual_seed(0)
    x = torch.randn(
        args.batch_size,
        engine.spec.in_channels,
        args.image_size,
        args.image_size,
        generator=g,
        device=engine.device,
        dtype=engine.dtype,
    )
    times = layer_times(engine, x, repeats=args.repeats, method=args.method)
    entry = roofline.roofline_entry(
        engine.spec,
        args.model,
        args.batch_size,
        args.image_size,
        dtype_name(engine.dtype),
        engine.dtype.itemsize,
        roofline.matmul_rate(engine.dtype, engine.device),
        roofline.copy_bandwidth(engine.device),
    )
    whole = summarize(Timer(engine.device).time(engine, [x], repeats=args.repeats, warmup=2))["median_ms"]
    print(f"{engine!r}, input {tuple(x.shape)}, median of {args.repeats}, timed per kind by: {times.method}")
    print(table(times.kinds, entry["kinds"]))
    print(
        f"whole forward (as the bench times it): {whole:.4g} ms; the kinds' sum is "
        f"{100 * sum(times.ms().values()) / whole:.0f}% of it; network floor {entry['floor_ms']:.4g} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
