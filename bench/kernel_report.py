"""What the kernels of a plan compile to on an NVIDIA GPU, read on a machine without one.

For every distinct Triton specialisation that a plan (model x batch x dtype x image size, under
a kernel selection as DENSETRITON_KERNELS gives it) launches: registers per thread, bytes spilled
to local memory, shared memory, the SASS instructions and MMA instructions of one K step (the
innermost loop holding the MMAs, plus what an enclosing loop adds per outer iteration), and the
time Triton plus ptxas took to build it, compiled for an NVIDIA target (default sm_90, the H100).

Why: a kernel that spills or asks for more shared memory than an SM has is slow (or fails to
launch) whatever its tile sizes promise, and that shows here, without a GPU. The number of
specialisations and their summed build time is the cold start on an empty Triton cache.

    python -m densetriton.bench.kernel_report --model densenet201 --batch-size 1 64 --dtype float16 [--kernels v2]

Run it without TRITON_INTERPRET (it needs Triton's compiler, not its interpreter). It uses
Triton's own argument binder, so a specialisation here is one compile on the GPU host.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

DTYPES = ("float16", "bfloat16", "float32")
# Shared memory one thread block may use (KB), per compute capability; ptxas does not check it.
SMEM_LIMIT_KB = {80: 163, 86: 99, 89: 99, 90: 227}


@dataclass
class Specialisation:
    kernel: str
    constants: dict  # constexpr arguments and launch options that differ between launches
    unaligned: list  # integer arguments not divisible by 16 and pointers not 16-byte aligned
    stages: list = field(default_factory=list)  # stage names (model/batch/dtype) that launch it
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    compile_s: float | None = None
    error: str | None = None
    k_loop: tuple | None = None  # sass_k_loop(): SASS instructions and MMAs per K step, outer loops' extra


def _kernels():
    """Every @triton.jit kernel of densetriton.kernels, by name."""
    import triton

    from .. import kernels as _  # noqa: F401  (imports the kernel modules)

    found = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("densetriton.kernels.") or mod is None:
            continue
        for name, obj in vars(mod).items():
            if name.endswith("_kernel"):
                if not isinstance(obj, triton.runtime.jit.JITFunction):
                    raise RuntimeError(
                        "kernel_report needs Triton's compiler: run it without TRITON_INTERPRET=1 "
                        f"({name} is a {type(obj).__name__}, not a JITFunction)"
                    )
                found[name] = obj
    return found


@contextlib.contextmanager
def _record_launches(kernels, sink):
    """Launches of `kernels` append (name, args, kwargs) to sink instead of running."""

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            sink.append((name, args, kwargs))

        return run

    try:
        for name, fn in kernels.items():
            fn.run = recorder(name)  # an instance attribute: JITFunction.__getitem__ calls self.run
        yield
    finally:
        for fn in kernels.values():
            fn.__dict__.pop("run", None)


def collect(models, batches, dtypes, image_sizes=(None,), kernel_choice=None):
    """(kernels by name, launches): every launch of every plan as (kernel, args, kwargs, where).

    The plans are built on CPU tensors with the GPU's tile sizes and the kernel variants of
    kernel_choice (default: each op's default); the recorder stands in for the kernels, so nothing
    runs. An image size of None is the model's own (224, or 32 for CIFAR).
    """
    import torch

    from ..engine import random_weights
    from ..plan import Plan, build_stages, fold_batchnorm
    from ..spec import get_spec

    kernels = _kernels()
    launches = []
    for model in models:
        spec = get_spec(model)
        stages = build_stages(spec)
        tensors = random_weights(spec).tensors
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            folded = fold_batchnorm(tensors, spec, dtype, "cpu")
            for image_size, n in itertools.product(image_sizes, batches):
                size = image_size or (224 if spec.stem == "imagenet" else 32)
                plan = Plan(
                    spec,
                    stages,
                    folded,
                    n=n,
                    height=size,
                    width=size,
                    dtype=dtype,
                    device=torch.device("cpu"),
                    interpreted=False,
                    kernel_choice=kernel_choice,
                )
                x = torch.empty(n, spec.in_channels, size, size, dtype=dtype)
                logits = torch.empty(n, spec.num_classes)
                for stage, launch in plan.launches:
                    start = len(launches)
                    with _record_launches(kernels, launches):
                        launch(x, logits)
                    where = f"{model}/b{n}/{size}px/{dtype_name}:{stage.name}"
                    launches[start:] = [(*launch_args, where) for launch_args in launches[start:]]
                del plan
    return kernels, launches


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specialise(kernels, launches, arch):
    """Group launches by the specialisation Triton would compile for each."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    binders = {name: create_function_from_signature(fn.signature, fn.params, backend) for name, fn in kernels.items()}
    groups = {}
    for name, args, kwargs, where in launches:
        kwargs = dict(kwargs, debug=False)
        bound, specialization, options = binders[name](*args, **kwargs)
        key = (name, repr(specialization), repr(sorted(options.items())))
        if key not in groups:
            params = kernels[name].params
            constants = {p.name: bound[p.name] for p in params if p.is_constexpr}
            constants.update({k: v for k, v in options.items() if k in ("num_warps", "num_stages")})
            # Triton's key per argument: ("i32", "D") divisible by 16, ("i32", "") not, None
            # when not specialised (do_not_specialize); pointers likewise for 16-byte alignment.
            unaligned = [p.name for p, (_, attr) in zip(params, specialization) if attr == ""]
            groups[key] = (Specialisation(name, constants, unaligned), (bound, specialization, options, kwargs))
        groups[key][0].stages.append(where)
    return backend, groups


def _ptxas_report(ptx: str, arch: int):
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the one Triton itself runs (honours TRITON_PTXAS_PATH)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [
                ptxas,
                "-v",
                f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                f.name,
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    if out.returncode != 0 or regs is None:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()[:300]}")
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?P<op>.*?)\s*;")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_MMA = re.compile(r"^(@!?U?P\w+\s+)?(HGMMA|HMMA|IMMA)")


