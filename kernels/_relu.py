"""ReLU for use inside kernels."""

import triton
import triton.language as tl


@triton.jit
def _relu(x):
    # NaN passes through, as in torch.relu; tl.maximum(x, 0) would turn it into 0.
    return tl.where(x < 0.0, 0.0, x)
