"""densetriton: DenseNet inference with fused Triton kernels.

engine = densetriton.load("densenet201")        # pretrained, fastest backend for the device
logits = engine(images)                          # images: float [N, 3, H, W], NCHW (C=1: grayscale models)
"""

from .engine import Engine, load
from .images import ImageError, load_image, preprocess, topk
from .spec import DenseNetSpec, get_spec, list_models
from .weights import WeightsError, load_weights, save_weights

__version__ = "0.1.0"
__all__ = [
    "DenseNetSpec",
    "Engine",
    "ImageError",
    "WeightsError",
    "get_spec",
    "list_models",
    "load",
    "load_image",
    "load_weights",
    "preprocess",
    "save_weights",
    "topk",
]
