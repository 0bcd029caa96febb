"""Implicit-GEMM 2-D convolution with a fused BatchNorm+ReLU prologue and bias+ReLU epilogue.

    out = [relu]( conv2d( relu(x * in_scale + in_shift) , weight ) + bias )

GEMM view: M = N*OH*OW output pixels, N = Cout, K = KH*KW*Cin.  Every tensor is a 4-D
NHWC view with arbitrary strides, so the input may be a channel prefix of a
concatenation buffer (or an NCHW tensor permuted to NHWC) and the output may be a
channel slice of another buffer.  Zero padding belongs to the *activated* tensor.
"""

import torch
import triton
import triton.language as tl

from ._common import check_conv_args
from ._math import _dot, _relu


@triton.jit
def _bn_relu(a, scale_ptr, shift_ptr, offs_ci, ci_mask, in_mask, stride_scale, stride_shift):
    """relu(a * scale + shift) per input channel, then 0 wherever in_mask is False: padding is
    zero in the activated tensor, not relu(0 * scale + shift)."""
    scale = tl.load(scale_ptr + offs_ci * stride_scale, mask=ci_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_ci * stride_shift, mask=ci_mask, other=0.0)
    return tl.where(in_mask, _relu(a * scale[None, :] + shift[None, :]), 0.0)


