"""Helpers shared by the tests (tests/ is on pytest's pythonpath: `from helpers import ...`)."""

import pytest
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere fails every comparison."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    diff, size = (out - ref).norm().item(), ref.norm().item()
    return diff / size if size > 0 else diff  # an all-zero reference asks for exact zeros


def randomize_batchnorm(
    model: torch.nn.Module, *, seed: int, image_size: int = 64, passes: int = 2, in_channels: int = 3
) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, then switch to eval.

    A few train-mode passes over random images calibrate the running statistics to the model's
    own activations (so deep networks stay numerically sane); random weight and bias make the
    affine part non-trivial too.
    """
    g = torch.Generator().manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the passes
            m.reset_running_stats()
    with torch.no_grad():
        for _ in range(passes):
            # The features alone where there is no classifier (a backbone: num_classes 0).
            run = model.forward_features if getattr(model, "classifier", True) is None else model
            run(torch.randn(4, in_channels, image_size, image_size, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, torch.nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


# -- kernel tests ------------------------------------------------------------------------------

KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# tl.dot on bfloat16 gives garbage under Triton's interpreter (triton 3.8): GPU only there.
DOT_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    """Fresh normal values from the test's generator, rounded to `dtype`, on `device`."""
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def assert_close(out, ref, tol):
    """No poisoned (unwritten) element left, and relative error under `tol` (a float or a dtype)."""
    tol = KERNEL_TOL.get(tol, tol)
    assert not torch.isnan(out).any(), "kernel left poisoned (unwritten) elements"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
