"""The stage graph, the folded weights and the buffers of a plan."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import densetriton
from densetriton import DenseNetSpec, get_spec
from densetriton.plan import CHANNEL_ALIGN, View, buffer_shapes, build_stages, fold_batchnorm, memory_layout
from densetriton.reference import ReferenceDenseNet

SPECS = [
    get_spec("densenet121"),
    get_spec("densenet_bc100_k12"),
    DenseNetSpec(4, (5,), 8, None, 1.0, 10, "cifar"),
    DenseNetSpec(6, (3, 2, 4), 10, 3, 0.7, 5, "imagenet"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"k{s.growth_rate}-{'-'.join(map(str, s.block_config))}-{s.stem}")
def test_each_layer_appends_its_k_channels_to_its_block_buffer(spec):
    stages = build_stages(spec)
    k = spec.growth_rate
    for b, ((c_in, c_end), layers) in enumerate(zip(spec.block_channels(), spec.block_config), 1):
        writers = [s for s in stages if s.writes.buffer == f"block{b}"]
        # The block's first channels come from the stem or the previous transition...
        assert writers[0].writes == View(f"block{b}", 0, c_in)
        # ...then layer l writes exactly [c_in + l*k, c_in + (l+1)*k), having read the prefix before it.
        for layer, stage in enumerate(writers[1:]):
            assert stage.writes == View(f"block{b}", c_in + layer * k, c_in + (layer + 1) * k)
        assert writers[-1].writes.stop == c_end and len(writers) == layers + 1
        readers = [s for s in stages if s.reads.buffer == f"block{b}"]
        assert [s.reads for s in readers[:layers]] == [View(f"block{b}", 0, c_in + j * k) for j in range(layers)]
    per_layer = 1 if spec.bn_size is None else 2
    stem = 2 if spec.stem == "imagenet" else 1
    assert len(stages) == stem + per_layer * sum(spec.block_config) + len(spec.block_config) - 1 + 2


def test_bottleneck_layers_share_one_scratch_and_blocks_share_two_arenas():
    spec = get_spec("densenet121")
    shapes = buffer_shapes(spec, 224, 224)
    assert shapes["bottleneck_scratch"] == (56 * 56, 1, 128)
    assert shapes["stem"] == (112, 112, 64) and shapes["block4"] == (7, 7, 1024)
    stages = build_stages(spec)
    assert sum(s.writes.buffer == "bottleneck_scratch" for s in stages) == sum(spec.block_config)
    # Consecutive blocks (and the stem and block 1) never share an arena; blocks two apart do,
    # and each arena is as big as its biggest tenant, not the sum.
    _, arena_of, arena_numel, _ = memory_layout(spec, 2, 224, 224)
    assert arena_of == {"stem": 1, "block1": 0, "block2": 1, "block3": 0, "block4": 1}
    assert arena_numel == [
        2 * max(math.prod(shapes["block1"]), math.prod(shapes["block3"])),
        2 * max(math.prod(shapes[b]) for b in ("stem", "block2", "block4")),
    ]
    engine = densetriton.load("densenet121", weights=None, device="cpu", backend="reference")
    # The reference engine has no plan; the plan's own arithmetic is checked in test_executor.
    assert engine.planned_memory_bytes(1, 224, 224) is None


@pytest.mark.parametrize(
    "spec", [get_spec("densenet_bc190_k40"), DenseNetSpec(6, (3, 2, 4), 10, 3, 0.7, 5, "imagenet")]
)
def test_buffer_channels_are_padded_to_the_alignment_and_hold_every_view(spec):
    # Strides divisible by 16 let Triton vectorise loads whatever the growth rate (k = 40, 6).
    shapes = buffer_shapes(spec, 224, 224)
    assert all(c % CHANNEL_ALIGN == 0 for _, _, c in shapes.values())
    assert any(
        c != needed
        for (_, _, c), needed in zip(
            [shapes[f"block{b}"] for b in range(1, len(spec.block_config) + 1)],
            [c_end for _, c_end in spec.block_channels()],
        )
    )  # the specs above do need padding
    for stage in build_stages(spec):
        for view in (stage.reads, stage.writes):
            if view.buffer in shapes:
                assert view.stop <= shapes[view.buffer][2], (stage.name, view)


@pytest.mark.parametrize("bn_eps", [1e-5, 1e-2])  # torch's default, and one large enough to matter
def test_fold_batchnorm_matches_eval_batchnorm(bn_eps):
    torch.manual_seed(0)
    spec = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "imagenet", bn_eps=bn_eps)
    tensors = dict(densetriton.engine.random_weights(spec).tensors)
    for name in list(tensors):
        if name.endswith("running_var"):
            tensors[name] = torch.rand(tensors[name].shape) + 0.2
        elif name.endswith(("running_mean", "norm1.bias", "norm2.bias", "norm.bias", "norm0.bias")):
            tensors[name] = torch.randn(tensors[name].shape)
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            tensors[name] = torch.rand(tensors[name].shape) + 0.5
    folded = fold_batchnorm(tensors, spec, torch.float32, "cpu")
    p = "features.denseblock2.denselayer1"
    x = torch.randn(5, spec.block_channels()[1][0])
    bn = torch.nn.functional.batch_norm(
        x,
        tensors[f"{p}.norm1.running_mean"],
        tensors[f"{p}.norm1.running_var"],
        tensors[f"{p}.norm1.weight"],
        tensors[f"{p}.norm1.bias"],
        False,
        0.0,
        bn_eps,
    )
    f = "denseblock2.denselayer1.norm1"
    torch.testing.assert_close(x * folded[f"{f}.scale"] + folded[f"{f}.shift"], bn, rtol=1e-5, atol=1e-5)
    # conv1 with norm2 folded in: packed [Cin, width] weight and a bias equal conv-then-BN.
    w1 = tensors[f"{p}.conv1.weight"][:, :, 0, 0]
    y = torch.nn.functional.batch_norm(
        x @ w1.T,
        tensors[f"{p}.norm2.running_mean"],
        tensors[f"{p}.norm2.running_var"],
        tensors[f"{p}.norm2.weight"],
        tensors[f"{p}.norm2.bias"],
        False,
        0.0,
        bn_eps,
    )
    torch.testing.assert_close(
        x @ folded["denseblock2.denselayer1.conv1.weight"] + folded["denseblock2.denselayer1.conv1.bias"],
        y,
        rtol=1e-5,
        atol=1e-5,
    )
    assert folded["classifier.weight"].dtype == torch.float32
    assert fold_batchnorm(tensors, spec, torch.float16, "cpu")["conv0.weight"].dtype == torch.float16


def _model_with_tiny_running_variances(spec):
    """A model whose every BatchNorm has running variances log-uniform in [1e-6, 1e-4]: the size of
    torch's default epsilon (1e-5), so a fold that leaves epsilon out is off by 5% to 3x."""
    gen = torch.Generator().manual_seed(5)
    model = ReferenceDenseNet(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_var.copy_(10 ** (-6 + 2 * torch.rand(c, generator=gen)))
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.01)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


