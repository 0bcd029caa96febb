"""Do two kernel selections give the same network? Logits of engines built under each, compared.

    python -m densetriton.bench.variant_check [--model densenet121 ...] [--batch-size 1 256]
                                              [--dtype float16] [--kernels v1 v2]

Each model's engines share one set of random weights (seeded) and see the same random inputs;
every selection after the first is compared with the first (relative error of the logits,
float64, NaN anywhere fails) and with PyTorch's float32 reference backend. Prints one line per
model x batch x selection and exits 1 if any relative error exceeds --tol. What a GPU run checks
before it trusts the A/B timings of a new variant at the shapes the bench times.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-4}


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not out.isfinite().all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _engine(weights, device, dtype, selection):
    """An engine created under DENSETRITON_KERNELS=selection (read at creation), env restored."""
    import densetriton
    from densetriton.variants import ENV_VAR

    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = selection
    try:
        return densetriton.Engine(weights, device=device, dtype=dtype, backend="triton", pretrained=False)
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def check_model(model, batches, dtype_name, selections, device, image_size=224, seed=0):
    """[(batch, selection, error vs first selection, error vs reference)] for one model."""
    import torch

    import densetriton
    from densetriton.engine import random_weights
    from densetriton.spec import get_spec

    spec = get_spec(model)
    torch.manual_seed(seed)
    weights = random_weights(spec)
    dtype = getattr(torch, dtype_name)
    engines = [_engine(weights, device, dtype, s) for s in selections]
    reference = densetriton.Engine(weights, device=device, dtype=torch.float32, backend="reference", pretrained=False)
    rows = []
    for batch in batches:
        x = torch.randn(
            batch, spec.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed + batch)
        ).to(device)
        with torch.no_grad():
            ref = reference(x)
        outs = [engine(x.to(dtype)) for engine in engines]
        rows += [(batch, s, rel_err(out, outs[0]), rel_err(out, ref)) for s, out in zip(selections, outs)]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m densetriton.bench.variant_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["densenet121", "densenet201"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[1, 256])
    p.add_argument("--dtype", default="float16", choices=sorted(DEFAULT_TOL))
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["v1", "v2"],
        metavar="CHOICE",
        help="DENSETRITON_KERNELS values; the first is the baseline (default: v1 v2)",
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tol", type=float, default=None, help="largest relative error accepted (default: by dtype)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (Triton's interpreter)")
    args = p.parse_args(argv)

    import torch

    from densetriton.variants import parse_kernel_choice

    for selection in args.kernels:
        try:
            parse_kernel_choice(selection)
        except ValueError as e:
            p.error(str(e))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]
    worst = 0.0
    for model in args.model:
        for batch, selection, vs_first, vs_ref in check_model(
            model, args.batch_size, args.dtype, args.kernels, device, args.image_size
        ):
            worst = max(worst, vs_first, vs_ref)
            print(
                f"{model} batch {batch} {args.dtype} DENSETRITON_KERNELS={selection}: rel err vs "
                f"{args.kernels[0]} {vs_first:.2e}, vs float32 reference {vs_ref:.2e}",
                flush=True,
            )
    print(f"{'ok' if worst <= tol else 'FAILED'}: largest relative error {worst:.2e} (tolerance {tol:.0e})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
