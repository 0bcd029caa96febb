"""Validation helpers shared by the launchers (no kernels here)."""

import torch

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_nhwc(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, H, W, C] view, got shape {tuple(t.shape)}")
    if t.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_vector(name, t, length, device):
    """A per-channel float32 vector of `length` elements (any 1-D stride)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_same_device(device, **tensors):
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_block(name, value, minimum=1):
    if not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")


def check_weight_rows(weight):
    """A [K, Cout] GEMM operand: unit column stride, rows no closer than Cout (padding allowed)."""
    rows, cols = weight.shape
    # A stride along a dimension of size 1 is never used, as torch's is_contiguous() has it.
    if (cols > 1 and weight.stride(1) != 1) or (rows > 1 and weight.stride(0) < cols):
        raise ValueError(
            f"weight must have unit column stride and rows at least Cout apart (see pack_conv_weight), "
            f"got strides {tuple(weight.stride())} for shape {tuple(weight.shape)}"
        )


def _pair(v, name):
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def check_conv_args(x, weight, out, *, kernel_size, stride, padding, in_scale, in_shift, bias, blocks):
    """Every check of a bn_relu_conv launch; returns (n, h, w, c_in, oh, ow, c_out, kh, kw)."""
    check_nhwc("x", x)
    check_nhwc("out", out)
    kh, kw = _pair(kernel_size, "kernel_size")
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")

    n, h, w, c_in = x.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} too small for kernel {kh}x{kw} with padding {padding}")
    c_out = out.shape[3]
    if tuple(out.shape) != (n, oh, ow, c_out):
        raise ValueError(f"out must have shape {(n, oh, ow, c_out)} (N, OH, OW, Cout), got {tuple(out.shape)}")

    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D prepacked [KH*KW*Cin, Cout] tensor (see pack_conv_weight)")
    if tuple(weight.shape) != (kh * kw * c_in, c_out):
        raise ValueError(
            f"weight must have shape {(kh * kw * c_in, c_out)} for kernel {kh}x{kw}, Cin={c_in}, "
            f"Cout={c_out}; got {tuple(weight.shape)}"
        )
    if weight.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    check_weight_rows(weight)
    check_same_device(x.device, weight=weight, out=out)

    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together or not at all")
    if in_scale is not None:
        check_vector("in_scale", in_scale, c_in, x.device)
        check_vector("in_shift", in_shift, c_in, x.device)
    if bias is not None:
        check_vector("bias", bias, c_out, x.device)
    for name, value in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), blocks):
        check_block(name, value, minimum=16)  # tl.dot needs every tile dim >= 16
    return n, h, w, c_in, oh, ow, c_out, kh, kw
