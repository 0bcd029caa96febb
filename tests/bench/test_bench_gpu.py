"""The bench's CUDA paths (events, device memory, the triton peer); skipped without CUDA."""

import json
import time

import pytest
import torch
from densetriton.bench import timing as T

from densetriton.cli import main

pytestmark = pytest.mark.gpu


def test_cuda_event_times_agree_with_the_wall_clock():
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    timer = T.Timer(dev)
    timer.time(lambda x: x @ x, [a], repeats=3, warmup=3)
    t = time.perf_counter()
    times = timer.time(lambda x: x @ x, [a], repeats=20)
    wall_ms = (time.perf_counter() - t) * 1e3
    assert len(times) == 20 and min(times) > 0
    assert 0.5 * wall_ms < sum(times) <= 1.05 * wall_ms + 1.0


def test_tiny_gpu_run(tmp_path, cache_home):
    rc = main(
        [
            "--debug",
            "bench",
            "--device",
            "cuda",
            "--model",
            "densenet121",
            "--image-size",
            "64",
            "--batch-size",
            "1",
            "4",
            "--dtype",
            "float16",
            "--repeats",
            "5",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--peers",
            "densetriton",
            "torchvision-eager-fp32",
            "torchvision-eager-fp16-cl",
        ]
    )
    assert rc == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["device"] == torch.cuda.get_device_name()
    assert doc["machine"]["matmul_flops_per_s"]["float16"] > 1e12
    recs = {(r["peer"], r["batch"]): r for r in doc["results"]}
    weights_fp16 = 2 * 7_978_856  # densenet121's parameters
    for b in (1, 4):
        fp16 = recs[("torchvision-eager-fp16-cl", b)]
        assert fp16["peak_mem_kind"] == "cuda_max_allocated"
        assert weights_fp16 < fp16["peak_mem_bytes"] < 2**30
        assert 0 < fp16["max_rel_err"] < 5e-2
        # The fp32 peer runs cuDNN's default TF32 convolutions (fp16's 10-bit mantissa) and the bench's
        # centred classifier keeps logits near zero: a CPU emulation of TF32 rounding gave ~1e-2.
        assert recs[("torchvision-eager-fp32", b)]["max_rel_err"] < 2e-2
        assert len(fp16["times_ms"]) == 5
    # the triton peer either ran or says why not; it is never silently missing
    for b in (1, 4):
        if ("densetriton", b) in recs:
            r = recs[("densetriton", b)]
            assert r["backend"] == "triton" and r["max_rel_err"] < 5e-2
        else:
            assert any(s["peer"] == "densetriton" and s.get("batch") == b for s in doc["skipped"])


def test_the_kinds_timed_inside_one_graph_add_up_to_the_forward(cache_home):
    """Issue 17 item 7's target: per-kind times taken inside one CUDA graph add up to within 10% of
    the whole forward's median as the bench times it (stem launch, graph replay, classifier), at
    batch 1 (launch-bound) and 64. Each method's sum is printed for the log."""
    from densetriton.bench.layer_times import METHODS, layer_times

    import densetriton

    engine = densetriton.load("densenet121", weights=None, device="cuda", dtype=torch.float16, backend="triton")
    for batch in (1, 64):
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
        whole = T.summarize(T.Timer(engine.device).time(engine, [x], repeats=30, warmup=5))["median_ms"]
        sums = {}
        for method in METHODS:
            times = layer_times(engine, x, repeats=10, method=method)
            sums[method] = (times.method, sum(times.ms().values()))
        print(f"densenet121 float16 batch {batch}: whole forward {whole:.4g} ms; kinds' sum by method {sums}")
        method, total = sums["graph"]
        assert method == "graph", sums
        assert 0.9 * whole <= total <= 1.1 * whole, (batch, whole, sums)


def test_tune_writes_the_table_a_new_engine_reads(cache_home, capsys):
    """`densetriton tune` on this GPU, 20 s of budget: the table lands in the cache under this GPU's
    and triton's name, tiles.py reads it, and an engine created afterwards holds it and still
    matches the reference backend."""
    import densetriton
    from densetriton.tiles import load_tuned_table

    assert main(["tune", "--model", "densenet121", "--batch-size", "1", "--budget-s", "20", "--repeats", "5"]) == 0
    out = capsys.readouterr().out
    print(out)
    path = out.strip().splitlines()[-1].split()[1]
    table = load_tuned_table(path)
    assert "timed" in out and path.startswith(str(cache_home))
    engine = densetriton.load("densenet121", weights=None, device="cuda", dtype=torch.float16, backend="triton")
    assert engine._model.tuned is not None and str(engine._model.tuned.path) == path
    reference = densetriton.Engine(
        engine.weights, device=engine.device, dtype=torch.float32, backend="reference", pretrained=False
    )
    x = torch.randn(1, 3, 224, 224, device="cuda")
    got, want = engine(x.half()).double(), reference(x).double()
    assert ((got - want).norm() / want.norm()).item() < 2e-2, len(table.entries)
