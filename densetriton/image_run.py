"""The one driver of the image commands, predict and embed: what every run of either does, in order.

1. check the output (kind, folder) and lock it: one run per output, refused before any work;
2. collect the inputs; refuse an output that is one of them; remove what a killed run left;
3. load the model; with --resume, read what earlier runs kept, else clear what they left;
4. shard the rest under torchrun (rank r takes the inputs i with i % world_size == r) and set aside
   the names the output cannot hold;
5. stream the images through the model, each batch's rows to the output as they come;
6. gather every rank's tally, merge the ranks' results (rank 0), summarise, and exit with the one
   status rule (stream.exit_status).

What a command writes, what --resume keeps and how its ranks' results merge, it supplies as an
`Output` (predict.Predictions, embed.Features); the sink an Output opens takes the rows.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

from .outputs import check_target, lock_outputs, refuse_inputs_as_outputs, remove_stale_temps
from .stream import (
    Dist,
    Tally,
    collect_files,
    describe_run,
    exit_status,
    load_engine,
    path_key,
    progress_label,
    set_aside,
    stream_images,
)


class Sink:
    """Where one rank's rows go as they come (a file, the screen, chunks on disk)."""

    def add(self, rows) -> None:
        """rows: [(index, path, model output)] of one batch, in input order."""
        raise NotImplementedError

    def finish(self) -> None:
        """Every row has come: make them durable."""

    def stopped(self) -> None:
        """The run stops on an error or Ctrl-C: keep what was computed, and say where it is."""

    def close(self) -> None:
        """Release the sink, after finish() or stopped()."""


class Output:
    """What a command writes. The driver calls, in this order: check(), start(), resume() or
    fresh(), set_aside_rules(), open(), then on rank 0 merge() and summarise()."""

    command = ""  # the progress bar's label: "predict", "embed"
    path: str | None = None  # --out; None: the screen
    appended = False  # the file is written in place (appended to), not replaced
    screen_under_torchrun = "under torchrun, give --out FILE"  # path None: refused where ranks would write at once

    def written_with(self, dist: Dist) -> list[str]:
        """Files written beside `path`: checked like it, and never one of the inputs."""
        return []

    def replaced(self) -> list[str]:
        """Files replaced by atomic_write: the temporary files a killed run left of these are removed."""
        return [self.path]

    def check(self, dist: Dist) -> None:
        """Refuse, before any work, an output that cannot be written."""
        check_target(self.path, self.written_with(dist), appended=self.appended)

    def start(self, engine, args, files: list[str]) -> None:
        """The model is loaded: refuse what it cannot do, and name it."""

    def model_call(self, engine):
        """What each batch goes through."""
        raise NotImplementedError

    def resume(self, dist: Dist) -> set[str]:
        """--resume: the keys (stream.path_key) of the inputs that earlier runs kept."""
        return set()

    def fresh(self, dist: Dist) -> None:
        """Without --resume: clear what earlier runs left (all ranks call it; rank 0 clears)."""

    def set_aside_rules(self) -> list:
        """(predicate, reason) for the paths the output cannot hold: skipped up front."""
        return []

    def resuming(self, already: int, total: int) -> str:
        return f"resuming: {already} of {total} images already done"

    def open(self, dist: Dist, resume: bool) -> Sink:
        raise NotImplementedError

    def merge(self, dist: Dist, files: list[str], done: int, resume: bool) -> None:
        """Rank 0, every rank's rows written: put the output together."""

    def summarise(self, done: int, skipped: list, elapsed: float, already: int) -> None:
        raise NotImplementedError


def run_image_command(args, output: Output) -> int:
    """Run predict or embed over args.paths into `output`; returns the exit status."""
    dist = Dist.from_env(args.device)
    try:
        if output.path is None and dist.active:
            raise ValueError(output.screen_under_torchrun)
        if output.path is not None:
            output.check(dist)
        with lock_outputs(output.path, dist) if output.path is not None else nullcontext():  # before any work
            return _run(args, dist, output)
    finally:
        dist.close()


def _run(args, dist: Dist, output: Output) -> int:
    files = collect_files(args.paths)
    if not files:
        raise ValueError("no image files found in " + ", ".join(args.paths))
    if output.path is not None:
        refuse_inputs_as_outputs(
            [output.path, *output.written_with(dist)], files + ([args.weights] if args.weights else [])
        )
        if dist.rank == 0:
            remove_stale_temps(output.replaced())
    engine = load_engine(args, dist)
    output.start(engine, args, files)
    done_keys = output.resume(dist) if args.resume else set()
    if not args.resume:
        output.fresh(dist)
    todo = [(i, p) for i, p in enumerate(files) if path_key(p) not in done_keys]
    already = len(files) - len(todo)
    mine, set_aside_now = set_aside([(i, p) for i, p in todo if i % dist.world == dist.rank], output.set_aside_rules())
    if dist.rank == 0:
        print(describe_run(engine, args), file=sys.stderr)
        if already:
            print(output.resuming(already, len(files)), file=sys.stderr)
    dist.barrier()  # every rank has read (or rank 0 has cleared) the old results before any rank writes

    tally, elapsed = _stream(engine, mine, args, dist, output)
    tally.skipped = set_aside_now + tally.skipped
    tallies = dist.all_gather((tally.done, tally.skipped))  # also a barrier: every rank's rows are written
    done = sum(d for d, _ in tallies)
    skipped = [s for _, sk in tallies for s in sk]
    if dist.rank == 0:
        output.merge(dist, files, done, args.resume)
    dist.barrier()
    if dist.rank == 0:
        output.summarise(done, skipped, elapsed, already)
    return exit_status(done, already)


def _stream(engine, items, args, dist: Dist, output: Output) -> tuple[Tally, float]:
    sink = output.open(dist, args.resume)
    start = time.perf_counter()
    try:
        tally = stream_images(
            engine,
            items,
            args,
            run=output.model_call(engine),
            on_batch=sink.add,
            desc=progress_label(output.command, dist),
            show=dist.rank == 0,
        )
        sink.finish()
    except BaseException:
        sink.stopped()
        raise
    finally:
        sink.close()
    return tally, time.perf_counter() - start
