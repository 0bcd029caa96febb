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


# -- guard bands: stores outside the output view --------------------------------------------------

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class GuardBand:
    """An output view inside a larger tensor, `margin` elements bigger on each side of every dim.

    The view is poisoned with NaN (unwritten elements fail assert_close); the band around it holds
    random finite values fixed at creation. An out-of-bounds store (a mask one channel, row or
    pixel too wide, a wrong stride) lands in the band instead of past the allocation, where the
    interpreter may corrupt its heap: assert_untouched() then fails, comparing the band bit for bit.
    Every dim keeps its stride order, so the view is as NHWC as the tensor it replaces.
    """

    def __init__(self, shape, *, dtype=torch.float32, device="cpu", margin=2):
        big = tuple(s + 2 * margin for s in shape)
        band_values = torch.randn(big, generator=torch.Generator().manual_seed(12345)) * 100
        self.base = band_values.to(dtype).to(device)
        self.view = self.base[tuple(slice(margin, margin + s) for s in shape)]
        self.view.fill_(float("nan"))
        self._outside = torch.ones(big, dtype=torch.bool)
        self._outside[tuple(slice(margin, margin + s) for s in shape)] = False
        self._before = self._bits().clone()

    def _bits(self):
        return self.base.cpu().view(_BITS[self.base.dtype])

    def assert_untouched(self):
        changed = (self._bits() != self._before) & self._outside
        if changed.any():
            first = tuple(i.item() for i in changed.nonzero()[0])
            raise AssertionError(
                f"kernel wrote {changed.sum().item()} element(s) outside its output view "
                f"(first at {first} of the guarded tensor {tuple(self.base.shape)})"
            )


def nan_surrounded(x, margin=2):
    """A copy of `x` as a view inside a NaN-filled tensor `margin` bigger on each side of every dim.

    A kernel that reads past its input view (a load mask a channel, row or pixel too wide) pulls
    NaN into its result even where it multiplies the value by a zero weight, so the read shows.
    """
    big = torch.full(tuple(s + 2 * margin for s in x.shape), float("nan"), dtype=x.dtype, device=x.device)
    view = big[tuple(slice(margin, margin + s) for s in x.shape)]
    view.copy_(x)
    return view


# -- non-finite inputs: NaN and Inf must go where torch's go ---------------------------------------


# numpy, under Triton's interpreter, warns when a product or sum makes NaN: here that is the point.
NONFINITE_OK = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def plant_nonfinite(x, gen, *, nan=1, posinf=2, neginf=2):
    """Write NaN, +Inf and -Inf into `x` in place at distinct positions drawn from `gen`."""
    flat_positions = torch.randperm(x.numel(), generator=gen)[: nan + posinf + neginf]
    values = [float("nan")] * nan + [float("inf")] * posinf + [float("-inf")] * neginf
    index = torch.unravel_index(flat_positions, x.shape)
    for i, value in enumerate(values):
        x[tuple(dim[i] for dim in index)] = value
    return x


def assert_nonfinite_like(out, ref, tol):
    """NaN, +Inf and -Inf at exactly the reference's positions, the finite rest within `tol`.

    The reference must hold both NaN and finite elements, else the check says little.
    """
    tol = KERNEL_TOL.get(tol, tol)
    out, ref = out.double().cpu(), ref.double().cpu()
    assert ref.isnan().any() and ref.isfinite().any(), "the planted values left no NaN (or no finite) output"
    for name, where in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = where(out), where(ref)
        assert torch.equal(got, want), (
            f"{name} at {got.sum().item()} output(s), torch has it at "
            f"{want.sum().item()}; {(got != want).sum().item()} position(s) differ"
        )
    finite = ref.isfinite()
    err = rel_err(out[finite], ref[finite])
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e} on the finite outputs"  # tol 0: exact
