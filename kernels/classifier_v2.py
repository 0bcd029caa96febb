"""The classifier, variant v2: float32 logits = features @ weight + bias on TF32 tensor cores, with
float32-level accuracy by split products (3xTF32).

Each float32 operand x is split as x = hi + lo + r: hi is x with its mantissa cut to TF32's 10
bits, lo is the exact remainder x - hi cut the same way, r < 2**-21 |x| is dropped. Then

    a @ b ~= a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi        (a_lo @ b_lo ~ 2**-22 |a||b| dropped)

three TF32 dots whose operands are exactly representable in TF32, so the tensor cores multiply
them exactly and accumulate in float32: about 1e-6 relative error, against 1e-3 for one TF32
dot. The split is done here, with bit masks, rather than by `input_precision="tf32x3"`: what
the kernel computes is then the same arithmetic under Triton's interpreter (which ignores the
precision argument) as on the GPU, so the CPU tests check the split itself.

NaN and Inf go where torch's go: an infinite x is its own hi (lo = 0, not Inf - Inf = NaN) and
counts as 0 in the cross terms.
"""

import torch
import triton
import triton.language as tl

from ._common import check_block, check_same_device, check_vector, check_weight_rows


@triton.jit
def _tf32_part(x):
    # Keep sign, exponent and TF32's 10 mantissa bits (0xFFFFE000 as an int32).
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _split_tf32(x):
    """(hi, hi for the cross terms, lo): the cross terms see an infinite x as 0, else Inf times
    the other operand's lo = 0 (any TF32-exact value) would make NaN where torch has +-Inf."""
    hi = _tf32_part(x)
    lo = tl.where(x == hi, 0.0, x - hi)  # exact; 0 for +-Inf, NaN stays NaN
    return hi, tl.where(tl.abs(x) == float("inf"), 0.0, hi), _tf32_part(lo)


# The batch only bounds rows: not specialised, so one compile serves every batch size.
@triton.jit(do_not_specialize=["M"])
def _classifier_v2_kernel(
    f_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    K,
    N_CLS,
    stride_fm,
    stride_fk,
    stride_wk,
    stride_b,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N_CLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # Tail features load as zero in both operands: they add 0 * 0.
        a = tl.load(
            f_ptr + offs_m[:, None] * stride_fm + offs_k[None, :] * stride_fk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )
        a_hi, a_hi_cross, a_lo = _split_tf32(a)
        w_hi, w_hi_cross, w_lo = _split_tf32(w)
        # Small terms first, so they are not lost against the large one. The tensor cores add
        # with truncation, which biases a long sum: each K step's products are summed there,
        # then added to the float32 total by an IEEE (round-to-nearest) add.
        part = tl.dot(a_lo, w_hi_cross, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision="tf32")
        part = tl.dot(a_hi_cross, w_lo, part, input_precision="tf32")
        part = tl.dot(a_hi, w_hi, part, input_precision="tf32")
        acc += part
    bias = tl.load(b_ptr + offs_n * stride_b, mask=n_mask, other=0.0)
    acc = acc + bias[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc, mask=m_mask[:, None] & n_mask[None, :]
    )


def _check_matrix(name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.float32:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D float32 tensor, got {got}")


def classifier_v2(features, weight, out, *, bias, BLOCK_M=16, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=None):
    """out <- features @ weight + bias, all float32, at float32-level accuracy (see the module docstring).

    features: [N, C] (any strides); weight: [C, classes] with unit column stride (pack_conv_weight
    of the [classes, C, 1, 1] weight); bias: [classes]; out: [N, classes] (any strides, written).
    """
    for name, t in (("features", features), ("weight", weight), ("out", out)):
        _check_matrix(name, t)
    (n, c), classes = features.shape, weight.shape[1]
    if weight.shape[0] != c or tuple(out.shape) != (n, classes):
        raise ValueError(
            f"features {tuple(features.shape)}, weight {tuple(weight.shape)} and out "
            f"{tuple(out.shape)} must be [N, C], [C, classes] and [N, classes]"
        )
    check_weight_rows(weight)
    check_same_device(features.device, weight=weight, out=out)
    check_vector("bias", bias, classes, features.device)
    for name, value in (("BLOCK_M", BLOCK_M), ("BLOCK_N", BLOCK_N), ("BLOCK_K", BLOCK_K)):
        check_block(name, value, minimum=16)  # tl.dot needs every tile dim >= 16
    if out.numel() == 0:
        return out
    launch_opts = {"num_warps": num_warps}
    if num_stages is not None:
        launch_opts["num_stages"] = num_stages
    grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(classes, BLOCK_N))
    _classifier_v2_kernel[grid](
        features,
        weight,
        bias,
        out,
        n,
        c,
        classes,
        *features.stride(),
        weight.stride(0),
        bias.stride(0),
        *out.stride(),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        **launch_opts,
    )
    return out