# N, H, W, OH, OW only bound rows (pixels); specialising on them (==1, %16) would compile a
# new kernel per batch or image size for no gain, since loads are vectorised along channels.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW"])
def _bn_relu_conv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    bias_ptr,
    N,
    H,
    W,
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
    stride_bias,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    FLAT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Rows of the tile are output pixels (n, oh, ow) flattened; columns are output channels.
    offs_pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pix_mask = offs_pix < N * OH * OW
    co_mask = offs_co < C_out

    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    # int64 batch index: n * stride_n is the one term that can pass 2**31 on big batches.
    n = (offs_pix // (OW * OH)).to(tl.int64)
    ih_base = oh * STRIDE - PAD
    iw_base = ow * STRIDE - PAD
    x_pix_ptr = x_ptr + n * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few input channels (the stem's 3): walk K = (kh, kw, ci) as one axis, as the packed
        # weight rows are laid out, so a K tile spans several taps instead of being mostly padding.
        for k0 in range(0, KH * KW * C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < KH * KW * C_in
            tap = offs_k // C_in
            offs_ci = offs_k % C_in
            ih = ih_base[:, None] + (tap // KW)[None, :]
            iw = iw_base[:, None] + (tap % KW)[None, :]
            in_mask = pix_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(
                x_pix_ptr[:, None] + ih * stride_xh + iw * stride_xw + offs_ci[None, :] * stride_xc,
                mask=in_mask,
                other=0.0,
            ).to(tl.float32)
            if HAS_PROLOGUE:
                a = _bn_relu(a, scale_ptr, shift_ptr, offs_ci, k_mask, in_mask, stride_scale, stride_shift)
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_wk + offs_co[None, :],
                mask=k_mask[:, None] & co_mask[None, :],
                other=0.0,
            )
            acc = _dot(a.to(w.dtype), w, acc, IEEE_DOT)
    else:
        for tap in range(0, KH * KW):
            kh = tap // KW
            kw = tap % KW
            ih = ih_base + kh
            iw = iw_base + kw
            # False for padded taps and for rows past the last output pixel.
            tap_mask = pix_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tap_ptr = x_pix_ptr + ih * stride_xh + iw * stride_xw
            w_tap_row = tap * C_in
            for k0 in range(0, C_in, BLOCK_K):
                offs_ci = k0 + tl.arange(0, BLOCK_K)
                ci_mask = offs_ci < C_in

                a = tl.load(
                    x_tap_ptr[:, None] + offs_ci[None, :] * stride_xc,
                    mask=tap_mask[:, None] & ci_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                if HAS_PROLOGUE:
                    a = _bn_relu(
                        a, scale_ptr, shift_ptr, offs_ci, ci_mask, tap_mask[:, None], stride_scale, stride_shift
                    )

                # Tail rows (ci >= C_in) load as zero, so they add nothing whatever `a` holds.
                w = tl.load(
                    w_ptr + (w_tap_row + offs_ci)[:, None] * stride_wk + offs_co[None, :],
                    mask=ci_mask[:, None] & co_mask[None, :],
                    other=0.0,
                )
                acc = _dot(a.to(w.dtype), w, acc, IEEE_DOT)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_co * stride_bias, mask=co_mask, other=0.0)
        acc = acc + bias[None, :]
    if RELU_OUT:
        acc = _relu(acc)

    out_pix_ptr = out_ptr + n * stride_on + oh * stride_oh + ow * stride_ow
    tl.store(
        out_pix_ptr[:, None] + offs_co[None, :] * stride_oc,
        acc.to(out_ptr.dtype.element_ty),
        mask=pix_mask[:, None] & co_mask[None, :],
    )


# Fewer input channels than the smallest tensor-core K step: walk K = (kh, kw, ci) flat, else a
# per-tap K tile would be mostly padding (the stem's 3 channels fill 3 of 16). Not for more:
# the flat walk's per-element tap arithmetic costs registers (ptxas: spills at Cin 16-63).
FLAT_K_BELOW = 16


# Packed weight rows start every WEIGHT_ROW_ALIGN elements, so Triton sees a row stride
# divisible by 16 and vectorises the B loads (Cout = 40 or a compressed 660 spilled without it).
WEIGHT_ROW_ALIGN = 16


def pack_conv_weight(w_torch_oikk, dtype, device=None):
    """torch conv weight [Cout, Cin, KH, KW] -> [KH*KW*Cin, Cout] GEMM operand in `dtype`.

    Row index is (kh*KW + kw)*Cin + ci, the order the kernel walks K in. The result is a view
    whose rows are padded to a multiple of WEIGHT_ROW_ALIGN elements (stride(0)); the padding
    is zero and never read. The launchers take any [K, Cout] tensor with stride(1) == 1.
    """
    if w_torch_oikk.dim() != 4:
        raise ValueError(f"conv weight must be [Cout, Cin, KH, KW], got {tuple(w_torch_oikk.shape)}")
    c_out, c_in, kh, kw = w_torch_oikk.shape
    row = -(-c_out // WEIGHT_ROW_ALIGN) * WEIGHT_ROW_ALIGN
    padded = torch.zeros(kh * kw * c_in, row, dtype=dtype, device=w_torch_oikk.device if device is None else device)
    padded[:, :c_out] = w_torch_oikk.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out)
    return padded[:, :c_out]


def bn_relu_conv(
    x,
    weight,
    out,
    *,
    kernel_size,
    stride=1,
    padding=0,
    in_scale=None,
    in_shift=None,
    bias=None,
    relu_out=False,
    BLOCK_M=64,
    BLOCK_N=64,
    BLOCK_K=32,
    num_warps=4,
    num_stages=None,
):
    """out <- [relu](conv2d(relu(x*in_scale + in_shift), weight, stride, padding) + bias).

    x: [N, H, W, Cin] view; out: [N, OH, OW, Cout] view (written in place, nothing is
    allocated); weight: pack_conv_weight(...) output, [KH*KW*Cin, Cout] with unit column stride.
    in_scale/in_shift (both or neither) and bias are float32 vectors.
    """
    g = check_conv_args(
        x,
        weight,
        out,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        in_scale=in_scale,
        in_shift=in_shift,
        bias=bias,
        blocks=(BLOCK_M, BLOCK_N, BLOCK_K),
    )
    if out.numel() == 0:
        return out
    n, h, w, c_in, oh, ow, c_out, kh, kw = g
    has_prologue = in_scale is not None
    # Unused pointer arguments get a valid tensor; the constexpr flags compile their loads away.
    scale = in_scale if has_prologue else weight
    shift = in_shift if has_prologue else weight
    bias_arg = bias if bias is not None else weight
    grid = (triton.cdiv(n * oh * ow, BLOCK_M), triton.cdiv(c_out, BLOCK_N))
    launch_opts = {"num_warps": num_warps}
    if num_stages is not None:
        launch_opts["num_stages"] = num_stages
    _bn_relu_conv_kernel[grid](
        x,
        weight,
        out,
        scale,
        shift,
        bias_arg,
        n,
        h,
        w,
        c_in,
        oh,
        ow,
        c_out,
        *x.stride(),
        *out.stride(),
        weight.stride(0),
        scale.stride(0),
        shift.stride(0),
        bias_arg.stride(0),
        KH=kh,
        KW=kw,
        STRIDE=stride,
        PAD=padding,
        HAS_PROLOGUE=has_prologue,
        HAS_BIAS=bias is not None,
        RELU_OUT=bool(relu_out),
        IEEE_DOT=weight.dtype == torch.float32,
        FLAT_K=kh * kw > 1 and c_in < FLAT_K_BELOW,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        **launch_opts,
    )
    return out
