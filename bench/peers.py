"""The peers: what a user would pick instead of densetriton, built from one set of weights.

Every peer is built from the same tensors (a cached pretrained file, else random weights with
calibrated BatchNorm statistics and a centred classifier), and ``build`` times nothing: the caller times it, so cold start
covers building, moving to the device, compiling and the first forward alike.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .schema import PEER_IDS as PEERS

COMPILE_MODES = {
    "torch-compile-default": "default",
    "torch-compile-reduce-overhead": "reduce-overhead",
    "torch-compile-max-autotune": "max-autotune",
}
# Inductor's modes that replay CUDA graphs (cudagraph trees): each call must mark a new step.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
CPU_PEERS = PEERS[:3]  # the compile peers run on CPU only when named with --peers
# The onnxruntime execution providers the onnxruntime peer runs on, in order of preference:
# CUDA (cuDNN/cuBLAS kernels, ready in seconds) before TensorRT (minutes of engine building).
ORT_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peer_dtype(peer: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a peer computes in for a requested dtype.

    densetriton follows the request; torchvision-eager-fp32 is always float32; the 16-bit
    channels_last peers (fp16-cl and both compile peers) use the request when it is 16-bit and
    float16 otherwise, except on CPU, where they always use bfloat16 (float16 convolutions are
    emulated there, ~60x slower than float32).
    """
    if peer == "densetriton":
        return dtype
    if peer == "onnxruntime":  # torchvision's model exported to ONNX in float16, as the issue asks
        return torch.float16
    if peer == "torchvision-eager-fp32":
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def peer_backend(peer: str, device: torch.device) -> str | None:
    """densetriton's backend: the fused Triton kernels on CUDA, the plain-PyTorch reference on CPU."""
    if peer != "densetriton":
        return None
    return "triton" if device.type == "cuda" else "reference"


def skip_reason(peer: str, device: torch.device, named: bool) -> str | None:
    """Why a peer cannot (or by default does not) run here; None when it runs."""
    if peer in COMPILE_MODES:
        if device.type == "cpu" and not named:
            return "torch.compile peers run on CPU only when named with --peers (compiling takes minutes there)"
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile's GPU code generation needs triton, which is not installed"
    if peer == "densetriton" and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "the triton backend needs triton, which is not installed"
    if peer == "onnxruntime":
        return onnxruntime_skip_reason(device)
    return None


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def onnxruntime_providers() -> tuple[str | None, list[str]]:
    """(onnxruntime's version, its available execution providers); (None, []) when not installed."""
    if not installed("onnxruntime"):
        return None, []
    import onnxruntime

    return onnxruntime.__version__, list(onnxruntime.get_available_providers())


def onnxruntime_provider() -> str | None:
    """The GPU execution provider the onnxruntime peer runs on; None when there is none."""
    _, available = onnxruntime_providers()
    return next((p for p in ORT_GPU_PROVIDERS if p in available), None)


def onnxruntime_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the onnxruntime peer runs on a GPU only (CUDA or TensorRT execution provider)"
    version, available = onnxruntime_providers()
    if version is None:
        return "onnxruntime is not installed"
    if onnxruntime_provider() is None:
        return (
            f"onnxruntime {version} has no CUDA or TensorRT execution provider (available: "
            f"{', '.join(available) or 'none'}): the GPU build, onnxruntime-gpu, is not installed"
        )
    if not installed("onnxscript"):
        return "exporting torchvision's model to ONNX needs onnxscript (torch.onnx.export's exporter), not installed"
    return None


# -- weights -----------------------------------------------------------------------------


@dataclass
class BenchWeights:
    model: str
    spec: object  # DenseNetSpec
    tensors: dict  # torchvision-layout state dict, on the CPU, float32
    path: Path  # a densetriton weights file holding the same tensors
    source: str  # "pretrained" or a description of the random weights


def torchvision_model(model: str, spec) -> torch.nn.Module:
    """torchvision's DenseNet for a registry name, with torchvision's own random initialisation."""
    import torchvision

    if model in torchvision.models.list_models():
        return torchvision.models.get_model(model, weights=None)
    if spec.stem != "imagenet" or spec.bn_size is None:
        raise ValueError(f"torchvision has no model for {model} (ImageNet stem and bottleneck layers only)")
    return torchvision.models.DenseNet(
        spec.growth_rate, spec.block_config, spec.num_init_features, spec.bn_size, num_classes=spec.num_classes
    )


def load_weights_into(net: torch.nn.Module, tensors: dict) -> torch.nn.Module:
    """load_state_dict that tolerates only the BatchNorm counters our files do not store."""
    result = net.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit {type(net).__name__}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return net


