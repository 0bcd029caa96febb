"""Building blocks for a tile sweep: one layer's launch under a candidate configuration, and its
check against the v1 kernel with the heuristic tiles before it is timed.

    run = build_candidate(key, tiles, device="cuda")   # a zero-argument launch, inputs bound
    error = check_candidate(key, tiles, device="cuda")  # relative error against v1's output

Inputs are random (seeded), in the layer's dtype, laid out as the plan lays them out: NHWC views
whose channel stride and padding match the engine's buffers (the stem reads an NCHW tensor).
"""

from __future__ import annotations

import functools

import torch

from .plan import conv_launcher
from .tiles import LayerKey, choose_tiles

# (stride, padding) of each op's convolution, and whether its input has a BN-ReLU prologue.
_GEOMETRY = {
    "stem": (2, 3, False),
    "conv1x1": (1, 0, True),
    "conv3x3": (1, 1, False),
    "transition": (2, 0, True),
    "classifier": (1, 0, False),
}


def _inputs(key: LayerKey, device, seed: int) -> dict:
    """Random inputs and an output view for one launch of `key`'s layer."""
    from .kernels import pack_conv_weight

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, key.dtype)
    stride, padding, prologue = _GEOMETRY[key.op]
    cifar_stem = key.op == "stem" and key.kernel_size == 3  # 3x3, stride 1, no bias, no ReLU
    if cifar_stem:
        stride, padding = 1, 1
    k = key.kernel_size
    h, w = (key.height - 1) * stride + k - 2 * padding, (key.width - 1) * stride + k - 2 * padding
    if key.op == "transition":
        h, w = 2 * key.height, 2 * key.width
    x = torch.randn(key.batch, h, w, key.c_in, generator=g).to(dtype).to(device)
    if key.op == "stem":  # the caller's NCHW tensor, read through an NHWC-ordered view
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    w_oikk = torch.randn(key.c_out, key.c_in, k, k, generator=g) / (key.c_in * k * k) ** 0.5
    vec = lambda c: torch.randn(c, generator=g).to(device)  # noqa: E731
    scale_shift = {"in_scale": vec(key.c_in), "in_shift": vec(key.c_in)} if prologue else {}
    biased = key.op in ("conv1x1", "classifier") or (key.op == "stem" and not cifar_stem)
    bias = {"bias": vec(key.c_out)} if biased else {}
    out = torch.full((key.batch, key.height, key.width, key.c_out), float("nan"), dtype=dtype, device=device)
    conv = (
        {}
        if key.op == "transition"
        else {"kernel_size": k, "stride": stride, "padding": padding, "relu_out": biased and key.op != "classifier"}
    )
    return {"x": x, "weight": pack_conv_weight(w_oikk, dtype, device), "out": out, **scale_shift, **bias, **conv}


def _launcher(key: LayerKey):
    from . import kernels

    return kernels.bn_relu_avgpool_conv if key.op == "transition" else conv_launcher(key.variant)


def _stem_or_classifier_v2(key: LayerKey, x, weight, out, args: dict, tiles: dict):
    """A zero-argument launch of the stem's or the classifier's v2 kernel, bound as the plan binds it."""
    from . import kernels

    if key.op == "classifier":  # x, out: [N, 1, 1, C] views of [N, C] features and logits
        return functools.partial(
            kernels.classifier_v2,
            x.view(key.batch, key.c_in),
            weight,
            out.view(key.batch, key.c_out),
            bias=args["bias"],
            **tiles,
        )
    n, h, w, c_in = x.shape
    stem = kernels.bind_stem_conv_v2(weight, out, in_channels=c_in, height=h, width=w, **args, **tiles)
    return functools.partial(stem, x)


def build_candidate(key: LayerKey, tiles: dict, *, device, seed: int = 0):
    """A zero-argument callable that launches `key`'s kernel variant with `tiles` on fixed random
    inputs and returns its output tensor (the same tensor every call). Bad tiles: ValueError."""
    from . import kernels

    args = _inputs(key, device, seed)
    x, weight, out = args.pop("x"), args.pop("weight"), args.pop("out")
    if tiles.get("SPLIT_K", 1) > 1:  # its partials' workspace, as a plan gives it
        numel = kernels.split_k_workspace_numel(key.rows, key.c_out, tiles["SPLIT_K"])
        # NaN, as the output: a partial left unwritten fails the candidate's check
        tiles = {**tiles, "workspace": torch.full((numel,), float("nan"), dtype=torch.float32, device=device)}
    launch = functools.partial(_launcher(key), x, weight, out, **args, **tiles)
    if key.variant == "v2" and key.op in ("stem", "classifier"):  # their own arguments (densetriton.plan)
        launch = _stem_or_classifier_v2(key, x, weight, out, args, tiles)

    def run() -> torch.Tensor:
        launch()
        return out

    return run


def check_candidate(key: LayerKey, tiles: dict, *, device, seed: int = 0) -> float:
    """Relative error (float64) of the candidate's output against the v1 kernel with the heuristic
    tiles on the same inputs: the check a sweep makes before it times a candidate."""
    device = torch.device(device)
    v1 = LayerKey(**{**key.__dict__, "variant": "v1"})
    reference = build_candidate(v1, choose_tiles(v1, interpreted=device.type != "cuda"), device=device, seed=seed)()
    got = build_candidate(key, tiles, device=device, seed=seed)().double()
    ref = reference.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
