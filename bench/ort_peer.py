"""The onnxruntime peer: torchvision's DenseNet exported to ONNX and run by onnxruntime on the
bench's own tensors through I/O binding (no host copies), on onnxruntime's CUDA execution provider
(TensorRT's where CUDA's is missing).

The export is static-shaped, like the compile peers: it happens at the first call of each input
shape, so a record's cold start covers export, session creation and the first result.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def export_onnx(net: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """net, on x's device and dtype, exported for x's shape to one ONNX file (weights inside)."""
    torch.onnx.export(
        net, (x,), str(path), input_names=["images"], output_names=["logits"], dynamo=True, external_data=False
    )
    return path


def provider_options(provider: str, device: torch.device) -> list:
    """onnxruntime's providers list for a session on device: the GPU providers run on torch's
    current stream, so the bench's CUDA events time their kernels like every other peer's."""
    if device.type != "cuda":
        return [provider]
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = str(torch.cuda.current_stream(device).cuda_stream)
    cuda = {"device_id": index, "user_compute_stream": stream, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    if provider == "CUDAExecutionProvider":
        return [(provider, cuda)]
    trt = {"device_id": index, "user_compute_stream": stream, "trt_fp16_enable": True}
    return [(provider, trt), ("CUDAExecutionProvider", cuda)]  # CUDA runs what TensorRT does not take


class OrtRunner:
    """Callable: images (NCHW, the model's dtype, on its device) -> logits, through onnxruntime.

    Returns the same output tensor every call (bound once per shape): the bench copies each
    result it keeps before the next call."""

    def __init__(self, net: torch.nn.Module, device: torch.device, provider: str):
        self.net, self.device, self.provider = net, device, provider
        self.shape = self.session = self.binding = self.out = None

    def _prepare(self, x: torch.Tensor) -> None:
        import onnxruntime

        workdir = Path(tempfile.mkdtemp(prefix="densetriton-onnx-"))
        try:
            with torch.inference_mode(False), torch.no_grad():
                path = export_onnx(self.net, x.clone(), workdir / "model.onnx")
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = onnxruntime.InferenceSession(
                str(path), options, providers=provider_options(self.provider, self.device)
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if self.provider not in session.get_providers():
            raise RuntimeError(f"onnxruntime did not take {self.provider} (it runs on {session.get_providers()})")
        (output,) = session.get_outputs()
        self.out = torch.empty(tuple(output.shape), dtype=x.dtype, device=x.device)  # static: [N, classes]
        self.binding = session.io_binding()
        self.binding.bind_output(
            output.name,
            self.device.type,
            self._index(),
            NUMPY_DTYPES[x.dtype],
            tuple(self.out.shape),
            self.out.data_ptr(),
        )
        self.session, self.input_name, self.shape = session, session.get_inputs()[0].name, tuple(x.shape)

    def _index(self) -> int:
        return (self.device.index or 0) if self.device.type == "cuda" else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            self._prepare(x)
        x = x.contiguous()
        self.binding.bind_input(
            self.input_name, self.device.type, self._index(), NUMPY_DTYPES[x.dtype], tuple(x.shape), x.data_ptr()
        )
        self.session.run_with_iobinding(self.binding)
        return self.out


def build_onnxruntime(net: torch.nn.Module, device: torch.device, dtype: torch.dtype, provider: str | None = None):
    """The onnxruntime peer from torchvision's model (eval mode, its weights loaded)."""
    from .peers import Built, onnxruntime_provider

    provider = provider or onnxruntime_provider()
    if provider is None:
        raise RuntimeError("onnxruntime has no CUDA or TensorRT execution provider here")
    net = net.to(device=device, dtype=dtype).eval()
    return Built(OrtRunner(net, device, provider), detail=f"onnxruntime {provider}")
