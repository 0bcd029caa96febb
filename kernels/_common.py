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
