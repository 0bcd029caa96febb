"""Roofline arithmetic: multiply-adds and bytes per layer kind, and the floor time they imply.

Two traffic models, both counted from the spec alone (bench/NOTES.md explains them):

* ``bytes`` -- the network minimum used for every record's ``floor_ms``: the input read once,
  every weight read once (BatchNorm as a folded scale and shift, 2 values per channel), the
  float32 logits written once, and every intermediate activation (stem output, bottleneck
  scratch, each layer's new feature maps, each pooled transition output) written once and read
  once. BatchNorm, ReLU and pooling are taken as fused into the convolutions next to them.
* ``bytes_layerwise`` -- what a layer-at-a-time engine moves at least: every convolution reads
  its whole input (a dense layer reads the concatenation of all earlier maps), its weights,
  and writes its output once. Reported per layer kind so a kernel can be compared with its own
  floor.

Multiply-adds count the transition convolution after the 2x2 average pool (the two are linear
and commute), the fewest a correct engine has to do: ``spec.macs(pooled_transitions=True)``.
"""

from __future__ import annotations

from collections import OrderedDict

KINDS = ("stem", "dense_1x1", "dense_3x3", "transition", "head")
LOGIT_BYTES = 4  # engines return float32 logits


def layer_kinds(spec, batch: int, height: int, width: int, elem_bytes: int) -> OrderedDict[str, dict]:
    """Per layer kind: ``macs``, ``bytes`` (minimum model) and ``bytes_layerwise``, for a batch."""
    kinds = OrderedDict((k, {"macs": 0, "bytes": 0, "bytes_layerwise": 0}) for k in KINDS)
    sizes = spec.feature_sizes(height, width)
    s, n = elem_bytes, batch

    def add(kind, *, macs=0, weights=0, reads=0, writes=0, out_bytes=None):
        """weights/reads/writes in elements (per batch); writes are activations read once later."""
        d = kinds[kind]
        d["macs"] += n * macs
        written = s * writes if out_bytes is None else out_bytes
        # minimum model: weights once, this kind's outputs written once and read once (by whoever
        # consumes them), plus the network input for the stem.
        d["bytes"] += s * weights + (2 * written if out_bytes is None else written)
        d["bytes_layerwise"] += s * (weights + reads) + written

    c0, k, ci = spec.num_init_features, spec.growth_rate, spec.in_channels
    h1, w1 = sizes[0]
    image = n * ci * height * width
    if spec.stem == "imagenet":  # conv7x7/2 + BN + ReLU + maxpool3x3/2, one fused kernel at best
        oh, ow = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        add("stem", macs=oh * ow * c0 * ci * 49, weights=c0 * ci * 49 + 2 * c0, reads=image, writes=n * c0 * h1 * w1)
    else:  # conv3x3, full resolution
        add("stem", macs=height * width * c0 * ci * 9, weights=c0 * ci * 9, reads=image, writes=n * c0 * h1 * w1)
    kinds["stem"]["bytes"] += s * image  # the input, read once

    transitions = spec.transition_channels()
    for b, ((c_in, c_end), layers, (h, w)) in enumerate(zip(spec.block_channels(), spec.block_config, sizes)):
        pix = h * w
        for layer in range(layers):
            c = c_in + layer * k
            if spec.bn_size is None:  # plain BN-ReLU-conv3x3 reads the concatenation directly
                add("dense_3x3", macs=pix * c * k * 9, weights=k * c * 9 + 2 * c, reads=n * c * pix, writes=n * k * pix)
            else:
                width_ = spec.bn_size * k
                add(
                    "dense_1x1",
                    macs=pix * c * width_,
                    weights=width_ * c + 2 * c,
                    reads=n * c * pix,
                    writes=n * width_ * pix,
                )
                add(
                    "dense_3x3",
                    macs=pix * width_ * k * 9,
                    weights=k * width_ * 9 + 2 * width_,
                    reads=n * width_ * pix,
                    writes=n * k * pix,
                )
        if b + 1 < len(spec.block_config):
            t, pooled = transitions[b], (h // 2) * (w // 2)
            add(
                "transition",
                macs=pooled * c_end * t,
                weights=t * c_end + 2 * c_end,
                reads=n * c_end * pix,
                writes=n * t * pooled,
            )
    c, (h, w) = spec.num_features, sizes[-1]
    add(
        "head",
        macs=c * spec.num_classes,
        weights=2 * c + c * spec.num_classes + spec.num_classes,
        reads=n * c * h * w,
        out_bytes=n * spec.num_classes * LOGIT_BYTES,
    )
    return kinds


def traffic(spec, batch: int, height: int, width: int, elem_bytes: int) -> dict:
    """Totals over the network: macs (pooled transitions), macs_unpooled, bytes, bytes_layerwise, kinds."""
    kinds = layer_kinds(spec, batch, height, width, elem_bytes)
    return {
        "macs": sum(d["macs"] for d in kinds.values()),
        "macs_unpooled": batch * spec.macs(height, width),
        "bytes": sum(d["bytes"] for d in kinds.values()),
        "bytes_layerwise": sum(d["bytes_layerwise"] for d in kinds.values()),
        "kinds": {k: dict(d) for k, d in kinds.items()},
    }


def floor_ms(macs: int, nbytes: int, flops_per_s: float, bytes_per_s: float) -> float:
    """max(compute time, memory time) in milliseconds: 2 FLOPs per multiply-add."""
    return max(2.0 * macs / flops_per_s, nbytes / bytes_per_s) * 1e3


def roofline_entry(
    spec, model: str, batch: int, image_size: int, dtype: str, elem_bytes: int, flops_per_s: float, bytes_per_s: float
) -> dict:
    """One JSON roofline entry: counts, the two floors of the network and of every layer kind."""
    t = traffic(spec, batch, image_size, image_size, elem_bytes)
    for d in t["kinds"].values():
        d["compute_ms"] = 2.0 * d["macs"] / flops_per_s * 1e3
        d["memory_ms"] = d["bytes"] / bytes_per_s * 1e3
        d["memory_layerwise_ms"] = d["bytes_layerwise"] / bytes_per_s * 1e3
        d["floor_ms"] = max(d["compute_ms"], d["memory_ms"])
        d["floor_layerwise_ms"] = max(d["compute_ms"], d["memory_layerwise_ms"])
    return {
        "model": model,
        "batch": batch,
        "dtype": dtype,
        "image_size": image_size,
        "macs": t["macs"],
        "macs_unpooled": t["macs_unpooled"],
        "bytes": t["bytes"],
        "bytes_layerwise": t["bytes_layerwise"],
        "compute_ms": 2.0 * t["macs"] / flops_per_s * 1e3,
        "memory_ms": t["bytes"] / bytes_per_s * 1e3,
        "floor_ms": floor_ms(t["macs"], t["bytes"], flops_per_s, bytes_per_s),
        "floor_layerwise_ms": sum(d["floor_layerwise_ms"] for d in t["kinds"].values()),
        "kinds": t["kinds"],
    }


# -- the machine's rates, timed in the same run ------------------------------------------------


def matmul_rate(dtype, device, *, n: int | None = None, repeats: int = 5, allow_tf32: bool = True) -> float:
    """FLOP/s of a square torch.matmul in dtype (best of repeats). float32 on CUDA allows TF32 by
    default, as cuDNN's convolutions do for the float32 peer; allow_tf32=False gives the IEEE
    float32 rate densetriton's float32 kernels compute at."""
    import torch

    from .timing import Timer

    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        times = Timer(device).time(lambda x: torch.matmul(x, b), [a], repeats=repeats, warmup=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2.0 * n**3 / (min(times) / 1e3)


def copy_bandwidth(device, *, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a large same-device copy, counting bytes read plus bytes written (best of repeats)."""
    import torch

    from .timing import Timer

    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = Timer(device).time(lambda x: dst.copy_(x), [src], repeats=repeats, warmup=2)
    return 2.0 * nbytes / (min(times) / 1e3)
