"""`densetriton tune`: sweep tile candidates per layer shape on a GPU and write a tuned table.

    densetriton tune [--model densenet121 ...] [--batch-size 1 8 ...] [--dtype float16] [--image-size 224]
                     [--budget-s 120] [--repeats 20] [--out FILE|DIR]

For every GEMM layer shape of the models' plans (densetriton.tiles.LayerKey: op, kernel variant
as DENSETRITON_KERNELS selects it, dtype, batch, output size, channels), heaviest first:
candidate tiles around the current choice, one axis at a time. Each candidate's output, on
random inputs and into an output filled with NaN, is checked against the v1 kernel with the
heuristic tiles (relative error under a per-dtype bound) before it is timed (median of
CUDA-event-timed launches); a candidate that fails to build or to compile is listed with why.
The fastest checked candidate goes into the table where it beats the current tiles by more than
MARGIN (timing noise); the rest keep the heuristics.

The table goes to `<densetriton cache>/tuned/<gpu>-triton<major.minor>.json` (what an engine
reads first), merged with the entries already there, or to --out (a file, or a folder such as
the package's kernels/tuned/ to get the standard name). Engines only read tables: nothing is
tuned at load time. --budget-s: no candidate is started after S seconds; what was measured is
written, and the summary says how many candidates were not run. An interrupt (Ctrl-C, SIGINT)
stops the sweep the same way: the table is written, and the exit status is 130.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from densetriton.plan import buffer_shapes, build_stages, stage_op
from densetriton.tiles import (
    GEMM_OPS,
    MAX_SPLIT_K,
    SPLIT_K_VARIANTS,
    LayerKey,
    choose_tiles,
    load_tuned_table,
    tuned_table_json,
    tuned_table_name,
)

from .timing import Timer

# Largest relative error (float64 norm over the output) against v1 with the heuristic tiles:
# tiles change only the order of float32 accumulation, then one rounding to the output dtype.
TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4}
MARGIN = 0.03  # a candidate must beat the current tiles' median by 3% to enter the table
TRITON_DEFAULT_STAGES = 3  # what a launch without num_stages gets on CUDA
BLOCK_AXES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


# -- which layers -----------------------------------------------------------------------------


def layer_keys(spec, batch: int, height: int, width: int, dtype: str, kernel_choice) -> list[LayerKey]:
    """The LayerKey of every GEMM launch of spec's plan for (batch, height, width), as the plan
    keys its tiles (densetriton.plan.Plan): the output's size, the classifier on float32."""
    shapes = buffer_shapes(spec, height, width)
    keys = []
    for stage in build_stages(spec):
        op = stage_op(stage)
        if op not in GEMM_OPS:
            continue
        if op == "classifier":
            hw, key_dtype = (1, 1), "float32"
        else:  # a bottleneck conv writes the shared scratch at its block's size
            written = stage.writes.buffer
            hw, key_dtype = (
                shapes[written if written in shapes and written != "bottleneck_scratch" else stage.reads.buffer][:2],
                dtype,
            )
        keys.append(
            LayerKey(
                op,
                kernel_choice.of(op),
                key_dtype,
                batch,
                *hw,
                stage.reads.stop - stage.reads.start,
                stage.writes.stop - stage.writes.start,
                stage.kernel_size,
            )
        )
    return keys


def layer_macs(key: LayerKey) -> int:
    return key.rows * key.c_in * key.c_out * key.kernel_size**2


def _cover(n: int) -> int:
    """The smallest power of two from 16 that is at least n."""
    return max(16, 1 << (n - 1).bit_length())


