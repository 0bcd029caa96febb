"""`densetriton bench` end to end on the CPU, on a setting small enough for CI."""

import datetime
import json
import re

import pytest
import torch
from densetriton.bench import peers as P
from densetriton.bench import roofline as R
from densetriton.bench.run import resolve
from densetriton.bench.schema import RESULTS

from densetriton.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RUN = [
    "bench",
    "--quick",
    "--model",
    "densenet121",
    "--image-size",
    "64",
    "--batch-size",
    "1",
    "2",
    "--repeats",
    "2",
    "--no-progress",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real run, shared by the tests below; it records every input the peers were given."""
    out = tmp_path_factory.mktemp("bench-out")
    seen = []
    build = P.build

    def recording_build(peer, *a, **k):
        built = build(peer, *a, **k)
        fn = built.fn

        def wrapped(x):
            seen.append((peer, x))
            return fn(x)

        built.fn = wrapped
        return built

    mp = pytest.MonkeyPatch()
    mp.setattr(P, "build", recording_build)
    mp.setenv("DENSETRITON_HOME", str(out / "cache"))  # no pretrained file: calibrated random weights
    try:
        import contextlib
        import io

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = main(TINY_RUN + ["--out", str(out)])
    finally:
        mp.undo()
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return {"rc": rc, "out": out, "files": files, "stdout": stdout.getvalue(), "seen": seen}


def test_quick_run_writes_valid_json_markdown_and_chart(quick_run):
    assert quick_run["rc"] == 0
    stems = {re.fullmatch(r"(\d{4}-\d\d-\d\d-cpu)\.(json|md|png)", f).group(1) for f in quick_run["files"]}
    assert len(stems) == 1 and len(quick_run["files"]) == 3, quick_run["files"]
    stem = quick_run["out"] / stems.pop()
    doc = json.loads(stem.with_suffix(".json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, RESULTS)
    assert doc["device"] == "cpu" and doc["torch"] == torch.__version__ and doc["complete"] is True
    created = datetime.datetime.fromisoformat(doc["created"])  # the schema checks no date format
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    assert stem.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert f"]({stem.name}.png)" in stem.with_suffix(".md").read_text()


def test_quick_run_records(quick_run):
    doc = json.loads(next(quick_run["out"].glob("*.json")).read_text())
    recs = {(r["peer"], r["batch"]): r for r in doc["results"]}
    assert set(recs) == {(p, b) for p in P.CPU_PEERS for b in (1, 2)}
    for r in recs.values():
        assert r["image_size"] == 64 and r["dtype"] == "bfloat16" and r["model"] == "densenet121"
        assert len(r["times_ms"]) == 2 == r["repeats"]
        assert r["median_ms"] == pytest.approx(sum(r["times_ms"]) / 2)
        assert r["p90_ms"] >= r["median_ms"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
        assert r["cold_start_s"] > 0 and r["peak_mem_bytes"] > 0
        assert 0 <= r["top1_agree"] <= 1
        entry = next(e for e in doc["roofline"] if e["batch"] == r["batch"])
        assert r["floor_ms"] == entry["floor_ms"] > 0
        # the floor comes from the rates this run timed on this machine
        rates = doc["machine"]
        assert rates["copy_bytes_per_s"] > 0 and rates["matmul_flops_per_s"]["bfloat16"] > 0
        assert entry["floor_ms"] == pytest.approx(
            R.floor_ms(
                entry["macs"], entry["bytes"], rates["matmul_flops_per_s"]["bfloat16"], rates["copy_bytes_per_s"]
            )
        )
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["median_ms"])
    dt = recs[("densetriton", 1)]
    assert dt["backend"] == "reference" and dt["peer_dtype"] == "bfloat16" and dt["planned_mem_bytes"] is None
    # same weights and inputs as the float32 reference: torchvision float32 matches it exactly,
    # the bfloat16 peers are close but not equal
    assert recs[("torchvision-eager-fp32", 2)]["max_rel_err"] < 1e-5
    assert 1e-4 < dt["max_rel_err"] < 0.3
    assert recs[("torchvision-eager-fp16-cl", 1)]["peer_dtype"] == "bfloat16"
    skipped = {s["peer"]: s["reason"] for s in doc["skipped"]}
    assert set(skipped) == {*P.COMPILE_MODES, "onnxruntime"}
    assert all("--peers" in skipped[peer] for peer in P.COMPILE_MODES) and "GPU only" in skipped["onnxruntime"]
    assert any("reference backend" in n for n in doc["notes"])


def test_quick_run_never_times_zeros_and_rotates_fresh_inputs(quick_run):
    seen = quick_run["seen"]
    peers = {p for p, _ in seen}
    assert peers == set(P.CPU_PEERS)
    for peer in peers:
        xs = [x for p, x in seen if p == peer and x.shape[0] == 2]
        distinct = {x.float().sum().item() for x in xs}
        assert len(distinct) >= 2  # several inputs, rotated
        for x in xs:
            assert x.float().std() > 0.5 and x.abs().max() > 1  # random normal images, never zeros


def test_quick_run_prints_the_table(quick_run):
    out = quick_run["stdout"]
    assert "densenet121 64x64, bfloat16 run on cpu" in out
    for peer in P.CPU_PEERS:
        assert peer in out
    assert "skipped torch-compile-max-autotune" in out and "wrote " in out


def test_budget_skips_every_record_but_still_writes_valid_files(tmp_path, capsys, cache_home):
    assert main(TINY_RUN + ["--out", str(tmp_path), "--budget-s", "0", "--peers", "torchvision-eager-fp32"]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["results"] == []
    assert [s["batch"] for s in doc["skipped"]] == [1, 2]
    assert all("budget" in s["reason"] for s in doc["skipped"])
    assert (next(tmp_path.glob("*.png")).read_bytes()[:8]) == PNG_MAGIC


def test_a_failing_peer_is_listed_and_the_others_keep_their_results(tmp_path, monkeypatch, capsys, cache_home):
    build = P.build

    def failing_build(peer, *a, **k):
        if peer == "torchvision-eager-fp32":
            raise RuntimeError("boom while building")
        return build(peer, *a, **k)

    monkeypatch.setattr(P, "build", failing_build)
    assert main(TINY_RUN + ["--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["complete"] is True
    assert sorted((r["batch"], r["peer"]) for r in doc["results"]) == [
        (b, p) for b in (1, 2) for p in ("densetriton", "torchvision-eager-fp16-cl")
    ]
    failed = [s for s in doc["skipped"] if s["peer"] == "torchvision-eager-fp32"]
    assert sorted(s["batch"] for s in failed) == [1, 2] and all("boom while building" in s["reason"] for s in failed)


def test_an_interrupted_run_keeps_its_records_and_lists_what_it_did_not_run(tmp_path, monkeypatch, cache_home):
    from densetriton.bench import run as R

    measure, calls = R.measure_peer, []

    def interrupted_measure(peer, *a, **k):
        calls.append(peer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(peer, *a, **k)

    monkeypatch.setattr(R, "measure_peer", interrupted_measure)
    assert main(TINY_RUN + ["--out", str(tmp_path)]) == 130  # as a shell reports SIGINT
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["complete"] is False and len(doc["results"]) == 1
    not_run = {(s["batch"], s["peer"]) for s in doc["skipped"] if "interrupted" in s["reason"]}
    # batch 1: the second and third peers; batch 2: all three
    assert len(not_run) == 5 and (doc["results"][0]["batch"], doc["results"][0]["peer"]) not in not_run


def test_a_record_interrupted_while_compiling_keeps_the_time_it_had_used(monkeypatch):
    """SIGINT (gpu_run.sh's time limit) in the middle of a peer's build, e.g. a max-autotune compile
    that cannot finish: that record's skipped entry says how long it had run and that it had no
    first result yet (elapsed_s, schema-valid), and the interrupt goes on to end the run (whose
    handler lists the records not reached, see the test above)."""
    import time

    from densetriton.bench import run as R
    from densetriton.bench.record import RecordInterrupted
    from densetriton.bench.schema import SKIPPED

    def compiling(peer, *a, **k):
        time.sleep(0.3)
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "build", compiling)
    s = resolve(build_parser().parse_args(["bench", "--quick", "--device", "cpu", "--image-size", "64"]))
    doc = {"skipped": [], "results": []}
    bar = type("Bar", (), {"update": lambda self: None, "write": lambda self, *a, **k: None})()
    bench = R.BenchRun(s, doc, lambda: None, bar, ["torch-compile-max-autotune"])
    pool = [torch.randn(1, 3, 64, 64)]
    with pytest.raises(RecordInterrupted) as info:
        bench.record("densenet121", 1, "bfloat16", "torch-compile-max-autotune", None, pool, pool, {"floor_ms": 1.0})
    assert isinstance(info.value, KeyboardInterrupt)  # the run's own handler still sees an interrupt
    (cut,) = doc["skipped"]
    pytest.importorskip("jsonschema").validate(cut, SKIPPED)
    assert cut["peer"] == "torch-compile-max-autotune" and cut["batch"] == 1 and 0.3 <= cut["elapsed_s"] < 30
    assert re.fullmatch(
        r"interrupted after \d+\.\d s of this record, before its first result \(building, compiling\)", cut["reason"]
    ), cut["reason"]
    assert ("densenet121", 1, "bfloat16", "torch-compile-max-autotune") in bench.done and doc["results"] == []


def test_default_settings_are_the_issues(monkeypatch):
    """What a bare command measures: on a GPU densenet121 and 201, batches 1/8/64/256, float16,
    224, every peer; `--quick` on a CPU (the README's main job) densenet121, batches 1 and 2,
    224, bfloat16 (float16 is emulated there)."""

    def settings(*argv):
        return resolve(build_parser().parse_args(["bench", *argv]))

    quick = settings("--quick", "--device", "cpu")
    assert (quick.models, quick.batches, quick.image_size, quick.dtypes) == (["densenet121"], [1, 2], 224, ["bfloat16"])
    assert quick.quick and quick.peers == list(P.PEERS) and not quick.peers_named
    full = settings("--device", "cpu")
    assert (full.models, full.batches, full.image_size, full.dtypes) == (
        ["densenet121", "densenet201"],
        [1, 8, 64, 256],
        224,
        ["bfloat16"],
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU machine gets
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = settings()
    assert str(gpu.device) == "cuda:0" and not gpu.quick
    assert (gpu.models, gpu.batches, gpu.image_size, gpu.dtypes) == (
        ["densenet121", "densenet201"],
        [1, 8, 64, 256],
        224,
        ["float16"],
    )
    assert gpu.peers == [
        "densetriton",
        "torchvision-eager-fp32",
        "torchvision-eager-fp16-cl",
        "torch-compile-default",
        "torch-compile-reduce-overhead",
        "torch-compile-max-autotune",
        "onnxruntime",
    ]
    assert gpu.kinds_method == "graph" and settings("--kinds-method", "launches").kinds_method == "launches"


def test_parser_and_errors(capsys, tmp_path):
    args = build_parser().parse_args(
        ["bench", "--model", "densenet121", "--model", "densenet201", "--batch-size", "1", "8"]
    )
    assert (
        args.model == ["densenet121", "densenet201"]
        and args.batch_size == [1, 8]
        and args.func.__module__.endswith("bench.cli")
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--peers", "tensorrt"])
    capsys.readouterr()
    assert main(["bench", "--batch-size", "0", "--out", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("densetriton: error:") and "batch-size" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "--image-size", "8", "--out", str(tmp_path), "--device", "cpu"]) == 1
    assert "too small" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written for a rejected command
