"""`load()` and the engine it returns: validated inputs in, float32 logits or features out."""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
import time
import warnings
from pathlib import Path

import torch

from .executor import is_out_of_memory
from .reference import ReferenceDenseNet
from .spec import MODELS, NO_CLASSIFIER, TORCHVISION_MODELS, DenseNetSpec, describe_spec, get_spec
from .weights import Weights, WeightsError, cache_dir, default_preprocessing, load_weights

BACKENDS = ("auto", "reference", "triton")
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = tuple(DTYPE_NAMES.values())


class Engine:
    """A DenseNet ready to run: `engine(x)` gives logits, `engine.features(x)` pooled features.

    x is a float tensor of NCHW images [N, C, H, W] on the engine's device, as torchvision takes
    them, C = spec.in_channels (3, or 1 for a grayscale model); results are float32 whatever the
    compute dtype.
    """

    def __init__(self, weights: Weights, *, device: torch.device, dtype: torch.dtype, backend: str, pretrained: bool):
        self.weights = weights
        self.spec: DenseNetSpec = weights.spec
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.pretrained = pretrained
        self.class_names = weights.class_names
        # Trained multi-label (a sigmoid per class): what predict applies unless told otherwise.
        self.multi_label = bool(weights.multi_label)
        # Per class, the sigmoid output called positive (torchxrayvision's op_threshs), or None.
        self.operating_points = weights.operating_points
        self.preprocessing = weights.preprocessing or default_preprocessing(self.spec)
        # A plan's buffers serve one call at a time: callers on several threads take turns to
        # launch (the reference backend keeps no state between calls and needs no lock).
        self._lock = threading.Lock()
        if backend == "reference":
            model = ReferenceDenseNet(self.spec)
            result = model.load_state_dict(weights.tensors, strict=False)  # num_batches_tracked is not stored
            assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
            self._model = model.to(device=device, dtype=dtype).eval()
        else:
            from .executor import TritonExecutor

            self._model = TritonExecutor(self.spec, weights.tensors, device=device, dtype=dtype)

    def __repr__(self) -> str:
        if self.pretrained:
            trained = "pretrained"
        elif self.weights.source == "random":
            trained = "untrained (random weights)"
        else:
            trained = f"weights from {self.weights.source or 'a file'}"
        return (
            f"Engine({describe_spec(self.spec)}, backend={self.backend!r}, device={str(self.device)!r}, "
            f"dtype={self.dtype}, {trained})"
        )

    # -- running ---------------------------------------------------------------------------

    def check_input(self, x) -> None:
        c = self.spec.in_channels
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images [N, {c}, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"expected images of shape [N, {c}, H, W] (rank 4), got shape {tuple(x.shape)} (rank {x.dim()})"
            )
        if x.shape[1] != c:
            raise ValueError(f"expected {c} channel{'s' * (c != 1)} in dimension 1 (NCHW), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point tensor (float32, float16 or bfloat16; float64 is computed as "
                f"float32), got {x.dtype}"
            )
        if x.device.type != self.device.type or (
            self.device.index is not None and x.device.index not in (None, self.device.index)
        ):
            raise ValueError(f"expected a tensor on {self.device} (the engine's device), got one on {x.device}")
        self.spec.feature_sizes(x.shape[2], x.shape[3])  # raises with the smallest size that works

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [N, C] (float32): what the classifier sees."""
        return self._run(x, logits=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] (float32)."""
        if not self.spec.num_classes:
            raise ValueError(NO_CLASSIFIER)
        return self._run(x, logits=True)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        self.check_input(x)
        if x.shape[0] == 0:
            width = self.spec.num_classes if logits else self.spec.num_features
            return torch.empty(0, width, dtype=torch.float32, device=self.device)
        try:
            if self.backend == "reference":
                model = self._model if logits else self._model.forward_features
                return model(x.to(self.dtype)).float()
            if x.dtype == torch.float64:
                x = x.float()  # the kernels read 16- and 32-bit floats
            with self._lock:
                return self._model(x) if logits else self._model.features(x)
        except RuntimeError as e:  # torch.OutOfMemoryError included
            if not is_out_of_memory(e):
                raise
            # What torch's allocator says it was asked for; the plan's own shortfall is a MemoryError already.
            wanted = str(e).strip().splitlines()[0]
            raise MemoryError(
                f"out of memory running batch {x.shape[0]} at {x.shape[2]}x{x.shape[3]} on {self.device} "
                f"({self.backend} backend, {self.dtype}): {wanted}; use a smaller batch"
            ) from None

    def warmup(
        self, batch_sizes=(1,), image_size: int | tuple[int, int] | None = None, *, dtype: torch.dtype = torch.float32
    ) -> dict[int, float]:
        """One forward at each batch size, so that the first real call at each is as fast as the
        ones after it: its plan is built and, on CUDA, its graph captured (0.1-0.4 s on an H200),
        and the first of all compiles Triton's kernels (seconds).

        batch_sizes: an int or several. image_size: an int or (height, width); default the size
        the weights' preprocessing crops to, or resizes to exactly (224 for torchvision's), else,
        without preprocessing, 224 for an ImageNet stem and 32 for a CIFAR stem. dtype: that of
        the inputs to come (the stem reads them in place, and Triton compiles it per input
        dtype); they are random contiguous NCHW tensors. Sizes run largest first, so that one too
        big for memory is a MemoryError before any other is warmed.

        Returns the seconds each batch size took. Warns when the plan cache cannot keep every
        size (raise engine.plan_cache_bytes). On CUDA a plan belongs to the stream it ran on:
        warm up on the stream that will serve.
        """
        height, width = self._warmup_size(image_size)
        sizes = [batch_sizes] if isinstance(batch_sizes, numbers.Integral) else list(batch_sizes)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in sizes):
            raise ValueError(f"batch_sizes must be a positive int or several, got {batch_sizes!r}")
        sizes = list(dict.fromkeys(int(n) for n in sizes))
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.spec.feature_sizes(height, width)  # too small: one clear error before any work
        run = self.__call__ if self.spec.num_classes else self.features
        generator = torch.Generator(device=self.device).manual_seed(0)  # the global RNG is the caller's
        seconds = {}
        for n in sorted(sizes, reverse=True):
            try:
                x = torch.randn(
                    n, self.spec.in_channels, height, width, generator=generator, device=self.device, dtype=dtype
                )
            except RuntimeError as e:  # torch.OutOfMemoryError included
                if not is_out_of_memory(e):
                    raise
                raise MemoryError(
                    f"out of memory allocating a warm-up input of batch {n} at {height}x{width} on "
                    f"{self.device}; use a smaller batch"
                ) from None
            start = time.perf_counter()
            run(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[n] = time.perf_counter() - start
            del x
        if self.backend == "triton":
            stream = torch.cuda.current_stream(self.device).stream_id if self.device.type == "cuda" else 0
            with self._lock:  # other threads' calls may be adding plans
                kept = set(self._model.plans)
            evicted = [n for n in sizes if (n, height, width, stream) not in kept]
            if evicted:
                warnings.warn(
                    f"the plan cache ({self.plan_cache_bytes / 2**30:.2f} GiB) cannot hold every warmed size at "
                    f"{height}x{width}: batch sizes {evicted} were evicted and will be rebuilt on their next call "
                    f"(raise engine.plan_cache_bytes)",
                    stacklevel=2,
                )
        return {n: seconds[n] for n in sizes}

    def _warmup_size(self, image_size) -> tuple[int, int]:
        if image_size is None:
            pre = self.preprocessing or {}
            crop, resize = pre.get("crop_size"), pre.get("resize_size")
            if isinstance(resize, (list, tuple)) and len(resize) == 1:
                resize = resize[0]
            if crop is not None:
                image_size = crop
            elif isinstance(resize, (list, tuple)):
                image_size = tuple(resize)
            elif resize is not None:
                raise ValueError(
                    f"pass image_size: this model's preprocessing resizes the shorter side to {resize} "
                    f"without a crop, so its input size depends on each image's shape"
                )
            else:
                image_size = 224 if self.spec.stem == "imagenet" else 32
        if isinstance(image_size, (list, tuple)) and len(image_size) == 1:
            image_size = image_size[0]
        if isinstance(image_size, (list, tuple)) and len(image_size) == 2:
            height, width = image_size
        else:
            height = width = image_size
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (height, width)):
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        return int(height), int(width)

    @property
    def plan_cache_bytes(self) -> int | None:
        """The bound on the device bytes cached plans hold (Triton backend; default 4 GiB). A call
        keeps its own plan even when that alone is larger. Setting it drops the oldest plans until
        the rest fit (their memory goes back to torch's caching allocator; release() also returns
        it to the device). None on the reference backend, which keeps no plans."""
        return None if self.backend == "reference" else self._model.plan_cache_bytes

    @plan_cache_bytes.setter
    def plan_cache_bytes(self, value: int) -> None:
        if self.backend == "reference":
            raise ValueError("the reference backend keeps no plans, so it has no plan cache to bound")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"plan_cache_bytes must be a non-negative int, got {value!r}")
        with self._lock:
            self._model.plan_cache_bytes = int(value)

    def planned_memory_bytes(self, batch: int, height: int, width: int) -> int | None:
        """Device bytes the Triton backend holds for this input size: buffers, scratch and folded
        weights (None on the reference backend, which allocates as PyTorch does)."""
        if self.backend == "reference":
            return None
        return self._model.planned_bytes(batch, height, width) + self._model.weight_bytes

    @contextlib.contextmanager
    def exclusive_plan(self, batch: int, height: int, width: int):
        """The Triton backend's plan for this input size, its buffers this caller's alone until the
        block ends (the engine's lock is held): for tools that launch a plan's stages themselves.
        Calling the engine inside the block waits for the block to end, which it never does."""
        if self.backend != "triton":
            raise ValueError(f"plans belong to backend='triton', not {self.backend!r}")
        with self._lock:
            yield self._model.plan(batch, height, width)

    def release(self) -> None:
        """Free the buffers of every cached plan (the weights stay)."""
        release = getattr(self._model, "release", None)
        if release is not None:
            with self._lock:
                release()


