"""bench/layer_times.py: a plan's launches timed per roofline layer kind, inside one graph, a graph per
kind, or launch by launch (on the CPU: host events and a host stand-in for CUDA graphs)."""

import pytest
import torch
from densetriton.bench import layer_times as LT
from densetriton.bench import report
from densetriton.bench.layer_times import layer_times, stage_kind, table
from densetriton.bench.roofline import KINDS, layer_kinds, roofline_entry

import densetriton
from densetriton import DenseNetSpec, get_spec
from densetriton.plan import build_stages

TINY = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")


@pytest.mark.parametrize("name", ["densenet121", "densenet40_k12"])
def test_every_stage_has_the_kind_the_roofline_counts_it_under(name):
    spec = get_spec(name)
    kinds = [stage_kind(s) for s in build_stages(spec)]
    layers, blocks = sum(spec.block_config), len(spec.block_config)
    bottleneck = spec.bn_size is not None
    assert kinds.count("dense_1x1") == (layers if bottleneck else 0)
    assert kinds.count("dense_3x3") == layers
    assert kinds.count("transition") == blocks - 1
    assert kinds.count("stem") == (2 if spec.stem == "imagenet" else 1)
    assert kinds.count("head") == 2  # norm5-ReLU-pool, classifier
    # a kind with launches has work in the roofline and the other way round
    counted = layer_kinds(spec, 1, 224, 224, 2)
    assert {k for k in KINDS if counted[k]["macs"] > 0} == set(kinds)


def test_layer_times_cover_every_launch_and_leave_the_engine_correct():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    engine = densetriton.load(TINY, weights=None, device=device, backend="triton")
    x = torch.randn(2, 3, 40, 40, device=device)
    expected = engine(x)
    times = layer_times(engine, x, repeats=2)
    assert times.method == "graph" and list(times.kinds) == list(KINDS)
    plan = engine._model.plan(2, 40, 40)
    assert sum(d["launches"] for d in times.kinds.values()) == len(plan.launches)
    assert all((d["ms"] > 0) == (d["launches"] > 0) for d in times.kinds.values())
    assert sum(times.ms().values()) == pytest.approx(times.forward_ms, rel=0.2)
    assert torch.equal(engine(x), expected)
    entry = roofline_entry(TINY, "tiny", 2, 40, "float32", 4, 1e12, 1e11)
    text = table(times.kinds, entry["kinds"])
    assert text.splitlines()[0].split()[:3] == ["kind", "launches", "ms"] and "% floor" in text
    with pytest.raises(ValueError, match="backend='triton'"):
        layer_times(densetriton.load(TINY, weights=None, device="cpu", backend="reference"), x.cpu())
    with pytest.raises(ValueError, match="unknown per-kind timing method 'events'"):
        layer_times(engine, x, method="events")


class FakeTime:
    """A clock that only launches move: each launch of kind K adds COST[K] ms."""

    COST = {"stem": 3.0, "dense_1x1": 5.0, "dense_3x3": 7.0, "transition": 11.0, "head": 13.0}

    def __init__(self):
        self.now = 0.0


class FakeEvent:
    def __init__(self, time):
        self.time, self.t = time, None

    def record(self):
        self.t = self.time.now

    def elapsed_time(self, end):
        return end.t - self.t


class CountingClock(LT.HostClock):
    """The host clock on fake time, counting what each capture holds (and checking it runs nothing)."""

    def __init__(self, time, counts):
        self.time, self.counts, self.captured = time, counts, []

    def event(self, in_graph=False):
        return FakeEvent(self.time)

    def capture(self, ops):
        before = list(self.counts)
        graph = super().capture(ops)
        assert self.counts == before, "capturing must not run a launch"
        self.captured.append(len(graph.ops))
        return graph


def _counted_plan(engine, x):
    """The plan for x with every launch wrapped: counts per launch, the kinds in call order, fake time."""
    plan = engine._model.plan(*x.shape[:1], *x.shape[2:])
    counts, order, time = [0] * len(plan.launches), [], FakeTime()

    def counted(i, stage, launch):
        def run(x_, logits):
            counts[i] += 1
            order.append(stage_kind(stage))
            time.now += FakeTime.COST[stage_kind(stage)]
            launch(x_, logits)

        return run

    plan.launches = [(stage, counted(i, stage, launch)) for i, (stage, launch) in enumerate(plan.launches)]
    return plan, counts, order, time