def sass_k_loop(sass: str) -> tuple[int, int, int] | None:
    """(instructions, MMA instructions, instructions of enclosing loops outside it) of the
    innermost SASS loop that holds the kernel's MMAs: the cost of one K step, and what a loop
    around it (v1's loop over taps) adds per outer iteration. None without an MMA loop (the
    float32 kernels' IEEE products run on FFMA)."""
    ops, labels = [], {}
    for line in sass.splitlines():
        label, ins = _SASS_LABEL.match(line), _SASS_LINE.match(line)
        if label:
            labels[label.group(1)] = len(ops)
        elif ins:
            ops.append(ins.group("op"))
    loops = [
        (labels[m.group(1)], i)
        for i, op in enumerate(ops)
        if (m := _SASS_BRANCH.search(op)) and labels.get(m.group(1), i + 1) <= i
    ]
    with_mma = [(a, b) for a, b in loops if any(_MMA.match(op) for op in ops[a : b + 1])]
    if not with_mma:
        return None
    a, b = min(with_mma, key=lambda loop: loop[1] - loop[0])
    outer = max(with_mma, key=lambda loop: loop[1] - loop[0])
    mma = sum(1 for op in ops[a : b + 1] if _MMA.match(op))
    return b - a + 1, mma, (outer[1] - outer[0]) - (b - a)


def _sass(cubin: bytes, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(arch).path), "nvdisasm")  # bundled beside ptxas
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr.strip()[:300]}")
    return out.stdout


def build(kernels, backend, groups, arch, progress=True):
    """Compile each specialisation (into an empty Triton cache) and read its resources."""
    items = list(groups.values())
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # timing a compile, not a cache hit
        try:
            for i, (spec, packed) in enumerate(items, 1):
                _build_one(kernels[spec.kernel], spec, packed, backend, arch)
                if progress:
                    print(f"[{i}/{len(items)}] {_describe(spec)}", file=sys.stderr, flush=True)
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    return [s for s, _ in items]


def _build_one(fn, spec, packed, backend, arch):
    import triton
    from triton.compiler import ASTSource

    bound, specialization, options, kwargs = packed
    try:
        opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        t0 = time.perf_counter()
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=_target(arch), options=opts.__dict__
        )
        compile_s = time.perf_counter() - t0
        spec.registers, spec.spill_bytes = _ptxas_report(compiled.asm["ptx"], arch)
        spec.shared_bytes, spec.compile_s = compiled.metadata.shared, compile_s
        spec.k_loop = sass_k_loop(_sass(compiled.asm["cubin"], arch))
        if kwargs.get("PDL") and "griddepcontrol.wait" not in compiled.asm["ptx"]:
            spec.error = "PDL=1, but its PTX never waits for the launch before (no griddepcontrol.wait)"
        elif kwargs.get("PDL") and not getattr(compiled.metadata, "launch_pdl", False):
            spec.error = "PDL=1, but it is not launched with programmatic dependent launch (launch_pdl)"
    except Exception as e:  # one failure is a finding, not the end of the report
        spec.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _describe(s: Specialisation) -> str:
    consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in s.constants.items())
    if s.error:
        return f"{s.kernel} {consts}: FAILED {s.error}"
    return (
        f"{s.kernel} {consts}: {s.registers} regs, {s.spill_bytes} B spilled, "
        f"{s.shared_bytes} B shared, {s.compile_s:.2f} s"
    )


