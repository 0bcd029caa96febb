"""DenseNet head: final BatchNorm + ReLU + global average pool, in one pass.

    out[n, c] = mean_{h,w} relu(x[n, h, w, c] * scale[c] + shift[c])

One program per (image, channel block); it sweeps the H*W pixels in BLOCK_HW chunks
and keeps a float32 running sum.
"""

import torch
import triton
import triton.language as tl

from ._common import check_block, check_nhwc, check_same_device, check_vector
from ._math import _relu


# Pixel counts are not specialised: one compile serves every image size.
@triton.jit(do_not_specialize=["H", "W"])
def _bn_relu_global_avgpool_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    H,
    W,
    C,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_scale,
    stride_shift,
    stride_on,
    stride_oc,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    scale = tl.load(scale_ptr + offs_c * stride_scale, mask=c_mask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + offs_c * stride_shift, mask=c_mask, other=0.0)[None, :]
    x_img_ptr = x_ptr + pid_n * stride_xn + offs_c[None, :] * stride_xc

    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, H * W, BLOCK_HW):
        offs_p = p0 + tl.arange(0, BLOCK_HW)
        p_mask = offs_p < H * W
        ph = offs_p // W
        pw = offs_p % W
        mask = p_mask[:, None] & c_mask[None, :]
        v = tl.load(x_img_ptr + (ph * stride_xh + pw * stride_xw)[:, None], mask=mask, other=0.0)
        a = _relu(v.to(tl.float32) * scale + shift)
        # Pixels past H*W would add relu(shift); keep them out of the sum.
        acc += tl.where(mask, a, 0.0)

    mean = tl.sum(acc, axis=0) / (H * W)
    tl.store(out_ptr + pid_n * stride_on + offs_c * stride_oc, mean.to(out_ptr.dtype.element_ty), mask=c_mask)


def bn_relu_global_avgpool(x, scale, shift, out, BLOCK_C=64, BLOCK_HW=64, num_warps=4):
    """out <- mean over (H, W) of relu(x*scale + shift).

    x: [N, H, W, C] view; scale/shift: float32 [C]; out: float32 [N, C] (any strides,
    written in place).
    """
    check_nhwc("x", x)
    n, h, w, c = x.shape
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or tuple(out.shape) != (n, c):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must have shape {(n, c)} (N, C), got {got}")
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")
    check_same_device(x.device, out=out)
    check_vector("scale", scale, c, x.device)
    check_vector("shift", shift, c, x.device)
    if h * w == 0:
        raise ValueError("x has no pixels to average")
    check_block("BLOCK_C", BLOCK_C)
    check_block("BLOCK_HW", BLOCK_HW)

    if out.numel() == 0:
        return out
    grid = (n, triton.cdiv(c, BLOCK_C))
    _bn_relu_global_avgpool_kernel[grid](
        x,
        scale,
        shift,
        out,
        h,
        w,
        c,
        *x.stride(),
        scale.stride(0),
        shift.stride(0),
        *out.stride(),
        BLOCK_HW=BLOCK_HW,
        BLOCK_C=BLOCK_C,
        num_warps=num_warps,
    )
    return out