@pytest.mark.parametrize("method", LT.METHODS)
def test_every_method_runs_each_launch_once_per_forward_in_order_and_computes_the_forward(method):
    """Each timed forward runs every launch exactly once, in the plan's order (ablation: the forward
    without each kind in turn, then the whole forward), and leaves the same logits and features
    as a plain forward (buffers and logits poisoned with NaN first); each kind gets exactly its
    own launches' time (a fake clock that only launches move), and the graph methods capture what
    they should: one graph of every launch and an event per kind boundary, the whole graph and one
    without each kind, or one graph per run of one kind. Fails if a launch is dropped, repeated,
    replayed out of order, run while capturing, or its time given to another kind."""
    torch.manual_seed(3)
    engine = densetriton.load(TINY, weights=None, device="cpu", backend="triton")
    x = torch.randn(2, 3, 40, 40)
    expected_logits, expected_features = engine(x), engine.features(x)
    plan, counts, order, time = _counted_plan(engine, x)
    clock = CountingClock(time, counts)
    with torch.inference_mode():  # the plan's buffers are inference tensors
        logits = torch.full((2, TINY.num_classes), float("nan"))
        for t in [*plan.arenas, plan.features] + ([plan.scratch] if plan.scratch is not None else []):
            t.fill_(float("nan"))
        per_forward = LT.kind_ms_per_forward(plan, x, logits, clock, method, repeats=2)
    kinds = [stage_kind(stage) for stage, _ in plan.launches]
    present = list(dict.fromkeys(kinds))
    if method == "ablation":
        assert counts == [2 * len(present)] * len(kinds)
        assert order == ([k for left_out in present for k in kinds if k != left_out] + kinds) * 2
    else:
        assert counts == [2] * len(kinds)
        assert order == kinds * 2
    assert torch.equal(logits, expected_logits) and torch.equal(plan.features, expected_features)
    own = {k: FakeTime.COST[k] * kinds.count(k) for k in KINDS}
    assert per_forward == [own, own]
    segments = LT.kind_segments(plan.launches)
    assert [k for k, _ in segments] == ["stem", "dense_1x1", "dense_3x3"] * 1 + ["dense_1x1", "dense_3x3"] + [
        "transition"
    ] + ["dense_1x1", "dense_3x3"] * 3 + ["head"]
    expected_captures = {
        "graph": [len(kinds) + len(segments) + 1],  # launches and events, one graph
        "ablation": [len(kinds) - kinds.count(k) for k in present] + [len(kinds)],
        "kind-graphs": [len(launches) for _, launches in segments],
        "launches": [],
    }
    assert clock.captured == expected_captures[method]


def test_a_torch_without_timing_events_inside_graphs_falls_back_to_ablation():
    """torch.cuda.Event(external=...) is missing on older torch (TypeError): the kinds are then
    timed by ablation (no event inside a graph), the record says so, and a warning says why."""

    class NoEventsInGraphs(CountingClock):
        def event(self, in_graph=False):
            if in_graph:
                raise TypeError("__new__() got an unexpected keyword argument 'external'")
            return super().event()

    torch.manual_seed(4)
    engine = densetriton.load(TINY, weights=None, device="cpu", backend="triton")
    x = torch.randn(1, 3, 40, 40)
    plan, counts, _, time = _counted_plan(engine, x)  # fake time: the kinds' own costs, free of noise
    with pytest.warns(UserWarning, match="graph failed .*external.*trying the next method"):
        times = layer_times(engine, x, repeats=1, clock=NoEventsInGraphs(time, counts))
    kinds = [stage_kind(stage) for stage, _ in plan.launches]
    assert times.method == "ablation"
    assert times.ms() == {k: FakeTime.COST[k] * kinds.count(k) for k in KINDS}


def test_the_command_takes_a_grayscale_weights_file(tmp_path, capsys):
    from densetriton.bench.layer_times import main

    spec = TINY.replace(in_channels=1)
    path = tmp_path / "gray.safetensors"
    torch.manual_seed(1)
    densetriton.save_weights(path, densetriton.engine.random_weights(spec).tensors, spec)
    assert main(["--model", str(path), "--batch-size", "1", "--image-size", "40", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 1, 40, 40)" in out and "timed per kind by: graph" in out and "whole forward" in out


@pytest.mark.parametrize("method", [None, *LT.METHODS])
def test_the_report_sets_each_kind_against_its_floor_and_says_how_they_were_timed(method):
    """The per-kind table: each kind's floor against densetriton's time, the kinds' sum against the
    record's median, and how the times were taken (a record without kinds_method predates it: launch
    by launch); the schema accepts each method and nothing else."""
    jsonschema = pytest.importorskip("jsonschema")
    from densetriton.bench.schema import RECORD
    from test_bench_report import record, synthetic_doc

    doc = synthetic_doc()
    doc["roofline"] = [roofline_entry(get_spec("densenet121"), "densenet121", 64, 224, "float16", 2, 7e14, 3e12)]
    kinds_ms = {k: 2 * d["floor_ms"] for k, d in doc["roofline"][0]["kinds"].items()}  # every kind at 50% of its floor
    median = sum(kinds_ms.values()) / 0.95
    extra = {} if method is None else {"kinds_method": method}
    doc["results"].append(record("densetriton", 64, median, kinds_ms=kinds_ms, **extra))
    doc["results"] = [
        r for r in doc["results"] if not (r["peer"] == "densetriton" and r["batch"] == 64 and "kinds_ms" not in r)
    ]
    jsonschema.validate(doc["results"][-1], RECORD)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc["results"][-1], "kinds_method": "events"}, RECORD)
    md = report.markdown(doc, None)
    assert "| kind | GMACs |" in md and "densetriton ms | % of floor |" in md
    for kind in KINDS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {kind} |"))
        assert row.rstrip().endswith("| 50.0% |"), row
    sum_row = next(line for line in md.splitlines() if line.startswith("| sum |"))
    assert sum_row.count("|") == md.splitlines()[md.splitlines().index(sum_row) - 1].count("|")
    assert sum_row.rstrip().endswith("| 95% of the median |"), sum_row
    assert report.KINDS_METHOD_TEXT[method or "launches"] in md
