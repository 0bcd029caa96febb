"""The bench's measuring pieces: timer, statistics, repeat policy, accuracy figures, names."""

import time

import pytest
import torch
from densetriton.bench import peers as P
from densetriton.bench import record
from densetriton.bench import run as R
from densetriton.bench import timing as T


def test_timer_times_each_call_with_rotated_inputs_and_skips_warmup():
    calls = []

    def fn(seconds):
        calls.append(seconds)
        time.sleep(seconds)

    inputs = [0.004, 0.03]
    times = T.Timer(torch.device("cpu")).time(fn, inputs, repeats=6, warmup=2)
    assert len(times) == 6 and len(calls) == 8
    assert calls == [0.004, 0.03] * 4  # warm-up first, then rotation in order
    for t, s in zip(times, inputs * 3):
        assert s * 1e3 <= t < s * 1e3 + 25, (t, s)  # ms, never shorter than the sleep
    short, long = times[0::2], times[1::2]
    assert max(short) < min(long)


def test_timer_start_offset_and_empty_inputs():
    seen = []
    T.Timer(torch.device("cpu")).time(seen.append, ["a", "b", "c"], repeats=4, start=1)
    assert seen == ["b", "c", "a", "b"]
    with pytest.raises(ValueError):
        T.Timer(torch.device("cpu")).time(seen.append, [], repeats=1)


def test_summarize_median_and_p90():
    s = T.summarize([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])  # order does not matter
    assert s["median_ms"] == pytest.approx(5.5)
    assert s["p90_ms"] == pytest.approx(9.1)  # rank 0.9 * 9 = 8.1: 9 + 0.1 * (10 - 9)
    assert T.summarize([4.0]) == {"median_ms": 4.0, "p90_ms": 4.0}
    s = T.summarize([1, 2, 3, 100])
    assert s["median_ms"] == pytest.approx(2.5) and s["p90_ms"] == pytest.approx(70.9)
    with pytest.raises(ValueError):
        T.summarize([])


def test_choose_repeats():
    assert T.choose_repeats(10.0, 1.0, 5, 200) == 100
    assert T.choose_repeats(10.0, 0.015, 5, 200) == 5  # at least lo
    assert T.choose_repeats(0.001, 1.0, 5, 200) == 200  # at most hi
    assert T.choose_repeats(3.0, 0.01, 1, 200) == 4  # rounds up
    assert T.choose_repeats(0.0, 1.0, 5, 200) == 200
    assert T.choose_repeats(float("nan"), 1.0, 5, 200) == 200


def test_pool_size():
    p = R.Policy(1, 2, 0.1, 0.0, min_images=64, min_pool=4, max_pool=16, roofline_repeats=1)
    assert [p.pool_size(b) for b in (1, 8, 64, 256)] == [16, 8, 4, 4]


