"""The torch.compile peers built and run on the CPU, on a tiny DenseNet (seconds, not the minutes
densenet121 takes to compile here): what the GPU bench compares densetriton with."""

import os

import pytest
import torch

from densetriton import DenseNetSpec
from densetriton.bench import peers as P

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