def _unpacked(packed, model_conv):
    """A packed [KH*KW*Cin, Cout] GEMM operand back to torch's [Cout, Cin, KH, KW], in float64."""
    c_out, c_in, kh, kw = model_conv.weight.shape
    return packed.double().reshape(kh, kw, c_in, c_out).permute(3, 2, 0, 1)


def _convs_with_a_folded_batchnorm(model, spec):
    """(conv, the BatchNorm after it, its folded name, stride, padding): the stem and each conv1."""
    yield model.features.conv0, model.features.norm0, "conv0", 2, 3
    for b, layers in enumerate(spec.block_config, 1):
        for i in range(1, layers + 1):
            layer = model.get_submodule(f"features.denseblock{b}.denselayer{i}")
            yield layer.conv1, layer.norm2, f"denseblock{b}.denselayer{i}.conv1", 1, 0


def test_fold_batchnorm_at_torchs_default_epsilon_with_tiny_running_variances():
    """Every folded BatchNorm (the prologues' scale and shift, and norm0 and norm2 folded into the
    conv before them) equals BatchNorm2d.eval() at its default epsilon. Fails when the fold drops
    epsilon (sqrt(var) for sqrt(var + eps) in plan.py's _bn_scale_shift): the variances here are
    1e-6..1e-4, so epsilon changes every scale by 5% or more."""
    eps = torch.nn.BatchNorm2d(1).eps
    assert eps == 1e-5
    spec = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 3, "imagenet", bn_eps=eps)
    model = _model_with_tiny_running_variances(spec)
    tensors = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    folded = fold_batchnorm(tensors, spec, torch.float32, "cpu")
    model.double()
    gen = torch.Generator().manual_seed(6)
    prologues = [name[: -len(".scale")] for name in folded if name.endswith(".scale")]
    assert len(prologues) == sum(spec.block_config) + len(spec.block_config)  # norm1s, transition norm, norm5
    with torch.no_grad():
        for name in prologues:
            bn = model.get_submodule(f"features.{name}")
            x = torch.randn(2, bn.num_features, 3, 3, generator=gen, dtype=torch.float64)
            got = x * folded[f"{name}.scale"].double()[:, None, None] + folded[f"{name}.shift"].double()[:, None, None]
            assert rel_err(got, bn(x)) < 1e-6, name
        for conv, bn, name, stride, padding in _convs_with_a_folded_batchnorm(model, spec):
            x = torch.randn(2, conv.in_channels, 9, 9, generator=gen, dtype=torch.float64)
            got = F.conv2d(
                x,
                _unpacked(folded[f"{name}.weight"], conv),
                folded[f"{name}.bias"].double(),
                stride=stride,
                padding=padding,
            )
            assert rel_err(got, bn(conv(x))) < 1e-6, name
