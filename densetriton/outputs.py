"""Guards for the files a command writes: one writer per output at a time, an output that is never
one of the command's inputs, a target of the right kind in a writable folder, and the temporary
files a killed run left removed.

The lock is `fcntl.flock` on a sidecar file, `.NAME.lock` beside the output, held for the whole
run and holding its owner's pid, host, start time and command, so that a second run on the same
output is refused at once with one line naming the first. flock is released by the kernel when
its owner dies, however it dies, so a lock file a killed run left behind locks nothing. Under
torchrun rank 0 owns the output (`.NAME.lock`) and every rank r its own part (`.NAME.partR.lock`).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from .atomic import stale_temps


class OutputBusy(ValueError):
    """Another live process holds the output's lock."""


def _real(out: str | os.PathLike) -> Path:
    """The file behind `out` (links resolved): two spellings of one output share one lock."""
    return Path(os.path.realpath(out))


def lock_path(out: str | os.PathLike) -> Path:
    real = _real(out)
    return real.parent / f".{real.name}.lock"


def part_name(out: str | os.PathLike, rank: int) -> str:
    """Rank r's share of an output under torchrun (predict writes it as a file of that name)."""
    return f"{os.fspath(out)}.part{rank}"


def _this_process() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] == "__main__.py":
        argv[0] = "python -m densetriton"
    command = shlex.join(argv).replace("\n", "\\n").replace("\r", "\\r")
    if len(command) > 300:
        command = command[:297] + "..."
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {command}"


def _owner(fd: int) -> str:
    """What the lock's holder wrote about itself; it writes just after locking, so wait a moment."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.025)
    return "a process that has not yet named itself"


class OutputLock:
    """An exclusive lock on one output, held from acquire() until release() (or the owner's death)."""

    def __init__(self, out: str | os.PathLike, *, what: str = "--out"):
        self.out, self.what = os.fspath(out), what
        self.path = lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.what} {self.out}: cannot create its folder ({e.strerror or e})") from None
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise ValueError(
                    f"{self.what} {self.out}: cannot write in {self.path.parent} ({e.strerror or e})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise OutputBusy(
                    f"{self.what} {self.out} is being written by another run ({owner}); wait for it to "
                    f"finish, or write to another file"
                ) from None
            if self._still_named(fd):
                self.fd = fd
            else:  # its holder removed it between our open and flock: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (_this_process() + "\n").encode("utf-8", "backslashreplace"), 0)
        return self

    def _still_named(self, fd: int) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._still_named(self.fd):
                os.unlink(self.path)  # while still locked: a waiter then finds it gone and locks afresh
        except OSError:
            pass  # a lock file left behind locks nothing once released
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_outputs(out: str, dist, *, what: str = "--out") -> ExitStack:
    """Lock `out` for this run (rank 0) and this rank's part (under torchrun), on every rank or on
    none: a rank that finds a lock taken makes every rank fail with that one line, before any work.
    Returns the ExitStack that releases them."""
    stack = ExitStack()
    error = None
    try:
        if dist.rank == 0:
            stack.enter_context(OutputLock(out, what=what))
        if dist.active:
            stack.enter_context(OutputLock(part_name(out, dist.rank), what=what))
    except ValueError as e:
        error = str(e)
    errors = [e for e in dist.all_gather(error) if e is not None] if dist.active else [error] * (error is not None)
    if errors:
        stack.close()
        raise OutputBusy(errors[0])
    return stack


def check_target(out: str, sidecars: list[str] = (), *, appended: bool = False, what: str = "--out") -> None:
    """Refuse, before any work, an output that is a folder or not a regular file (the files written
    beside it too), one in a folder that cannot be written, or (`appended`: written in place, not
    replaced) a file that cannot be written."""
    for path in [out, *sidecars]:
        if os.path.isdir(path):
            raise ValueError(f"{what} {out}: {path} is a folder; give a file name")
        if os.path.exists(path) and not os.path.isfile(path):  # a link to a file yet to be written is fine
            raise ValueError(f"{what} {out}: {path} is not a regular file; give a file name")
    real = _real(out)
    folder = next((p for p in [real.parent, *real.parent.parents] if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"{what} {out}: {folder} is not a folder")
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {out}: the folder {folder} cannot be written")
    if appended and os.path.isfile(out) and not os.access(out, os.W_OK):
        raise ValueError(f"{what} {out}: the file cannot be written")


def refuse_inputs_as_outputs(outputs: list[str], inputs: list[str], *, what: str = "--out") -> None:
    """Refuse an output that is the same file as an input (compared by device and inode, so a second
    spelling, a link or a hard link of the input is caught), before it could be overwritten."""
    written = {}
    for path in outputs:
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there yet: it cannot be an input
        written[(st.st_dev, st.st_ino)] = path
    if not written:
        return
    for path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        output = written.get((st.st_dev, st.st_ino))
        if output is not None:
            also = "" if output == outputs[0] else f" ({output}, written with it)"
            raise ValueError(
                f"{what} {outputs[0]}{also} is the same file as the input {path}: writing it would "
                f"destroy that input; choose another {what}"
            )


def remove_stale_temps(outputs: list[str]) -> list[Path]:
    """Delete the temporary files (`.NAME.XXXXXXXX.tmp`) a killed run left beside these outputs.
    Call it holding their lock: no live densetriton run is writing them then. Returns what went."""
    removed = []
    for out in outputs:
        for tmp in stale_temps(out):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed
