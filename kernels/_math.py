"""Small @triton.jit helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def _relu(x):
    # NaN passes through, as in torch.relu; tl.maximum(x, 0) would turn it into 0.
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _dot(a, w, acc, IEEE_DOT: tl.constexpr):
    # float32 operands: full IEEE products, not TF32 (results must match PyTorch to ~1e-5).
    if IEEE_DOT:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def relu_keep_nan(x):
    # One max.NaN instruction where _relu's compare-and-select is two; NaN still passes through.
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
