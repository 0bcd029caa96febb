"""bn_relu_conv, variant v2: the same op and arguments as bn_relu_conv (v1), two kernels.

    out = [relu]( conv2d( relu(x * in_scale + in_shift) , weight ) + bias )

- A 1x1 convolution without padding (the dense layers' bottleneck) has no padded input, so its
  BN-ReLU prologue needs no select: rows past the last pixel compute relu(shift) but are never
  stored (a GEMM row only reaches its own output row), and channels past C_in load as zero in
  x, scale, shift and weight alike (masked loads, other=0), so they add 0 * 0. Without the
  select the activated A tile need not stay in the load layout.
- Every other convolution walks one flattened K loop over (tap, channel block), so the whole
  K = KH*KW*Cin is one software-pipelined loop: v1 nests the channel loop inside a loop over
  taps, and only the inner loop (2 steps at Cin = 128) is pipelined, draining at every tap.

Both ReLUs (prologue and epilogue) keep NaN, as torch.relu does: a NaN input gives NaN logits.

Split-K (SPLIT_K > 1), for launches too small to fill the GPU (batch 1's late blocks are one
program streaming the whole weight): SPLIT_K programs share a tile's K steps, each writes its
float32 partial sum to a workspace [SPLIT_K, N*OH*OW, C_out], and a reduction kernel adds them
in split order (so a result is the same bit for bit call to call), then the bias and the ReLU.

Programmatic dependent launch (pdl=True, Hopper on): each grid may be launched while the one
before it still runs, and waits for it (its writes visible) before touching any activation; it
lets the grid after it launch once every one of its programs has started. Launch latency and
index set-up then overlap the previous layer's tail, which batch 1's ~200 short launches pay.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import check_conv_args
from ._math import _dot, relu_keep_nan


@triton.jit
def _wait_for_the_launch_before(PDL: tl.constexpr):
    # Under programmatic dependent launch: the previous grid's writes are visible after the wait,
    # and the next grid may start launching (it waits in turn before touching anything).
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _epilogue(
    acc,
    out_ptr,
    bias_ptr,
    n,
    oh,
    ow,
    offs_co,
    pix_mask,
    co_mask,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
):
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


@triton.jit
def _store_partial(acc, part_ptr, pid_k, offs_pix, offs_co, pix_mask, co_mask, M, C_out):
    # This split's share of the K sum, for _split_k_reduce_kernel: workspace [SPLIT_K, M, C_out].
    base = part_ptr + pid_k.to(tl.int64) * M * C_out
    rows = offs_pix.to(tl.int64) * C_out
    tl.store(base + rows[:, None] + offs_co[None, :], acc, mask=pix_mask[:, None] & co_mask[None, :])


@triton.jit
def _write_tile(
    acc,
    out_ptr,
    bias_ptr,
    part_ptr,
    n,
    oh,
    ow,
    offs_pix,
    offs_co,
    pix_mask,
    co_mask,
    M,
    C_out,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # A whole K sum goes out through the epilogue; a split's share to the workspace.
    if SPLIT_K == 1:
        _epilogue(
            acc,
            out_ptr,
            bias_ptr,
            n,
            oh,
            ow,
            offs_co,
            pix_mask,
            co_mask,
            stride_on,
            stride_oh,
            stride_ow,
            stride_oc,
            stride_bias,
            HAS_BIAS,
            RELU_OUT,
        )
    else:
        _store_partial(acc, part_ptr, tl.program_id(2), offs_pix, offs_co, pix_mask, co_mask, M, C_out)


# N, H, W, OH, OW only bound rows: not specialised, so one compile serves every batch and size.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW"])
def _conv1x1_v2_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    bias_ptr,
    part_ptr,
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
    STRIDE: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_the_launch_before(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pix_mask = offs_pix < N * OH * OW
    co_mask = offs_co < C_out
    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    n = (offs_pix // (OW * OH)).to(tl.int64)  # n * stride_n can pass 2**31 on big batches
    x_pix_ptr = x_ptr + n * stride_xn + (oh * STRIDE) * stride_xh + (ow * STRIDE) * stride_xw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_K == 1:
        k_begin = 0
        k_end = C_in
    else:  # this program's share of the channel blocks
        per_split = tl.cdiv(tl.cdiv(C_in, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = tl.program_id(2) * per_split
        k_end = tl.minimum(k_begin + per_split, C_in)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_ci = k0 + tl.arange(0, BLOCK_K)
        ci_mask = offs_ci < C_in
        w = tl.load(
            w_ptr + offs_ci[:, None] * stride_wk + offs_co[None, :],
            mask=ci_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        a = tl.load(
            x_pix_ptr[:, None] + offs_ci[None, :] * stride_xc, mask=pix_mask[:, None] & ci_mask[None, :], other=0.0
        )
        if HAS_PROLOGUE:
            # No select: see the module docstring for why masked rows and channels add nothing.
            scale = tl.load(scale_ptr + offs_ci * stride_scale, mask=ci_mask, other=0.0)
            shift = tl.load(shift_ptr + offs_ci * stride_shift, mask=ci_mask, other=0.0)
            a = relu_keep_nan(a.to(tl.float32) * scale[None, :] + shift[None, :])
        acc = _dot(a.to(w.dtype), w, acc, IEEE_DOT)

    _write_tile(
        acc,
        out_ptr,
        bias_ptr,
        part_ptr,
        n,
        oh,
        ow,
        offs_pix,
        offs_co,
        pix_mask,
        co_mask,
        N * OH * OW,
        C_out,
        stride_on,
        stride_oh,
        stride_ow,
        stride_oc,
        stride_bias,
        HAS_BIAS,
        RELU_OUT,
        SPLIT_K,
    )


@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW"])
def _conv_taps_v2_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    bias_ptr,
    part_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_the_launch_before(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pix_mask = offs_pix < N * OH * OW
    co_mask = offs_co < C_out
    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    n = (offs_pix // (OW * OH)).to(tl.int64)
    ih_base = oh * STRIDE - PAD
    iw_base = ow * STRIDE - PAD
    # Each row's tap (0, 0) pixel; a tap adds one scalar offset (it may point before the row's
    # image where the tap is padding, but those loads are masked).
    x_pix_ptr = x_ptr + n * stride_xn + ih_base * stride_xh + iw_base * stride_xw
    # Bit kh of h_ok (kw of w_ok): the row's tap row (column) lies inside the image; rows past the
    # last pixel have none (they would read past the batch). Two shifts and an AND per row and
    # step then give the tap's mask (int32 bits: kernels up to 31 wide, checked by the launcher).
    h_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    w_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for t in tl.static_range(KH):
        h_ok = h_ok | ((pix_mask & (ih_base + t >= 0) & (ih_base + t < H)).to(tl.int32) << t)
    for t in tl.static_range(KW):
        w_ok = w_ok | (((iw_base + t >= 0) & (iw_base + t < W)).to(tl.int32) << t)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One loop over (tap, channel block), tap-major as the packed weight rows are laid out. The
    # tap (kh, kw) and channel offset k0 advance as counters: no division inside the loop.
    steps = KH * KW * tl.cdiv(C_in, BLOCK_K)
    if SPLIT_K == 1:
        kh = 0
        kw = 0
        k0 = 0
    else:  # this program's share of the steps, its counters set to its first step
        per_split = tl.cdiv(steps, SPLIT_K)
        first = tl.program_id(2) * per_split
        steps = tl.minimum(per_split, steps - first)
        tap = first // tl.cdiv(C_in, BLOCK_K)
        k0 = (first % tl.cdiv(C_in, BLOCK_K)) * BLOCK_K
        kh = tap // KW
        kw = tap % KW
    for _ in range(0, steps):
        offs_ci = k0 + tl.arange(0, BLOCK_K)
        ci_mask = offs_ci < C_in
        tap = kh * KW + kw
        # False for padded taps and for rows past the last output pixel.
        tap_mask = ((h_ok >> kh) & (w_ok >> kw) & 1) != 0
        w = tl.load(
            w_ptr + (tap * C_in + offs_ci)[:, None] * stride_wk + offs_co[None, :],
            mask=ci_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        a = tl.load(
            x_pix_ptr[:, None] + (kh * stride_xh + kw * stride_xw) + offs_ci[None, :] * stride_xc,
            mask=tap_mask[:, None] & ci_mask[None, :],
            other=0.0,
        )
        if HAS_PROLOGUE:
            # Padding is zero in the activated tensor, not relu(shift): here the select is needed.
            scale = tl.load(scale_ptr + offs_ci * stride_scale, mask=ci_mask, other=0.0)
            shift = tl.load(shift_ptr + offs_ci * stride_shift, mask=ci_mask, other=0.0)
            a = tl.where(tap_mask[:, None], relu_keep_nan(a.to(tl.float32) * scale[None, :] + shift[None, :]), 0.0)
        acc = _dot(a.to(w.dtype), w, acc, IEEE_DOT)
        k0 += BLOCK_K
        next_tap = k0 >= C_in
        k0 = tl.where(next_tap, 0, k0)
        kw = tl.where(next_tap, kw + 1, kw)
        next_row = kw == KW
        kw = tl.where(next_row, 0, kw)
        kh = tl.where(next_row, kh + 1, kh)

    _write_tile(
        acc,
        out_ptr,
        bias_ptr,
        part_ptr,
        n,
        oh,
        ow,
        offs_pix,
        offs_co,
        pix_mask,
        co_mask,
        N * OH * OW,
        C_out,
        stride_on,
        stride_oh,
        stride_ow,
        stride_oc,
        stride_bias,
        HAS_BIAS,
        RELU_OUT,
        SPLIT_K,
    )


@triton.jit(do_not_specialize=["M", "OH", "OW"])
def _split_k_reduce_kernel(
    part_ptr,
    out_ptr,
    bias_ptr,
    M,
    OH,
    OW,
    C_out,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    stride_bias,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_the_launch_before(PDL)
    offs_pix = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pix_mask = offs_pix < M
    co_mask = offs_co < C_out
    mask = pix_mask[:, None] & co_mask[None, :]
    part_tile = part_ptr + offs_pix.to(tl.int64)[:, None] * C_out + offs_co[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # in split order: the same sum, bit for bit, every call
        acc += tl.load(part_tile + s * M.to(tl.int64) * C_out, mask=mask, other=0.0)
    ow = offs_pix % OW
    oh = (offs_pix // OW) % OH
    n = (offs_pix // (OW * OH)).to(tl.int64)
    _epilogue(
        acc,
        out_ptr,
        bias_ptr,
        n,
        oh,
        ow,
        offs_co,
        pix_mask,
        co_mask,
        stride_on,
        stride_oh,
        stride_ow,
        stride_oc,
        stride_bias,
        HAS_BIAS,
        RELU_OUT,
    )


MAX_KERNEL = 31  # the tap loop keeps a row's in-image taps as bits of an int32
REDUCE_BLOCK = (64, 64)  # the split-K reduction's tile: elementwise, any size works


def split_k_workspace_numel(rows: int, c_out: int, split_k: int) -> int:
    """Elements of the float32 workspace a split-K launch needs (0 for split_k 1)."""
    return split_k * rows * c_out if split_k > 1 else 0


def _pdl_flags(pdl: bool, device: torch.device) -> dict:
    """The kernels' constexpr and, when on, Triton's launch option for programmatic dependent
    launch. It is off where there is no griddepcontrol: Triton's interpreter (which runs each
    launch whole and in order) and GPUs before sm_90."""
    on = bool(pdl) and isinstance(_conv1x1_v2_kernel, triton.runtime.JITFunction)
    if on and device.type == "cuda":
        on = torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _check_workspace(workspace, numel, device):
    if not isinstance(workspace, torch.Tensor) or workspace.dtype != torch.float32:
        raise ValueError("SPLIT_K > 1 needs a float32 workspace tensor (split_k_workspace_numel elements)")
    if workspace.device != device or not workspace.is_contiguous() or workspace.numel() < numel:
        raise ValueError(
            f"the split-K workspace must be a contiguous float32 tensor of at least {numel} elements on "
            f"{device}, got {workspace.numel()} on {workspace.device}"
        )


def bn_relu_conv_v2(
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
    SPLIT_K=1,
    workspace=None,
    pdl=False,
):
    """bn_relu_conv's op and arguments (see its docstring), run by the v2 kernels. SPLIT_K > 1
    splits the K sum over that many programs per tile, their partials in `workspace` (float32,
    split_k_workspace_numel elements; the caller's, as every output here). pdl: launch with
    programmatic dependent launch (sm_90 and later, else ignored; see the module doc)."""
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
    if max(kh, kw) > MAX_KERNEL:
        raise ValueError(f"bn_relu_conv_v2 takes kernels up to {MAX_KERNEL}x{MAX_KERNEL}, got {kh}x{kw}")
    if not isinstance(SPLIT_K, int) or isinstance(SPLIT_K, bool) or SPLIT_K < 1:
        raise ValueError(f"SPLIT_K must be a positive int, got {SPLIT_K!r}")
    rows = n * oh * ow
    if SPLIT_K > 1:
        _check_workspace(workspace, split_k_workspace_numel(rows, c_out, SPLIT_K), x.device)
    has_prologue = in_scale is not None
    # Unused pointer arguments get a valid tensor; the constexpr flags compile their loads away.
    scale = in_scale if has_prologue else weight
    shift = in_shift if has_prologue else weight
    bias_arg = bias if bias is not None else weight
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(c_out, BLOCK_N), SPLIT_K)
    args = (
        x,
        weight,
        out,
        scale,
        shift,
        bias_arg,
        workspace if SPLIT_K > 1 else weight,
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
    )
    pdl_flags = _pdl_flags(pdl, x.device)  # the conv's and its reduction's
    flags = dict(
        HAS_PROLOGUE=has_prologue,
        HAS_BIAS=bias is not None,
        RELU_OUT=bool(relu_out),
        IEEE_DOT=weight.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        SPLIT_K=SPLIT_K,
        num_warps=num_warps,
        **pdl_flags,
    )
    if num_stages is not None:
        flags["num_stages"] = num_stages
    if kh == kw == 1 and padding == 0:
        _conv1x1_v2_kernel[grid](*args, STRIDE=stride, **flags)
    else:
        _conv_taps_v2_kernel[grid](*args, KH=kh, KW=kw, STRIDE=stride, PAD=padding, **flags)
    if SPLIT_K > 1:
        block_m, block_n = REDUCE_BLOCK
        reduce_grid = (triton.cdiv(rows, block_m), triton.cdiv(c_out, block_n))
        _split_k_reduce_kernel[reduce_grid](
            workspace,
            out,
            bias_arg,
            rows,
            oh,
            ow,
            c_out,
            *out.stride(),
            bias_arg.stride(0),
            SPLIT_K=SPLIT_K,
            HAS_BIAS=bias is not None,
            RELU_OUT=bool(relu_out),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            **pdl_flags,
        )
    return out