def candidate_tiles(key: LayerKey) -> list[dict]:
    """The current tiles first, then each single-axis change: a block size halved or doubled
    (BLOCK_M also quartered: more programs at small batch), from 16 up to what its axis needs; the
    other warp count; 2 or 4 pipeline stages. Bad ones fail their build and are listed, not fatal."""
    current = choose_tiles(key, interpreted=False)
    base = {"num_warps": 4, "num_stages": TRITON_DEFAULT_STAGES, **current}  # a table entry names both
    found = [current]

    def add(tiles):
        if tiles not in found and tiles != base:
            found.append(tiles)

    # No tile wider than its axis needs (a power of two from 16): N covers c_out, K the GEMM's K.
    k = key.c_in * key.kernel_size**2 if key.op == "stem" else key.c_in
    widest = {"BLOCK_M": 256, "BLOCK_N": min(256, _cover(key.c_out)), "BLOCK_K": min(256, _cover(k))}
    for axis in BLOCK_AXES:
        narrower = (base[axis] // 2, base[axis] // 4) if axis == "BLOCK_M" else (base[axis] // 2,)  # more programs
        for size in (*narrower, base[axis] * 2):
            if 16 <= size <= widest[axis]:
                add({**base, axis: size})
    add({**base, "num_warps": 4 if base["num_warps"] == 8 else 8})
    for stages in (2, 4):
        add({**base, "num_stages": stages})
    if (key.op, key.variant) in SPLIT_K_VARIANTS:  # K split over half or twice as many programs
        split = base.get("SPLIT_K", 1)
        for other in (split // 2, split * 2):
            if 1 <= other <= 2 * MAX_SPLIT_K:
                add({k: v for k, v in base.items() if k != "SPLIT_K"} | ({"SPLIT_K": other} if other > 1 else {}))
    return found


# -- the sweep --------------------------------------------------------------------------------


@dataclass
class Trial:
    key: LayerKey
    tiles: dict
    status: str  # "timed", "rejected" (wrong output), "failed" (build or compile), "not run" (budget)
    error: float | None = None  # relative error against the reference
    ms: float | None = None  # median launch time
    reason: str | None = None


@dataclass
class Sweep:
    trials: list = field(default_factory=list)
    winners: dict = field(default_factory=dict)  # LayerKey -> tiles that beat the current ones
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64; inf where got holds a NaN or infinity (e.g. poison left unwritten)."""
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference_output(key: LayerKey, device, build) -> torch.Tensor:
    """v1's output with the heuristic tiles, on the inputs every candidate of key gets (same seed)."""
    v1 = LayerKey(**{**key.__dict__, "variant": "v1"})
    return build(v1, choose_tiles(v1, interpreted=device.type != "cuda"), device=device)().clone()


def launch_times(run, repeats: int, device) -> list[float]:
    """ms of each of repeats launches (CUDA events on a GPU), after two untimed ones."""
    return Timer(device).time(lambda _: run(), [None], repeats=repeats, warmup=2)


def try_candidate(key: LayerKey, tiles: dict, ref: torch.Tensor, device, build, repeats: int, timer) -> Trial:
    """Build, check against ref (the output starts as NaN), and only then time one candidate."""
    try:
        run = build(key, tiles, device=device)
        error = relative_error(run(), ref)
        if not error <= TOLERANCE[key.dtype]:
            return Trial(key, tiles, "rejected", error, reason=f"relative error {error:.2e} > {TOLERANCE[key.dtype]:g}")
        times = timer(run, repeats, device)
    except Exception as e:  # a tile the kernel refuses, a compile out of shared memory: this candidate only
        return Trial(
            key,
            tiles,
            "failed",
            reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300],
        )
    return Trial(key, tiles, "timed", error, float(np.median(times)))


def winner(trials: list[Trial]) -> dict | None:
    """The fastest checked candidate's tiles where it beats the current tiles (the first
    candidate) by MARGIN; any checked candidate where the current tiles were not timed."""
    timed = [t for t in trials if t.status == "timed"]
    if not timed:
        return None
    best = min(timed, key=lambda t: t.ms)
    current = trials[0]
    if best is current or (current.status == "timed" and best.ms > current.ms * (1 - MARGIN)):
        return None
    return best.tiles


class Stop:
    """Why no further candidate starts: the budget spent, or an interrupt (SIGINT) received."""

    def __init__(self, budget_s: float | None, clock):
        self.budget_s, self.clock, self.started, self.interrupted = budget_s, clock, clock(), False

    def reason(self) -> str | None:
        if self.interrupted:
            return "interrupted"
        if self.budget_s is not None and self.clock() - self.started >= self.budget_s:
            return f"--budget-s {self.budget_s:g} spent"
        return None


def sweep_key(
    key: LayerKey, tiles_list: list, *, device, stop: Stop, build, repeats: int, timer, progress=None
) -> list[Trial]:
    """One layer shape's candidates: the reference once, then each candidate until stopped."""
    ref = None
    trials = []
    for tiles in tiles_list:
        why = stop.reason()
        if why is None:
            try:
                ref = reference_output(key, device, build) if ref is None else ref
                trials.append(try_candidate(key, tiles, ref, device, build, repeats, timer))
            except KeyboardInterrupt:  # keep what was measured: the table is still written
                stop.interrupted, why = True, "interrupted"
        if why is not None:
            trials.append(Trial(key, tiles, "not run", reason=why))
        elif progress:
            progress(trials[-1])
    return trials


def sweep(
    keys,
    *,
    device,
    budget_s: float | None = None,
    repeats: int = 20,
    candidates=candidate_tiles,
    build=None,
    timer=launch_times,
    clock=time.perf_counter,
    progress=None,
) -> Sweep:
    """Every distinct key, heaviest first: its candidates checked, then timed, until the budget is
    spent or an interrupt comes. build(key, tiles, device=) -> a launch returning its output
    (densetriton.tuning's); timer(launch, repeats, device) -> ms per launch."""
    from densetriton.tuning import build_candidate

    device, stop, result = torch.device(device), Stop(budget_s, clock), Sweep()
    for key in sorted(dict.fromkeys(keys), key=layer_macs, reverse=True):
        trials = sweep_key(
            key,
            candidates(key),
            device=device,
            stop=stop,
            build=build or build_candidate,
            repeats=repeats,
            timer=timer,
            progress=progress,
        )
        result.trials += trials
        best = winner(trials)
        if best is not None:
            result.winners[key] = best
    result.interrupted = stop.interrupted
    return result


# -- the table --------------------------------------------------------------------------------


def default_table_path(gpu_name: str, triton_version: str) -> Path:
    from densetriton.weights import cache_dir

    return cache_dir() / "tuned" / tuned_table_name(gpu_name, triton_version)


def write_table(path: Path, gpu_name: str, triton_version: str, winners: dict) -> Path:
    """Write winners as a tuned table at path (a folder gets the standard name), keeping the
    entries of a table already there that winners do not replace. Written atomically."""
    from densetriton.atomic import atomic_write

    path = Path(path)
    if path.is_dir() or str(path).endswith("/"):
        path = path / tuned_table_name(gpu_name, triton_version)
    entries = dict(load_tuned_table(path).entries) if path.is_file() else {}  # a malformed one: its ValueError
    entries.update(winners)
    text = tuned_table_json(gpu_name, triton_version, entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def describe(t: Trial) -> str:
    """One line for a trial: the layer, the tiles, and its time or why it has none."""
    k = t.key
    what = f"{t.ms:.4g} ms (error {t.error:.1e})" if t.status == "timed" else f"{t.status}: {t.reason}"
    return f"{k.op} {k.variant} {k.c_in}->{k.c_out} at {k.height}x{k.width} batch {k.batch} {t.tiles}: {what}"


def summary(result: Sweep) -> str:
    lines = [
        f"{len({t.key for t in result.trials})} layer shapes, {len(result.trials)} candidates: "
        f"{result.count('timed')} timed, {result.count('rejected')} rejected by the output check, "
        f"{result.count('failed')} failed to build, {result.count('not run')} not run (budget or interrupt); "
        f"{len(result.winners)} shapes beat their current tiles by more than {MARGIN:.0%}"
    ]
    lines += [f"  {describe(t)}" for t in result.trials if t.status in ("rejected", "failed")]
    return "\n".join(lines) + "\n"


# -- the command ------------------------------------------------------------------------------


def run(args) -> int:
    import triton

    from densetriton.spec import get_spec
    from densetriton.variants import kernel_choice_from_env

    if not torch.cuda.is_available():
        raise RuntimeError(
            "tune times kernels on a CUDA GPU, and none is available (tuned tiles are per GPU; "
            "the interpreter ignores them)"
        )
    if args.repeats < 1 or any(b < 1 for b in args.batch_size or [1]):
        raise ValueError("--repeats and --batch-size must be positive")
    device, choice = torch.device("cuda", torch.cuda.current_device()), kernel_choice_from_env()
    keys = [
        key
        for model in (args.model or ["densenet121"])
        for batch in (args.batch_size or [1])
        for key in layer_keys(get_spec(model), batch, args.image_size, args.image_size, args.dtype, choice)
    ]
    result = sweep(
        keys,
        device=device,
        budget_s=args.budget_s,
        repeats=args.repeats,
        progress=lambda t: print(f"tune: {describe(t)}", file=sys.stderr, flush=True),
    )
    gpu, version = torch.cuda.get_device_name(device), triton.__version__
    path = write_table(Path(args.out) if args.out else default_table_path(gpu, version), gpu, version, result.winners)
    print(summary(result), end="")
    print(f"wrote {path} ({gpu}, triton {version}, kernels {choice.describe()})")
    return 130 if result.interrupted else 0  # as a shell reports SIGINT, after the table is written
