"""DenseNet transition: BatchNorm+ReLU, 2x2/2 average pool, then 1x1 conv, in one kernel.

torchvision computes avgpool(conv1x1(relu(bn(x)))).  A 1x1 conv and an average pool are
both linear and act on different axes (channels vs. pixels), so they commute:
conv1x1(avgpool(relu(bn(x)))) is the same result with a GEMM 4x smaller (M = N*OH*OW).
The A tile is the mean of the four activated input pixels, built in float32 as it loads.
"""

import torch
import triton
import triton.language as tl

from ._common import COMPUTE_DTYPES, check_block, check_nhwc, check_same_device, check_vector, check_weight_rows
from ._math import _dot, _relu


# Pixel counts are not specialised: one compile serves every batch and image size.
@triton.jit(do_not_specialize=["N", "OH", "OW"])
def _bn_relu_avgpool_conv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    N,
    C_in,
    OH,
    OW,
    C_out,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    stride_wk,
    stride_scale,
    stride_shift,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Rows are pooled output pixels (n, oh, ow); columns are output channels.
    offs_pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pix_mask = offs_pix < N * OH * OW
    co_mask = offs_co < C_out

    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    n = (offs_pix // (OW * OH)).to(tl.int64)
    # Top-left input pixel of each 2x2 window; the floor in OH = H // 2 keeps all four in bounds.
    x_win_ptr = x_ptr + n * stride_xn + (2 * oh) * stride_xh + (2 * ow) * stride_xw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        offs_ci = k0 + tl.arange(0, BLOCK_K)
        ci_mask = offs_ci < C_in
        load_mask = pix_mask[:, None] & ci_mask[None, :]
        scale = tl.load(scale_ptr + offs_ci * stride_scale, mask=ci_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + offs_ci * stride_shift, mask=ci_mask, other=0.0)[None, :]
        x_ci_ptr = x_win_ptr[:, None] + offs_ci[None, :] * stride_xc

        # ReLU is applied per input pixel, before the mean: the pool sees activated values.
        a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for dh in tl.static_range(2):
            for dw in tl.static_range(2):
                v = tl.load(x_ci_ptr + dh * stride_xh + dw * stride_xw, mask=load_mask, other=0.0)
                a += _relu(v.to(tl.float32) * scale + shift)
        a = a * 0.25
        # Masked rows may hold relu(shift) > 0; zero weight rows cover the channel tail,
        # and rows past the last pixel are never stored, so no extra where() is needed.

        w = tl.load(
            w_ptr + offs_ci[:, None] * stride_wk + offs_co[None, :],
            mask=ci_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        acc = _dot(a.to(w.dtype), w, acc, IEEE_DOT)

    out_pix_ptr = out_ptr + n * stride_on + oh * stride_oh + ow * stride_ow
    tl.store(
        out_pix_ptr[:, None] + offs_co[None, :] * stride_oc,
        acc.to(out_ptr.dtype.element_ty),
        mask=pix_mask[:, None] & co_mask[None, :],
    )


def bn_relu_avgpool_conv(
    x,
    weight,
    out,
    *,
    in_scale,
    in_shift,
    BLOCK_M=64,
    BLOCK_N=64,
    BLOCK_K=32,
    num_warps=4,
    num_stages=None,
):
    """out <- conv1x1(avgpool2x2_s2(relu(x*in_scale + in_shift)), weight).

    x: [N, H, W, Cin] view; out: [N, H//2, W//2, Cout] view (written in place);
    weight: pack_conv_weight of a 1x1 conv, [Cin, Cout] with unit column stride;
    in_scale/in_shift: float32 [Cin].
    """
    check_nhwc("x", x)
    check_nhwc("out", out)
    n, h, w, c_in = x.shape
    oh, ow = h // 2, w // 2
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} too small for a 2x2 stride-2 pool")
    c_out = out.shape[3]
    if tuple(out.shape) != (n, oh, ow, c_out):
        raise ValueError(f"out must have shape {(n, oh, ow, c_out)} (N, H//2, W//2, Cout), got {tuple(out.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or tuple(weight.shape) != (c_in, c_out):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a prepacked [Cin, Cout] = {(c_in, c_out)} tensor, got {got}")
    if weight.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    check_weight_rows(weight)
    check_same_device(x.device, weight=weight, out=out)
    check_vector("in_scale", in_scale, c_in, x.device)
    check_vector("in_shift", in_shift, c_in, x.device)
    for name, value in (("BLOCK_M", BLOCK_M), ("BLOCK_N", BLOCK_N), ("BLOCK_K", BLOCK_K)):
        check_block(name, value, minimum=16)  # tl.dot needs every tile dim >= 16

    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n * oh * ow, BLOCK_M), triton.cdiv(c_out, BLOCK_N))
    launch_opts = {"num_warps": num_warps}
    if num_stages is not None:
        launch_opts["num_stages"] = num_stages
    _bn_relu_avgpool_conv_kernel[grid](
        x,
        weight,
        out,
        in_scale,
        in_shift,
        n,
        c_in,
        oh,
        ow,
        c_out,
        *x.stride(),
        *out.stride(),
        weight.stride(0),
        in_scale.stride(0),
        in_shift.stride(0),
        IEEE_DOT=weight.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        **launch_opts,
    )
    return out