# -- loading --------------------------------------------------------------------------------


def pretrained_path(name: str) -> Path:
    """Where the converted torchvision weights of a registry model are cached."""
    from .weights_tools.convert import torchvision_weights

    entry = torchvision_weights(name)
    return cache_dir() / f"{name}-{entry.name}.safetensors"


def pretrained_weights(name: str) -> Path:
    """The cached pretrained file, converted from torchvision's weights on first use."""
    from .weights_tools.convert import convert_torchvision

    path = pretrained_path(name)
    if not path.is_file():
        convert_torchvision(name, path)
    return path


def random_weights(spec: DenseNetSpec) -> Weights:
    """torchvision's initialisation from torch's global RNG (torch.manual_seed reproduces it)."""
    model = ReferenceDenseNet(spec)
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return Weights(spec=spec, tensors=tensors, source="random")


def _same_architecture(a: DenseNetSpec, b: DenseNetSpec) -> bool:
    """The same backbone: a fine-tuned head, a grayscale stem or Keras's BatchNorm epsilon is still densenet121."""
    same = dict(num_classes=1, in_channels=1, bn_eps=1e-5)
    return a.replace(**same) == b.replace(**same)


def load(
    model: str | os.PathLike | DenseNetSpec,
    *,
    weights: str | os.PathLike | None = "DEFAULT",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str = "auto",
) -> Engine:
    """Build an engine.

    model: a registry name (see list_models()), a .safetensors path, or a DenseNetSpec.
    weights: "DEFAULT" for torchvision's pretrained weights (converted once, then cached under
        $DENSETRITON_HOME, $XDG_CACHE_HOME/densetriton or ~/.cache/densetriton); None for random,
        untrained weights; or a path to a weights file.
    device: default CUDA when available, else CPU.  dtype: default float16 on CUDA, float32 on CPU.
    backend: "triton" (fused kernels), "reference" (plain PyTorch), or "auto" (triton on CUDA).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was asked for, but this machine has no usable CUDA GPU (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}): use device='cpu' "
            f"(--device cpu)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES.get(dtype, dtype)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"

    pretrained = False
    if isinstance(model, DenseNetSpec):
        spec, name = model, None
    elif isinstance(model, str) and model in MODELS:
        spec, name = get_spec(model), model
    elif isinstance(model, (str, os.PathLike)) and (str(model).endswith(".safetensors") or Path(model).is_file()):
        if weights is None:
            raise ValueError(
                f"model {str(model)!r} is a weights file, and weights=None asks for random weights: for "
                f"random weights of its architecture, pass its spec (load_weights(path).spec)"
            )
        if weights != "DEFAULT" and Path(weights) != Path(model):
            raise ValueError("model is already a weights file; leave weights at its default")
        spec, name, weights = None, None, model
    else:
        raise ValueError(
            f"unknown model {model!r}: expected one of {', '.join(MODELS)}, a .safetensors path or a DenseNetSpec"
        )

    if weights is None:
        loaded = random_weights(spec)
        warnings.warn(
            f"{describe_spec(spec)} has random weights: it is untrained and its predictions mean nothing",
            stacklevel=2,
        )
    else:
        if isinstance(weights, str) and weights == "DEFAULT":
            if name not in TORCHVISION_MODELS:
                what = name or "a custom DenseNetSpec"
                raise ValueError(
                    f"no pretrained weights are published for {what}; pass weights=None for random (untrained) "
                    f"weights, or weights=PATH for a converted file (densetriton convert)"
                )
            weights = pretrained_weights(name)
            pretrained = True
        loaded = load_weights(weights)
        if spec is not None and not _same_architecture(spec, loaded.spec):
            raise WeightsError(f"{weights} holds {describe_spec(loaded.spec)}, not {describe_spec(spec)}")
    return Engine(loaded, device=device, dtype=dtype, backend=backend, pretrained=pretrained)
