"""`densetriton tune` (bench/tune.py): the layer shapes a plan tiles, the candidates, the sweep
(output check before timing, the budget, the margin) and the table it writes, read back by
densetriton.tiles. The sweep runs real kernels under Triton's interpreter on a tiny layer; only
the clock and the launch timer are stand-ins where a test needs them deterministic."""

import json

import pytest
import torch
from densetriton.bench import tune as T

import densetriton
import densetriton.plan
from densetriton import DenseNetSpec
from densetriton.cli import main
from densetriton.tiles import GEMM_OPS, LayerKey, choose_tiles, find_tuned_table, load_tuned_table
from densetriton.tuning import check_candidate
from densetriton.variants import parse_kernel_choice

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A 3x3 layer small enough for the interpreter: 1 image, 4x4 pixels, 16 -> 16 channels.
KEY = LayerKey("conv3x3", "v1", "float32", 1, 4, 4, 16, 16, 3)
GOOD = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
WRONG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize(
    "spec,size,kernels",
    [
        (DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet"), 40, "v1"),
        (DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet"), 37, "v2"),
        (DenseNetSpec(4, (2, 2), 8, None, 0.5, 0, "cifar"), 12, "conv3x3=v2"),
    ],
    ids=["imagenet-bottleneck", "imagenet-bottleneck-all-v2-odd-size", "cifar-plain-backbone-v2"],
)
def test_layer_keys_are_the_keys_the_plan_tiles_its_launches_with(spec, size, kernels, monkeypatch):
    """The sweep tunes exactly the shapes a plan looks up (so its entries are ever used): the keys
    the plan passes to choose_tiles while it binds its launches, in order, GEMM ops only."""
    seen = []
    real = densetriton.plan.choose_tiles

    def spy(key, **kw):
        seen.append(key)
        return real(key, **kw)

    monkeypatch.setattr(densetriton.plan, "choose_tiles", spy)
    monkeypatch.setenv("DENSETRITON_KERNELS", kernels)
    engine = densetriton.load(spec, weights=None, device="cpu", dtype=torch.float32, backend="triton")
    engine._model.plan(3, size, size)
    expected = T.layer_keys(spec, 3, size, size, "float32", parse_kernel_choice(kernels))
    # Sizing the split-K workspace looks up the dense layers' convs first: the engine's planned
    # bytes, then the plan's own; then the plan binds every launch.
    sizing = [k for k in expected if k.op in ("conv1x1", "conv3x3")]
    assert [k for k in seen if k.op in GEMM_OPS] == sizing + sizing + expected
    assert len(expected) >= 5 and any(k.variant == "v2" for k in expected) == (kernels != "v1")


def test_candidates_start_with_the_current_tiles_and_change_one_axis_each():
    key = LayerKey("conv3x3", "v1", "float16", 1, 7, 7, 128, 32, 3)
    current = choose_tiles(key, interpreted=False)
    candidates = T.candidate_tiles(key)
    assert candidates[0] == current and len(candidates) == len({json.dumps(c, sort_keys=True) for c in candidates})
    base = {"num_warps": 4, "num_stages": 3, **current}
    for c in candidates[1:]:
        assert set(c) == set(base) and sum(c[k] != base[k] for k in base) == 1, c
        assert c["BLOCK_N"] <= 32 and c["BLOCK_K"] <= 128 and all(c[a] >= 16 for a in T.BLOCK_AXES)
    assert {c["BLOCK_M"] for c in candidates} >= {16, 32, 128} and {c["num_stages"] for c in candidates[1:]} == {
        2,
        3,
        4,
    }


def test_split_k_candidates_halve_and_double_the_split_and_pass_the_check():
    """A v2 3x3 at batch 1 (heuristic split 4): candidates with 2 and 8 splits, each a valid launch
    whose output matches v1's (workspace given as a plan gives it), in the interpreter."""
    key = LayerKey("conv3x3", "v2", "float16", 1, 7, 7, 128, 32, 3)
    assert choose_tiles(key, interpreted=False)["SPLIT_K"] == 4
    splits = {c.get("SPLIT_K", 1) for c in T.candidate_tiles(key)}
    assert splits == {2, 4, 8}
    small = LayerKey("conv3x3", "v2", "float32", 1, 3, 3, 40, 16, 3)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=4)
    assert check_candidate(small, tiles, device="cpu") < 1e-5


def _wrong_for(monkeypatch, tiles, calls):
    """The conv launcher, except under `tiles`: then it leaves the last output channel unwritten
    (a kernel bug some tiles could trigger). Counts every launch per tiles."""
    from densetriton import kernels

    real = kernels.bn_relu_conv

    def launcher(x, weight, out, **kw):
        chosen = {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw}
        calls.append(chosen)
        if all(tiles[k] == v for k, v in chosen.items()):
            return real(x, weight[:, :-1], out[..., :-1], **{**kw, "bias": None})
        return real(x, weight, out, **kw)

    monkeypatch.setattr(kernels, "bn_relu_conv", launcher)


def test_the_sweep_rejects_a_wrong_candidate_before_timing_it_and_writes_a_table_tiles_reads(monkeypatch, tmp_path):
    """Two candidates on a real (interpreted) layer: the one whose kernel leaves a channel
    unwritten is rejected by the output check (the output starts as NaN) and never timed; the
    right one is timed and, faster than the current tiles by more than the margin, enters the
    table, which densetriton.tiles finds and reads back for that layer. Fails if the check is
    skipped, if the poison is not there, or if a rejected candidate is timed."""
    calls, timed = [], []
    _wrong_for(monkeypatch, WRONG, calls)
    current = choose_tiles(KEY, interpreted=False)
    ms = {
        json.dumps(current, sort_keys=True): 1.0,
        json.dumps(GOOD, sort_keys=True): 0.5,
        json.dumps(WRONG, sort_keys=True): 0.1,
    }  # the wrong one would win if it were timed

    def build(key, tiles, device):
        from densetriton.tuning import build_candidate

        run = build_candidate(key, tiles, device=device)
        run.tiles = tiles
        return run

    def timer(run, repeats, device):
        timed.append(run.tiles)
        return [ms[json.dumps(run.tiles, sort_keys=True)]] * repeats

    result = T.sweep([KEY, KEY], device=DEVICE, candidates=lambda key: [current, WRONG, GOOD], build=build, timer=timer)
    status = {json.dumps(t.tiles, sort_keys=True): t for t in result.trials}
    assert [t.status for t in result.trials] == ["timed", "rejected", "timed"]  # one key, its three candidates
    wrong = status[json.dumps(WRONG, sort_keys=True)]
    assert wrong.error == float("inf") and "relative error" in wrong.reason and WRONG not in timed
    assert calls.count({k: WRONG[k] for k in T.BLOCK_AXES}) == 1  # launched once, for the check
    assert status[json.dumps(GOOD, sort_keys=True)].error < T.TOLERANCE["float32"]
    assert result.winners == {KEY: GOOD}
    path = T.write_table(tmp_path, "NVIDIA Test GPU", "3.6.1", result.winners)
    assert path.name == "nvidia-test-gpu-triton3.6.json"
    table = find_tuned_table("NVIDIA Test GPU", "3.6.0", [tmp_path])
    assert table.get(KEY) == GOOD and choose_tiles(KEY, interpreted=False, tuned=table) == GOOD
    assert "1 rejected by the output check" in T.summary(result) and "relative error inf" in T.summary(result)


def test_the_margin_keeps_the_current_tiles_when_a_candidate_is_barely_faster():
    key_trials = [
        T.Trial(KEY, {"BLOCK_M": 64}, "timed", 0.0, 1.0),
        T.Trial(KEY, GOOD, "timed", 0.0, 0.99),
        T.Trial(KEY, WRONG, "rejected", float("inf")),
    ]
    assert T.winner(key_trials) is None
    key_trials[1].ms = 0.9
    assert T.winner(key_trials) == GOOD
    key_trials[0].status = "failed"  # the current tiles did not build: any checked candidate is better
    key_trials[1].ms = 1.5
    assert T.winner(key_trials) == GOOD
    assert T.winner([T.Trial(KEY, GOOD, "not run")]) is None


def test_the_budget_is_honoured_and_what_was_measured_is_kept():
    """No candidate starts once --budget-s is spent (a clock that each timed candidate moves by
    10 s): with 15 s, two candidates run and the rest of this key and every other key are listed
    as not run; with 0 s nothing runs, not even a reference."""
    now = [0.0]
    built = []

    def build(key, tiles, device):
        built.append(tiles)
        return lambda: torch.ones(1)

    def timer(run, repeats, device):
        now[0] += 10.0
        return [1.0] * repeats

    other = LayerKey("conv1x1", "v1", "float32", 1, 4, 4, 16, 16, 1)
    candidates = lambda key: [{"BLOCK_M": 16}, {"BLOCK_M": 32}, {"BLOCK_M": 64}]  # noqa: E731
    result = T.sweep(
        [KEY, other], device="cpu", budget_s=15, candidates=candidates, build=build, timer=timer, clock=lambda: now[0]
    )
    assert [(t.key.op, t.status) for t in result.trials] == [
        ("conv3x3", "timed"),
        ("conv3x3", "timed"),
        ("conv3x3", "not run"),  # heaviest first
        ("conv1x1", "not run"),
        ("conv1x1", "not run"),
        ("conv1x1", "not run"),
    ]
    assert len(built) == 3  # the reference and the two candidates
    built.clear()
    nothing = T.sweep(
        [KEY], device="cpu", budget_s=0, candidates=candidates, build=build, timer=timer, clock=lambda: now[0]
    )
    assert {t.status for t in nothing.trials} == {"not run"} and built == [] and nothing.winners == {}
    assert "3 not run (budget or interrupt)" in T.summary(nothing) and not nothing.interrupted


def test_an_interrupt_stops_the_sweep_and_keeps_what_was_measured():
    """Ctrl-C (or gpu_run.sh's SIGINT at its limit) during a candidate: the sweep stops starting
    candidates, lists the rest as interrupted, and returns what it measured (the command then
    writes the table and exits 130)."""
    calls = []

    def timer(run, repeats, device):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [2.0 if len(calls) == 1 else 1.0] * repeats

    other = LayerKey("conv1x1", "v1", "float32", 1, 4, 4, 16, 16, 1)
    result = T.sweep(
        [KEY, other],
        device="cpu",
        candidates=lambda key: [{"BLOCK_M": 16}, {"BLOCK_M": 32}, GOOD],
        build=lambda key, tiles, device: lambda: torch.ones(1),
        timer=timer,
    )
    assert [(t.status, t.reason) for t in result.trials] == [
        ("timed", None),
        ("timed", None),
        ("not run", "interrupted"),
        ("not run", "interrupted"),
        ("not run", "interrupted"),
        ("not run", "interrupted"),
    ]
    assert result.interrupted and result.winners == {KEY: {"BLOCK_M": 32}}


def test_writing_merges_with_the_table_there_and_refuses_a_malformed_one(tmp_path):
    other = LayerKey("conv1x1", "v1", "float32", 1, 4, 4, 16, 16, 1)
    path = tmp_path / "table.json"
    T.write_table(path, "NVIDIA Test GPU", "3.6.0", {KEY: GOOD})
    T.write_table(path, "NVIDIA Test GPU", "3.6.0", {other: WRONG})
    table = load_tuned_table(path)
    assert table.get(KEY) == GOOD and table.get(other) == WRONG
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a densetriton-tuned-tiles"):
        T.write_table(path, "NVIDIA Test GPU", "3.6.0", {KEY: GOOD})
    assert path.read_text() == '{"format": "something else"}'  # left as it was


def test_the_command_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/bench/test_bench_gpu.py runs the command")
    assert main(["tune", "--model", "densenet121", "--batch-size", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("densetriton: error: tune times kernels on a CUDA GPU") and len(err.strip().splitlines()) == 1