def bench_images(batch: int, size: int, *, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Random NCHW images with structure at every scale, never zeros.

    Smooth noise (7x7, upsampled) plus fine noise. White noise alone makes every image look the
    same after global average pooling, so a random network would give every input the same
    logits up to a small wobble, and accuracy figures would measure nothing.
    """
    coarse = torch.randn(batch, 3, 7, 7, generator=generator, device=device)
    fine = torch.randn(batch, 3, size, size, generator=generator, device=device)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False) + 0.3 * fine


def calibrated_random_state_dict(
    model: str, spec, *, seed: int, image_size: int = 224, calibration_size: int = 64, batch: int = 8, passes: int = 2
) -> dict:
    """Random weights whose BatchNorm statistics and classifier fit the network's own activations.

    torchvision's initialisation (seeded) and random BatchNorm affine parameters; a few train-mode
    passes over random images (calibration_size, for speed) with cumulative running averages, so
    that eval mode normalises every layer about as training mode does and deep nets stay
    numerically sane; then the classifier bias centred on the pooled features of images at the
    bench's size, so the logits vary with the input and top-1 is not one class for every image.
    """
    torch.manual_seed(seed)
    net = torchvision_model(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.momentum = None  # cumulative average over the passes
                m.reset_running_stats()
        net.train()
        for _ in range(passes):
            net(bench_images(batch, calibration_size, generator=g))
        net.eval()
        pooled = torch.nn.functional.relu(net.features(bench_images(batch, image_size, generator=g))).mean((2, 3))
        classifier = net.classifier
        classifier.bias.copy_(-(pooled.mean(0) @ classifier.weight.T))  # every class's mean logit 0
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def prepare_weights(model: str, workdir: Path, *, seed: int, image_size: int = 224) -> BenchWeights:
    """The cached pretrained weights when there are some, else calibrated random ones (written to workdir)."""
    from densetriton.spec import get_spec
    from densetriton.weights import load_weights, save_weights

    spec = get_spec(model)
    try:
        from densetriton.engine import pretrained_path

        cached = pretrained_path(model)
    except Exception:  # no published weights for this name
        cached = None
    if cached is not None and cached.is_file():
        w = load_weights(cached)
        return BenchWeights(model, spec, w.tensors, cached, "pretrained")
    tensors = calibrated_random_state_dict(model, spec, seed=seed, image_size=image_size)
    source = (
        f"random (torchvision init, calibrated BatchNorm statistics, classifier centred at {image_size}px, "
        f"seed {seed}): no cached pretrained file"
    )
    path = save_weights(Path(workdir) / f"{model}-bench-random.safetensors", tensors, spec, source=source)
    return BenchWeights(model, spec, tensors, path, source)


# -- building ----------------------------------------------------------------------------


@dataclass
class Built:
    fn: object  # callable: the peer's input (prepare_input) -> logits
    engine: object = None  # the densetriton Engine (for planned_memory_bytes)
    detail: str | None = None  # what else a record should say about how the peer ran


def prepare_input(peer: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The peer's input made from float32 NCHW images, before any clock starts: the peer's dtype,
    channels_last for the 16-bit torchvision and compile peers (onnxruntime's graph takes NCHW)."""
    if peer in ("densetriton", "torchvision-eager-fp32", "onnxruntime"):
        return x.to(dtype).contiguous()
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def compiled_peer(net: torch.nn.Module, mode: str):
    """torch.compile with static shapes (each record compiles for its own batch size and reports
    the time it took). Modes that replay CUDA graphs get a new cudagraph step per call, as
    torch.compiler's documentation asks of an inference loop: a call may then overwrite the last
    call's output, which the bench copies before the next."""
    torch._dynamo.reset()
    compiled = torch.compile(net, mode=mode, dynamic=False)
    if mode not in CUDA_GRAPH_MODES:
        return compiled

    def fn(x):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    return fn


def build(peer: str, weights: BenchWeights, device: torch.device, dtype: torch.dtype) -> Built:
    """Build a peer from the weights; for compile peers the first call compiles."""
    if peer == "densetriton":
        import densetriton

        engine = densetriton.load(weights.path, device=device, dtype=dtype, backend=peer_backend(peer, device))
        return Built(engine, engine)

    net = torchvision_model(weights.model, weights.spec)
    load_weights_into(net, weights.tensors)
    net.eval()
    if peer == "torchvision-eager-fp32":
        return Built(net.to(device=device, dtype=torch.float32))
    if peer == "onnxruntime":
        from .ort_peer import build_onnxruntime

        return build_onnxruntime(net, device, dtype)
    net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if peer == "torchvision-eager-fp16-cl":
        return Built(net)
    return Built(compiled_peer(net, COMPILE_MODES[peer]))


def probe() -> str:
    """What the GPU-only peers need, as found here: the onnxruntime peer's providers, torch.compile's."""
    version, available = onnxruntime_providers()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "not available"

    def found(package):
        return "installed" if installed(package) else "not installed"

    lines = [
        f"torch {torch.__version__}, CUDA {gpu}; triton: {found('triton')}",
        f"onnxruntime: {version or 'not installed'}; execution providers: {', '.join(available) or 'none'}",
        f"onnx: {found('onnx')}; onnxscript: {found('onnxscript')}",
    ]
    for peer in ("onnxruntime", *COMPILE_MODES):
        reason = skip_reason(peer, device, named=True)
        where = f" on {onnxruntime_provider()}" if peer == "onnxruntime" else ""
        lines.append(f"{peer} on {device.type}: " + (f"runs{where}" if reason is None else f"skipped: {reason}"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m densetriton.bench.peers", description="The bench's peers.")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="print whether onnxruntime (and which execution providers) and torch.compile's GPU "
        "code generation are available here, and which peers would run",
    )
    args = parser.parse_args(argv)
    if not args.probe:
        parser.error("nothing to do: pass --probe")
    print(probe(), end="")
    return 0


def fresh_compile_caches(root: Path) -> dict:
    """Point Triton's and Inductor's on-disk caches at empty folders under root; returns the old values."""
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    return saved


def restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


if __name__ == "__main__":
    raise SystemExit(main())
