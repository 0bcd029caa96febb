"""The torch.compile peers built and run on the CPU, on a tiny DenseNet (seconds, not the minutes
densenet121 takes to compile here): what the GPU bench compares densetriton with."""

import os

import pytest
import torch
from densetriton.bench import peers as P

from densetriton import DenseNetSpec

SPEC = DenseNetSpec(8, (2, 2), 16, 2, 0.5, 5, "imagenet")


@pytest.fixture(scope="module")
def tiny_weights():
    tensors = P.calibrated_random_state_dict("tiny", SPEC, seed=3, image_size=64, calibration_size=32)
    return P.BenchWeights("tiny", SPEC, tensors, None, "random")


@pytest.mark.parametrize("peer", list(P.COMPILE_MODES))
def test_compile_peers_compile_into_fresh_caches_and_match_torchvision(peer, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users-inductor"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    x = P.bench_images(3, 64, generator=torch.Generator().manual_seed(5))
    cpu = torch.device("cpu")
    with torch.inference_mode():
        expected = P.build("torchvision-eager-fp32", tiny_weights, cpu, torch.float32).fn(x)
        dtype = P.peer_dtype(peer, torch.float16, cpu)
        assert dtype == torch.bfloat16  # float16 convolutions are emulated on the CPU
        saved = P.fresh_compile_caches(tmp_path / "fresh")
        try:
            built = P.build(peer, tiny_weights, cpu, dtype)
            x_peer = P.prepare_input(peer, x, dtype)
            assert x_peer.is_contiguous(memory_format=torch.channels_last) and x_peer.dtype == dtype
            logits = built.fn(x_peer)
        finally:
            P.restore_env(saved)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "users-inductor")
    assert "TRITON_CACHE_DIR" not in os.environ
    # Inductor wrote its compiled code into the fresh cache, not the user's.
    assert any((tmp_path / "fresh" / "inductor").rglob("*.py"))
    assert not (tmp_path / "users-inductor").exists()
    assert logits.dtype == dtype and logits.shape == (3, SPEC.num_classes)
    err = ((logits.float() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert err < 0.1, err  # bfloat16 against float32
    assert rel_err_between_images(expected) > 0.1  # the logits depend on the input: the check has teeth


def rel_err_between_images(logits):
    return ((logits[1:] - logits[:1]).norm(dim=1) / logits[:1].norm()).min().item()


def test_cuda_graph_modes_mark_a_new_step_before_each_call(monkeypatch):
    """reduce-overhead and max-autotune replay CUDA graphs (cudagraph trees), whose outputs the next
    call may overwrite: each call of those peers starts a new step, as torch.compiler's docs ask of
    an inference loop; the default mode does not. Fails if the step is not marked (or marked for
    the default mode, whose per-call cost would then be padded)."""
    marks, compiled = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch, "compile", lambda net, mode, dynamic: compiled.append((mode, dynamic)) or net)
    net = torch.nn.Linear(4, 2)
    for peer, mode in P.COMPILE_MODES.items():
        marks.clear()
        fn = P.compiled_peer(net, mode)
        x = torch.randn(3, 4)
        for _ in range(3):
            assert torch.equal(fn(x), net(x))
        assert len(marks) == (3 if mode in ("reduce-overhead", "max-autotune") else 0), peer
    assert compiled == [(mode, False) for mode in P.COMPILE_MODES.values()]
    assert "torch-compile-reduce-overhead" in P.PEERS and "torch-compile-reduce-overhead" not in P.CPU_PEERS


def test_the_onnxruntime_peer_runs_only_on_a_gpu_execution_provider(monkeypatch):
    """Skipped, with the reason, where onnxruntime is missing, has only CPU providers (the plain
    onnxruntime wheel), or cannot export; CUDA's provider preferred to TensorRT's."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    installed = {"onnxruntime", "onnxscript"}
    monkeypatch.setattr(P, "installed", lambda name: name in installed)
    providers = ["AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(P, "onnxruntime_providers", lambda: ("1.30.0", list(providers)))
    reason = P.skip_reason("onnxruntime", cuda, named=True)
    assert (
        "onnxruntime 1.30.0 has no CUDA or TensorRT" in reason
        and "AzureExecutionProvider, CPUExecutionProvider" in reason
    )
    providers[:0] = ["TensorrtExecutionProvider"]
    assert P.skip_reason("onnxruntime", cuda, named=False) is None
    assert P.onnxruntime_provider() == "TensorrtExecutionProvider"
    providers[1:1] = ["CUDAExecutionProvider"]
    assert P.onnxruntime_provider() == "CUDAExecutionProvider"
    assert "GPU only" in P.skip_reason("onnxruntime", cpu, named=True)
    installed.discard("onnxscript")
    assert "onnxscript" in P.skip_reason("onnxruntime", cuda, named=True)
    monkeypatch.setattr(P, "onnxruntime_providers", lambda: (None, []))
    assert P.skip_reason("onnxruntime", cuda, named=True) == "onnxruntime is not installed"
    assert P.peer_dtype("onnxruntime", torch.bfloat16, cuda) == torch.float16
    x = P.prepare_input("onnxruntime", torch.randn(2, 3, 8, 8), torch.float16)
    assert x.dtype == torch.float16 and x.is_contiguous()  # NCHW, as the exported graph takes it


def test_the_probe_says_which_providers_and_peers_there_are(capsys, monkeypatch):
    monkeypatch.setattr(P, "onnxruntime_providers", lambda: ("1.30.0", ["CPUExecutionProvider"]))
    assert P.main(["--probe"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime: 1.30.0; execution providers: CPUExecutionProvider" in out
    assert "onnxruntime on cpu: skipped: the onnxruntime peer runs on a GPU only" in out
    assert "torch-compile-reduce-overhead on cpu: runs" in out
    with pytest.raises(SystemExit):
        P.main([])


def test_the_onnxruntime_peer_exports_and_runs_through_io_binding(tiny_weights):
    """The onnxruntime peer's path (export at the first call of a shape, a session, inputs and
    outputs bound in place), here on onnxruntime's CPU provider in float32 (the GPU run uses CUDA's
    in float16): logits equal torchvision's for each new input, and a new batch size re-exports.
    Needs onnxruntime and onnxscript (the GPU hosts have both)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from densetriton.bench.ort_peer import build_onnxruntime

    cpu = torch.device("cpu")
    eager = P.build("torchvision-eager-fp32", tiny_weights, cpu, torch.float32).fn
    net = P.torchvision_model("tiny", SPEC)
    P.load_weights_into(net, tiny_weights.tensors)
    built = build_onnxruntime(net, cpu, torch.float32, provider="CPUExecutionProvider")
    assert built.detail == "onnxruntime CPUExecutionProvider"
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for batch in (2, 2, 3):
            x = P.bench_images(batch, 64, generator=g)
            logits = built.fn(P.prepare_input("onnxruntime", x, torch.float32)).clone()
            expected = eager(x)
            assert logits.shape == expected.shape
            assert ((logits - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 1e-4
    assert rel_err_between_images(expected) > 0.1
