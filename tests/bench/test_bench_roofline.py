"""Roofline arithmetic against counts worked out by hand on a tiny network."""

import pytest
import torch
from densetriton.bench import roofline as R

from densetriton.spec import DenseNetSpec, get_spec

# k=2, blocks (2, 1), 4 stem channels, bottleneck width 4, theta 0.5, 3 classes, CIFAR stem (3x3 conv).
# At 4x4: block 1 is 4x4 with 4 -> 8 channels, the transition gives 4 channels at 2x2, block 2 4 -> 6.
TINY = DenseNetSpec(
    growth_rate=2, block_config=(2, 1), num_init_features=4, bn_size=2, compression=0.5, num_classes=3, stem="cifar"
)

# Multiply-adds per image, by hand:
#   stem 16 px * 4 * 27 = 1728
#   block 1, layer 1 (c=4): 1x1 16*4*4 = 256, 3x3 16*4*2*9 = 1152; layer 2 (c=6): 1x1 384, 3x3 1152
#   transition after the pool: 4 px * 8 * 4 = 128
#   block 2, layer 1 (c=4, 4 px): 1x1 64, 3x3 288;  classifier 6*3 = 18
HAND_MACS = {"stem": 1728, "dense_1x1": 256 + 384 + 64, "dense_3x3": 1152 + 1152 + 288, "transition": 128, "head": 18}
# Weights in elements (BatchNorm as scale + shift, 2 per channel):
#   conv0 108; block 1 layer 1: 8 + 16 + 8 + 72 = 104; layer 2: 12 + 24 + 8 + 72 = 116;
#   transition 16 + 32 = 48; block 2 layer 1: 104; head: norm5 12 + 18 + 3 = 33   -> 513
HAND_WEIGHTS = 513
# Activations per image, in elements: stem out 64; block 1: bottleneck 64 + new 32, twice;
# transition out 16; block 2: bottleneck 16 + new 8  -> 296.  Input 48 elements, logits 3 floats.
HAND_ACTS, HAND_INPUT = 296, 48


def test_tiny_macs_by_kind_match_the_hand_count_and_the_spec():
    kinds = R.layer_kinds(TINY, 1, 4, 4, 2)
    assert {k: d["macs"] for k, d in kinds.items()} == HAND_MACS
    assert sum(HAND_MACS.values()) == 5170 == TINY.macs(4, pooled_transitions=True)
    t = R.traffic(TINY, 3, 4, 4, 2)
    assert t["macs"] == 3 * 5170
    assert t["macs_unpooled"] == 3 * TINY.macs(4)


def test_tiny_minimum_bytes():
    # input + weights + every activation written and read once, in float16; logits float32
    t = R.traffic(TINY, 1, 4, 4, 2)
    assert t["bytes"] == (HAND_INPUT + HAND_WEIGHTS + 2 * HAND_ACTS) * 2 + 3 * 4 == 2318
    assert R.traffic(TINY, 2, 4, 4, 2)["bytes"] == 2318 + (HAND_INPUT + 2 * HAND_ACTS) * 2 + 3 * 4 == 3610
    assert R.traffic(TINY, 1, 4, 4, 4)["bytes"] == (HAND_INPUT + HAND_WEIGHTS + 2 * HAND_ACTS) * 4 + 3 * 4


def test_tiny_layerwise_bytes_by_kind():
    # each conv reads its whole input and its weights, writes its output (elements):
    #   stem 48 + 108 + 64 = 220
    #   1x1: (64 + 24 + 64) + (96 + 36 + 64) + (16 + 24 + 16) = 152 + 196 + 56
    #   3x3: (64 + 80 + 32) * 2 + (16 + 80 + 8) = 352 + 104
    #   transition 128 + 48 + 16 = 192;  head 24 + 33 = 57 (+ 12 bytes of logits)
    kinds = R.layer_kinds(TINY, 1, 4, 4, 2)
    hand = {
        "stem": 220 * 2,
        "dense_1x1": (152 + 196 + 56) * 2,
        "dense_3x3": (352 + 104) * 2,
        "transition": 192 * 2,
        "head": 57 * 2 + 12,
    }
    assert {k: d["bytes_layerwise"] for k, d in kinds.items()} == hand
    assert R.traffic(TINY, 1, 4, 4, 2)["bytes_layerwise"] == 2670


def test_weight_bytes_equal_the_parameter_count_on_densenet121():
    spec = get_spec("densenet121")
    t1, t2 = (R.traffic(spec, b, 224, 224, 2)["bytes"] for b in (1, 2))
    # bytes = weights + batch * per-image; BatchNorm scale + shift = its weight + bias
    assert 2 * t1 - t2 == 2 * spec.num_parameters()
    assert R.traffic(spec, 1, 224, 224, 2)["macs"] == spec.macs(224, pooled_transitions=True)
    kinds = R.layer_kinds(spec, 1, 224, 224, 2)
    assert all(d["bytes_layerwise"] > d["bytes"] for k, d in kinds.items() if k.startswith("dense"))


def test_floor_is_the_slower_of_compute_and_memory():
    assert R.floor_ms(5170, 2318, 1e9, 1e9) == pytest.approx(2 * 5170 / 1e9 * 1e3)  # compute-bound
    assert R.floor_ms(5170, 2318, 1e12, 1e9) == pytest.approx(2318 / 1e9 * 1e3)  # memory-bound
    e = R.roofline_entry(TINY, "tiny", 1, 4, "float16", 2, 1e12, 1e9)
    assert e["floor_ms"] == pytest.approx(2318e-6)
    assert e["compute_ms"] == pytest.approx(2 * 5170e-9)
    assert e["kinds"]["dense_3x3"]["floor_ms"] == pytest.approx(
        max(2 * 2592e-9, e["kinds"]["dense_3x3"]["bytes"] * 1e-6)
    )
    assert sum(d["memory_ms"] for d in e["kinds"].values()) == pytest.approx(e["memory_ms"])
    assert e["floor_layerwise_ms"] == pytest.approx(2670e-6)  # memory-bound in every kind at these rates


def test_machine_rates_are_measured_and_plausible():
    cpu = torch.device("cpu")
    flops = R.matmul_rate(torch.float32, cpu, n=128, repeats=2)
    bw = R.copy_bandwidth(cpu, nbytes=1 << 20, repeats=2)
    assert 1e7 < flops < 1e14 and 1e7 < bw < 1e13


@pytest.mark.parametrize("name", ["densenet40_k12", "densenet_bc100_k12", "densenet201"])
def test_counts_agree_with_the_spec_on_plain_bottleneck_and_imagenet_nets(name):
    spec = get_spec(name)
    size = 32 if spec.stem == "cifar" else 224
    t1, t2 = (R.traffic(spec, b, size, size, 4) for b in (1, 2))
    assert t1["macs"] == spec.macs(size, pooled_transitions=True)
    assert 2 * t1["bytes"] - t2["bytes"] == 4 * spec.num_parameters()
    assert 2 * t1["bytes_layerwise"] - t2["bytes_layerwise"] == 4 * spec.num_parameters()
