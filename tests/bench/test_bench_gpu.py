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
    rc = main(["--debug", "bench", "--device", "cuda", "--model", "densenet121", "--image-size", "64", "--batch-size", "1", "4",
               "--dtype", "float16", "--repeats", "5", "--no-progress", "--out", str(tmp_path),
               "--peers", "densetriton", "torchvision-eager-fp32", "torchvision-eager-fp16-cl"])
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
