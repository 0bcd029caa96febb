"""MaxPool2d(kernel_size=3, stride=2, padding=1) on NHWC views with arbitrary strides.

torchvision DenseNet's pool0.  Padded taps behave as -inf, so they never win the max.
"""

import triton
import triton.language as tl

from ._common import check_block, check_nhwc, check_same_device


# Pixel counts are not specialised: one compile serves every batch and image size.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW"])
def _max_pool_3x3_s2_kernel(
    x_ptr,
    out_ptr,
    N,
    H,
    W,
    C,
    OH,
    OW,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)

    # Rows are output pixels (n, oh, ow); columns are channels.
    offs_pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pix_mask = offs_pix < N * OH * OW
    c_mask = offs_c < C

    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    n = (offs_pix // (OW * OH)).to(tl.int64)
    ih_base = oh * 2 - 1
    iw_base = ow * 2 - 1
    x_c_ptr = x_ptr + n[:, None] * stride_xn + offs_c[None, :] * stride_xc

    # The centre tap (2*oh, 2*ow) is always in bounds, so every valid row ends finite.
    result = tl.full((BLOCK_M, BLOCK_C), float("-inf"), dtype=tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            ih = ih_base + kh
            iw = iw_base + kw
            tap_mask = pix_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(
                x_c_ptr + (ih * stride_xh + iw * stride_xw)[:, None],
                mask=tap_mask[:, None] & c_mask[None, :],
                other=float("-inf"),
            )
            v = v.to(tl.float32)
            # NaN wins, as in torch's max_pool2d (tl.maximum would drop it).
            result = tl.where((v > result) | (v != v), v, result)

    out_pix_ptr = out_ptr + n * stride_on + oh * stride_oh + ow * stride_ow
    tl.store(
        out_pix_ptr[:, None] + offs_c[None, :] * stride_oc,
        result.to(out_ptr.dtype.element_ty),
        mask=pix_mask[:, None] & c_mask[None, :],
    )


def max_pool_3x3_s2(x, out, BLOCK_M=64, BLOCK_C=32, num_warps=4):
    """out <- max_pool2d(x, kernel_size=3, stride=2, padding=1), both NHWC views.

    x: [N, H, W, C]; out: [N, (H-1)//2 + 1, (W-1)//2 + 1, C] (written in place).
    """
    check_nhwc("x", x)
    check_nhwc("out", out)
    n, h, w, c = x.shape
    oh = (h + 2 - 3) // 2 + 1
    ow = (w + 2 - 3) // 2 + 1
    if tuple(out.shape) != (n, oh, ow, c):
        raise ValueError(f"out must have shape {(n, oh, ow, c)} (N, OH, OW, C), got {tuple(out.shape)}")
    check_same_device(x.device, out=out)
    check_block("BLOCK_M", BLOCK_M)
    check_block("BLOCK_C", BLOCK_C)

    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n * oh * ow, BLOCK_M), triton.cdiv(c, BLOCK_C))
    _max_pool_3x3_s2_kernel[grid](
        x,
        out,
        n,
        h,
        w,
        c,
        oh,
        ow,
        *x.stride(),
        *out.stride(),
        BLOCK_M=BLOCK_M,
        BLOCK_C=BLOCK_C,
        num_warps=num_warps,
    )
    return out