def _k_loop_text(k_loop) -> str:
    if k_loop is None:
        return "-"
    instructions, mma, outer = k_loop
    return f"{instructions}/{mma}" + (f" (+{outer})" if outer else "")


def table(specs, arch) -> str:
    limit = SMEM_LIMIT_KB.get(arch, 227) * 1024
    lines = [
        "| kernel | constants | not /16 | launches | first launch | registers | spill B | shared B | compile s "
        "| SASS/MMA per K step (+ outer loop) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(specs, key=lambda s: (s.kernel, -len(s.stages))):
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in s.constants.items())
        notes = []
        if s.error:
            notes.append(s.error)
        if s.spill_bytes:
            notes.append("SPILLS")
        if s.shared_bytes is not None and s.shared_bytes > limit:
            notes.append(f"shared memory over sm_{arch}'s {limit // 1024} KB")
        f = lambda v, fmt="{}": "-" if v is None else fmt.format(v)  # noqa: E731
        lines.append(
            f"| {s.kernel} | {consts} | {' '.join(s.unaligned)} | {len(s.stages)} | {s.stages[0]} | "
            f"{f(s.registers)} | {f(s.spill_bytes)} | "
            f"{f(s.shared_bytes)} | {f(s.compile_s, '{:.2f}')} | {_k_loop_text(s.k_loop)} | {'; '.join(notes)} |"
        )
    built = [s for s in specs if s.compile_s is not None]
    lines.append("")
    lines.append(
        f"{len(specs)} specialisations, {sum(len(s.stages) for s in specs)} launches; "
        f"{sum(1 for s in specs if s.spill_bytes)} spill, {sum(1 for s in specs if s.error)} failed; "
        f"build time {sum(s.compile_s for s in built):.1f} s on this machine (serial, empty cache)"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m densetriton.bench.kernel_report", description=__doc__.split("\n\n")[0])
    from ..spec import list_models

    p.add_argument(
        "--model",
        nargs="+",
        default=["densenet121"],
        choices=list_models(),
        metavar="NAME",
        help="registry models (default densenet121; one of: " + ", ".join(list_models()) + ")",
    )
    p.add_argument("--batch-size", nargs="+", type=int, default=[1, 64], help="batch sizes (default 1 64)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float16"], help="compute dtypes (default float16)")
    p.add_argument(
        "--image-size",
        nargs="+",
        type=int,
        default=[None],
        metavar="S",
        help="square input sizes (default 224; 32 for CIFAR stems)",
    )
    p.add_argument(
        "--kernels",
        default=None,
        metavar="CHOICE",
        help="kernel variants, as DENSETRITON_KERNELS takes them (e.g. v2, or conv1x1=v2,conv3x3=v1); "
        "default: $DENSETRITON_KERNELS, else each op's default",
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 to compile for (default 90: H100)")
    p.add_argument(
        "--count-only",
        action="store_true",
        help="count the specialisations (one line per --batch-size and in all), compile nothing",
    )
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 if a kernel spills or fails to build")
    args = p.parse_args(argv)
    from ..variants import kernel_choice_from_env, parse_kernel_choice

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the report compiles kernels, the interpreter does not")

    try:
        choice = parse_kernel_choice(args.kernels) if args.kernels is not None else kernel_choice_from_env()
    except ValueError as e:
        p.error(str(e))
    kernels, launches = collect(args.model, args.batch_size, args.dtype, args.image_size, choice)
    backend, groups = specialise(kernels, launches, args.arch)
    if args.count_only:
        # Per input shape too: what one shape needs on its own, against what all of them need.
        def shape_of(launch):  # "model/bN/Spx/dtype:stage" -> ("Spx", "bN", "dtype")
            _, batch, size, dtype = launch[3].split(":")[0].split("/")
            return size, batch, dtype

        for shape in sorted({shape_of(launch) for launch in launches}):
            own = [launch for launch in launches if shape_of(launch) == shape]
            print(f"{' '.join(shape)}: {len(specialise(kernels, own, args.arch)[1])} specialisations")
        print(f"{len(groups)} specialisations, {len(launches)} launches")
        return 0
    specs = build(kernels, backend, groups, args.arch)
    print(f"kernel variants: {choice.describe()}\n")
    print(table(specs, args.arch), end="")
    bad = [s for s in specs if s.spill_bytes or s.error]
    return 1 if args.fail_on_spill and bad else 0


if __name__ == "__main__":
    sys.exit(main())
