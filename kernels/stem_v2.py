"""The stem convolution, variant v2: the caller's image packed once, then a tensor-core GEMM fed by
contiguous, aligned loads.

    out = [relu]( conv2d(x, weight, stride, padding) + bias )       (a stem has no BN-ReLU prologue)

v1 gathers every A element from the caller's NCHW planes (2-byte loads, no cp.async). Here:

1. `_pack_stem_input_kernel` copies x (any strides: the caller's NCHW tensor seen as NHWC) into a
   workspace of the plan as NHWC with the zero padding built in and the channels padded to CPAD:
   [N, H + 2*PAD, WP, CPAD]. Every element is written, padding included, so the workspace needs
   no zeroing and may share memory with buffers that are dead while the stem runs.
2. `_stem_conv_v2_kernel` walks K by kernel rows. For output pixel (oh, ow), kernel row kh is
   the ROW = KWP * CPAD contiguous elements at packed[n, oh*S + kh, ow*S, :] (KWP: KW rounded up
   to a power of two), so a K step is one contiguous, aligned run per pixel with no bounds
   check: K = KH * ROW (7 steps of 32 for a 7x7 stem on 3 channels, CPAD 4).
   The weight is laid out the same way (`pack_stem_weight`): zero in the padded channels and in
   the phantom taps kw >= KW. A phantom tap would read a real pixel (the next window's), so A's
   load masks it out too: a NaN or Inf must not reach an output whose window does not hold it.

Both ReLU and NaN behave as torch's: a NaN pixel gives NaN in every output whose window holds it.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_block, check_nhwc, check_same_device, check_vector, check_weight_rows
from ._math import relu_keep_nan

# Packed rows start every ROW_ALIGN elements: Triton then sees strides divisible by 16 and
# vectorises (and pipelines) the loads of both operands.
ROW_ALIGN = 16
PACK_BLOCK_PIXELS = 256  # 2 pixels per thread at 4 warps: more loads in flight


def _next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


@dataclass(frozen=True)
class StemLayout:
    """Where the packed input and weight put things, for one input size and kernel."""

    kernel_size: int
    padding: int
    c_in: int
    kwp: int  # taps per packed kernel row: kernel_size rounded up to a power of two
    cpad: int  # channels per packed pixel
    height: int  # of the packed image: H + 2*padding
    width: int  # of the packed image: covers the last window's phantom taps, rounded for alignment

    @property
    def row(self) -> int:
        """Elements of one kernel row, one tensor-core K run: KWP * CPAD."""
        return self.kwp * self.cpad

    def numel(self, n: int) -> int:
        return n * self.height * self.width * self.cpad


def stem_layout(c_in: int, kernel_size: int, padding: int, height: int, width: int) -> StemLayout:
    kwp = _next_pow2(kernel_size)
    # A kernel row of at least 16 elements: the smallest K a tensor-core dot takes.
    cpad = max(_next_pow2(c_in), 16 // kwp)
    # The last window's phantom taps reach column W + 2*PAD - 1 + (KWP - KW).
    wp = width + 2 * padding + (kwp - kernel_size)
    align = max(1, ROW_ALIGN // cpad)
    return StemLayout(kernel_size, padding, c_in, kwp, cpad, height + 2 * padding, -(-wp // align) * align)


def stem_workspace_numel(n: int, c_in: int, kernel_size: int, padding: int, height: int, width: int) -> int:
    """Elements (of the compute dtype) the packed input of a batch of n needs."""
    return stem_layout(c_in, kernel_size, padding, height, width).numel(n)


def pack_stem_weight(weight: torch.Tensor, c_in: int, kernel_size: int) -> torch.Tensor:
    """A pack_conv_weight operand [KH*KW*Cin, Cout] -> this kernel's [KH*KWP*CPAD, Cout] (same dtype
    and device): row (kh*KWP + kw)*CPAD + ci, zero for ci >= Cin and kw >= KW. Rows are
    ROW_ALIGN-aligned (a view of a padded tensor, as pack_conv_weight's)."""
    k = kernel_size
    if weight.dim() != 2 or weight.shape[0] != k * k * c_in:
        raise ValueError(
            f"weight must be a packed [{k * k * c_in}, Cout] operand for a {k}x{k} kernel on "
            f"{c_in} channels (see pack_conv_weight), got shape {tuple(weight.shape)}"
        )
    layout = stem_layout(c_in, k, 0, k, k)
    c_out = weight.shape[1]
    cols = -(-c_out // ROW_ALIGN) * ROW_ALIGN
    packed = torch.zeros(k, layout.kwp, layout.cpad, cols, dtype=weight.dtype, device=weight.device)
    packed[:, :k, :c_in, :c_out] = weight.reshape(k, k, c_in, c_out)
    return packed.view(k * layout.row, cols)[:, :c_out]


# Pixel counts are not specialised: one compile serves every batch and image size.
@triton.jit(do_not_specialize=["N", "H", "W", "HP", "WP"])
def _pack_stem_input_kernel(
    x_ptr,
    p_ptr,
    N,
    H,
    W,
    C,
    HP,
    WP,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    PAD: tl.constexpr,
    CPAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # packed pixels (n, i, j) flattened
    offs_c = tl.arange(0, CPAD)
    p_mask = offs_p < N * HP * WP
    j = offs_p % WP
    i = (offs_p // WP) % HP
    n = (offs_p // (WP * HP)).to(tl.int64)
    ih = i - PAD
    iw = j - PAD
    inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(
        x_ptr + (n * stride_xn + ih * stride_xh + iw * stride_xw)[:, None] + offs_c[None, :] * stride_xc,
        mask=inside[:, None] & (offs_c < C)[None, :],
        other=0.0,
    )
    tl.store(
        p_ptr + offs_p.to(tl.int64)[:, None] * CPAD + offs_c[None, :],
        v.to(p_ptr.dtype.element_ty),
        mask=p_mask[:, None],
    )


@triton.jit(do_not_specialize=["N", "OH", "OW"])
def _stem_conv_v2_kernel(
    p_ptr,
    w_ptr,
    out_ptr,
    bias_ptr,
    N,
    OH,
    OW,
    C_out,
    stride_pn,
    stride_ph,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    stride_wk,
    stride_bias,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KWP: tl.constexpr,
    CPAD: tl.constexpr,
    STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pix_mask = offs_pix < N * OH * OW
    co_mask = offs_co < C_out
    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    n = (offs_pix // (OW * OH)).to(tl.int64)  # n * stride_n can pass 2**31 on big batches
    # Each row's window starts at packed (oh*S, ow*S): the padding is in the packed image.
    a_row_ptr = p_ptr + n * stride_pn + (oh * STRIDE) * stride_ph + (ow * STRIDE) * CPAD

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # BLOCK_K divides ROW (both powers of two, BLOCK_K <= ROW): a K step stays in one kernel row.
    for k0 in range(0, KH * KWP * CPAD, BLOCK_K):
        kh = k0 // (KWP * CPAD)
        # BLOCK_K-aligned and contiguous: Triton's analysis loses both through the remainder.
        offs_r = tl.max_contiguous(tl.multiple_of(k0 % (KWP * CPAD) + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        # Phantom taps (kw >= KW) hold the next window's pixels: not loaded, so their NaN/Inf stays out.
        a = tl.load(
            a_row_ptr[:, None] + kh * stride_ph + offs_r[None, :],
            mask=pix_mask[:, None] & (offs_r < KW * CPAD)[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + (k0 + tl.arange(0, BLOCK_K))[:, None] * stride_wk + offs_co[None, :],
            mask=co_mask[None, :],
            other=0.0,
        )
        if IEEE_DOT:  # float32: full IEEE products, not TF32 (results must match PyTorch to ~1e-5)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_co * stride_bias, mask=co_mask, other=0.0)
        acc = acc + bias[None, :]
    if RELU_OUT:
        acc = relu_keep_nan(acc)
    out_pix_ptr = out_ptr + n * stride_on + oh * stride_oh + ow * stride_ow
    tl.store(
        out_pix_ptr[:, None] + offs_co[None, :] * stride_oc,
        acc.to(out_ptr.dtype.element_ty),
        mask=pix_mask[:, None] & co_mask[None, :],
    )


def _check_stem_args(x, weight, out, workspace, kernel_size, stride, padding, bias, blocks):
    """Every check of a stem_conv_v2 launch; returns (layout, oh, ow)."""
    check_nhwc("x", x)
    check_nhwc("out", out)
    for name, v, lo in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    n, h, w, c_in = x.shape
    oh, ow = (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} too small for kernel {kernel_size} with padding {padding}")
    c_out = out.shape[3]
    if tuple(out.shape) != (n, oh, ow, c_out):
        raise ValueError(f"out must have shape {(n, oh, ow, c_out)} (N, OH, OW, Cout), got {tuple(out.shape)}")
    layout = stem_layout(c_in, kernel_size, padding, h, w)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (kernel_size * layout.row, c_out):
        raise ValueError(
            f"weight must be pack_stem_weight's [{kernel_size * layout.row}, {c_out}] operand, "
            f"got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    check_weight_rows(weight)
    if not isinstance(workspace, torch.Tensor) or workspace.dim() != 1 or not workspace.is_contiguous():
        raise ValueError("workspace must be a contiguous 1-D tensor (see stem_workspace_numel)")
    if workspace.numel() < layout.numel(n) or workspace.dtype != weight.dtype:
        raise ValueError(
            f"workspace must hold at least {layout.numel(n)} {weight.dtype} elements, "
            f"got {workspace.numel()} {workspace.dtype}"
        )
    check_same_device(x.device, weight=weight, out=out, workspace=workspace)
    if bias is not None:
        check_vector("bias", bias, c_out, x.device)
    for name, value in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), blocks):
        check_block(name, value, minimum=16)  # tl.dot needs every tile dim >= 16
    return layout, oh, ow


def stem_conv_v2(
    x,
    weight,
    out,
    workspace,
    *,
    kernel_size,
    stride=1,
    padding=0,
    bias=None,
    relu_out=False,
    BLOCK_M=64,
    BLOCK_N=64,
    BLOCK_K=32,
    num_warps=4,
    num_stages=None,
):
    """out <- [relu](conv2d(x, weight, stride, padding) + bias), through a packed copy of x.

    x: [N, H, W, Cin] view, any strides (never written); out: [N, OH, OW, Cout] view (written in
    place); weight: pack_stem_weight(...) of a pack_conv_weight operand; workspace: a contiguous
    1-D tensor of the weight's dtype with at least stem_workspace_numel(...) elements, overwritten.
    BLOCK_K is capped at one packed kernel row (KWP * CPAD elements).
    """
    layout, oh, ow = _check_stem_args(
        x, weight, out, workspace, kernel_size, stride, padding, bias, (BLOCK_M, BLOCK_N, BLOCK_K)
    )
    if out.numel() == 0:
        return out
    n, h, w, c_in = x.shape
    packed = workspace[: layout.numel(n)].view(n, layout.height, layout.width, layout.cpad)
    pixels = n * layout.height * layout.width
    _pack_stem_input_kernel[(triton.cdiv(pixels, PACK_BLOCK_PIXELS),)](
        x,
        packed,
        n,
        h,
        w,
        c_in,
        layout.height,
        layout.width,
        *x.stride(),
        PAD=padding,
        CPAD=layout.cpad,
        BLOCK_P=PACK_BLOCK_PIXELS,
        num_warps=4,
    )
    c_out = out.shape[3]
    bias_arg = bias if bias is not None else weight  # unused unless HAS_BIAS
    launch_opts = {"num_warps": num_warps}
    if num_stages is not None:
        launch_opts["num_stages"] = num_stages
    grid = (triton.cdiv(n * oh * ow, BLOCK_M), triton.cdiv(c_out, BLOCK_N))
    _stem_conv_v2_kernel[grid](
        packed,
        weight,
        out,
        bias_arg,
        n,
        oh,
        ow,
        c_out,
        packed.stride(0),
        packed.stride(1),
        *out.stride(),
        weight.stride(0),
        bias_arg.stride(0),
        KH=kernel_size,
        KW=kernel_size,
        KWP=layout.kwp,
        CPAD=layout.cpad,
        STRIDE=stride,
        HAS_BIAS=bias is not None,
        RELU_OUT=bool(relu_out),
        IEEE_DOT=weight.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=min(BLOCK_K, layout.row),
        **launch_opts,
    )
    return out


def bind_stem_conv_v2(
    weight,
    out,
    *,
    in_channels,
    height,
    width,
    kernel_size,
    stride=1,
    padding=0,
    bias=None,
    relu_out=False,
    workspace=None,
    **tiles,
):
    """stem_conv_v2 bound once for one input shape, from bn_relu_conv's weight (a pack_conv_weight
    operand, repacked here): returns launch(x) for [N, height, width, in_channels] views x.

    workspace: the first stem_workspace_numel(...) elements of the given tensor (the caller keeps
    nothing else there while the stem runs), or a new tensor when None.
    """
    numel = stem_workspace_numel(out.shape[0], in_channels, kernel_size, padding, height, width)
    if workspace is None:
        workspace = torch.empty(numel, dtype=weight.dtype, device=weight.device)
    return functools.partial(
        stem_conv_v2,
        weight=pack_stem_weight(weight, in_channels, kernel_size),
        out=out,
        workspace=workspace[:numel],
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        bias=bias,
        relu_out=relu_out,
        **tiles,
    )