def test_accuracy_max_relative_error_per_image_and_top1():
    ref = [torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    out = [torch.tensor([[3.0, 4.5], [0.0, 1.0]]), torch.tensor([[0.0, 2.0]])]
    err, top1 = record.accuracy(out, ref)
    # image 1: 0.5 / 5 = 0.1; image 2: sqrt(2) / 1; image 3: exact
    assert err == pytest.approx(2**0.5)
    assert top1 == pytest.approx(2 / 3)  # image 2's top class flips
    err, top1 = record.accuracy([torch.tensor([[3.0, 4.5]])], [torch.tensor([[3.0, 4.0]])])
    assert err == pytest.approx(0.1) and top1 == 1.0
    err, _ = record.accuracy([torch.tensor([[float("nan"), 1.0]])], [torch.tensor([[3.0, 4.0]])])
    assert err is None


def test_names_and_files(tmp_path):
    assert R.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert R.slug("cpu") == "cpu"
    assert R.output_stem(tmp_path, "cpu", "2025-01-02") == "2025-01-02-cpu"
    (tmp_path / "2025-01-02-cpu.json").write_text("{}")
    assert R.output_stem(tmp_path, "cpu", "2025-01-02") == "2025-01-02-cpu-2"
    (tmp_path / "2025-01-02-cpu-2.png").write_text("")
    assert R.output_stem(tmp_path, "cpu", "2025-01-02") == "2025-01-02-cpu-3"
    committed = tmp_path / "results"
    committed.mkdir()
    (committed / "2025-01-02-h100.md").write_text("")
    assert R.output_stem(tmp_path, "h100", "2025-01-02") == "2025-01-02-h100"
    assert R.output_stem(tmp_path, "h100", "2025-01-02", also=(committed,)) == "2025-01-02-h100-2"


def test_git_commit_is_a_sha_or_none(monkeypatch):
    monkeypatch.delenv("DENSETRITON_BENCH_COMMIT", raising=False)
    commit, dirty = R.git_commit()
    if commit is not None:
        assert len(commit) == 40 and int(commit, 16) >= 0 and isinstance(dirty, bool)
    # A commit named by the caller wins over whatever .git lies beside the code (a GPU host's copy).
    monkeypatch.setenv("DENSETRITON_BENCH_COMMIT", "AB" * 20)
    assert R.git_commit() == ("ab" * 20, None)
    monkeypatch.setenv("DENSETRITON_BENCH_COMMIT", "not-a-sha")
    assert R.git_commit()[0] == commit


def test_peer_dtypes_backends_and_skips():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert P.peer_dtype("densetriton", torch.float16, cuda) == torch.float16
    assert P.peer_dtype("torchvision-eager-fp32", torch.float16, cuda) == torch.float32
    assert P.peer_dtype("torchvision-eager-fp16-cl", torch.float32, cuda) == torch.float16
    assert P.peer_dtype("torch-compile-max-autotune", torch.bfloat16, cuda) == torch.bfloat16
    assert P.peer_dtype("torchvision-eager-fp16-cl", torch.float16, cpu) == torch.bfloat16
    assert P.peer_backend("densetriton", cpu) == "reference"
    assert P.peer_backend("densetriton", cuda) == "triton"
    assert P.peer_backend("torchvision-eager-fp32", cuda) is None
    assert "--peers" in P.skip_reason("torch-compile-default", cpu, named=False)
    assert P.skip_reason("torch-compile-default", cpu, named=True) is None
    assert P.skip_reason("torchvision-eager-fp16-cl", cpu, named=False) is None
    x = torch.randn(2, 3, 8, 8)
    y = P.prepare_input("torchvision-eager-fp16-cl", x, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert P.prepare_input("densetriton", x, torch.float16).dtype == torch.float16


def test_calibrated_random_weights_fit_the_spec_and_keep_activations_sane(tmp_path, cache_home):
    from densetriton.spec import get_spec

    w = P.prepare_weights("densenet121", tmp_path, seed=3, image_size=224)
    spec = get_spec("densenet121")
    assert set(w.tensors) == set(spec.state_dict_shapes())
    assert w.path.is_file() and "random" in w.source
    var = w.tensors["features.denseblock3.denselayer5.norm1.running_var"]
    assert not torch.allclose(var, torch.ones_like(var))  # calibrated, not the init's ones
    net = P.torchvision_model("densenet121", spec)
    P.load_weights_into(net, w.tensors)
    with pytest.raises(ValueError, match="missing"):
        P.load_weights_into(
            P.torchvision_model("densenet121", spec), {k: v for k, v in w.tensors.items() if k != "classifier.bias"}
        )
    x = P.bench_images(16, 224, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        logits = net.eval()(x)
    assert torch.isfinite(logits).all() and 1e-2 < logits.std() < 1e3
    # The logits depend on the input: several top-1 classes, and a peer that ignores its input
    # (one image's logits for all) is caught by both accuracy figures.
    assert logits.argmax(1).unique().numel() >= 4
    rel, agree = record.accuracy([logits[:1].expand_as(logits)], [logits])
    assert rel > 0.5 and agree < 0.5
