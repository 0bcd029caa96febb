"""Triton kernels of densetriton: fused DenseNet inference ops on NHWC views.

Every launcher writes into a caller-provided output view and allocates nothing.
"""

from .bn_relu_avgpool_conv import bn_relu_avgpool_conv
from .bn_relu_conv import bn_relu_conv, pack_conv_weight
from .bn_relu_conv_v2 import bn_relu_conv_v2, split_k_workspace_numel
from .bn_relu_global_avgpool import bn_relu_global_avgpool
from .classifier_v2 import classifier_v2
from .maxpool import max_pool_3x3_s2
from .stem_v2 import bind_stem_conv_v2, stem_conv_v2, stem_workspace_numel

__all__ = [
    "bn_relu_conv",
    "bn_relu_conv_v2",
    "split_k_workspace_numel",
    "pack_conv_weight",
    "bn_relu_avgpool_conv",
    "max_pool_3x3_s2",
    "bn_relu_global_avgpool",
    "stem_conv_v2",
    "bind_stem_conv_v2",
    "stem_workspace_numel",
    "classifier_v2",
]
