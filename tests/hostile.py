"""Run a densetriton command on a hostile file in a child process and measure what it cost.

Each command is forked from a server that has already imported what `python -m densetriton` imports
first (torch among them, ~2 s a process), then runs `densetriton/__main__.py` as `python -m` would.
Its status, peak resident memory and CPU time come from the server's os.wait4 on that child alone.
A forked child does not count the imports it inherited until it touches them, nor the time they
took: each server is calibrated against one `densetriton --help` started afresh, and every figure
is reported on that scale, as a command started afresh would have measured.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# What every hostile file must stay under: a one-line error, quickly, in little memory. Quickly:
# under TIME_BOUND_S of the command's CPU time (what the file made it do, whatever else the machine
# runs), and under WALL_BOUND_S on the clock (a command that waits instead of working).
TIME_BOUND_S = 10.0
WALL_BOUND_S = 30.0
MEMORY_BOUND_MB = 1024


@dataclasses.dataclass
class ChildRun:
    returncode: int  # negative: killed by that signal (e.g. -11 for SIGSEGV)
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float  # the command's user + system time, summed over its threads
    peak_mb: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


# The server: one JSON request a line (args, env, cwd, output files); for each it forks the command,
# answers its pid, waits for it and answers "status peak_kb cpu_seconds". The forked child leaves
# the loop and runs the command at the top level, so that it exits as `python -m densetriton` does
# (atexit handlers, an uncaught exception's traceback and status 1).
_SERVER = """
import gc, json, os, runpy, sys
import densetriton.cli

gc.freeze()  # the imports' objects: no collection in a child touches (and so copies) their pages

def serve(requests, replies):
    for line in requests:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return job
        os.write(replies, f"{pid}\\n".encode())
        _, status, usage = os.wait4(pid, 0)
        os.write(replies, f"{status} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}\\n".encode())
    sys.exit(0)

requests, replies = int(sys.argv[1]), int(sys.argv[2])
job = serve(os.fdopen(requests, "rb", closefd=False), replies)
os.close(requests), os.close(replies)
os.setsid()  # a group of its own, which a timeout kills whole
for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY), (2, job["stderr"], os.O_WRONLY)):
    os.dup2(os.open(path, flags), fd)
os.chdir(job["cwd"])
os.environ.clear()
os.environ.update(job["env"])
sys.argv = ["densetriton", *job["args"]]
runpy.run_module("densetriton", run_name="__main__", alter_sys=True)
"""


# Read by Python or the C library as a process starts, before any command runs: a forked child
# would silently ignore them (densetriton reads its own variables when a command runs).
_STARTUP_ENV = ("PYTHON", "LD_", "MALLOC_")


@dataclasses.dataclass
class _Costs:
    seconds: float
    cpu_seconds: float
    peak_mb: float


class _CommandServer:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="densetriton-hostile-"))
        requests_read, self.requests = os.pipe()
        self.replies, replies_write = os.pipe()
        self.log_path = self.folder / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 -- open while the server runs
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(requests_read), str(replies_write)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            pass_fds=(requests_read, replies_write),
        )
        os.close(requests_read), os.close(replies_write)
        self.pending, self.runs = b"", 0
        self.lock = threading.Lock()
        self.offset = self._calibrate()

    def _calibrate(self) -> _Costs:
        """What starting afresh adds to a forked `--help`: the imports' memory and time."""
        start = time.monotonic()
        fresh = subprocess.run(
            [sys.executable, "-c", _FRESH, sys.executable, "-m", "densetriton", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.monotonic() - start
        forked = self.run(["--help"], 120, None)
        if fresh.returncode or forked.returncode or fresh.stderr.strip() or forked.stderr.strip():
            raise RuntimeError(f"`densetriton --help` is not clean: {fresh.stderr[-2000:]}{forked.stderr[-2000:]}")
        if self.log_path.read_bytes():  # what importing wrote would be each command's output
            raise RuntimeError(f"importing densetriton.cli wrote: {self.log_path.read_text()[-3000:]}")
        peak_kb, cpu = fresh.stdout.split()
        return _Costs(seconds - forked.seconds, float(cpu) - forked.cpu_seconds, int(peak_kb) / 1024 - forked.peak_mb)

    def _reply(self, deadline: float | None) -> str | None:
        """The server's next line; None once `deadline` (monotonic) has passed."""
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.replies], [], [], wait)[0]:
                return None
            chunk = os.read(self.replies, 4096)
            if not chunk:
                raise RuntimeError(f"the command server died: {self.log_path.read_text()[-3000:]}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def run(self, args: list[str], timeout: float, env: dict | None) -> ChildRun:
        if any(key.startswith(_STARTUP_ENV) for key in env or {}):
            raise ValueError(f"a forked command cannot take variables read at startup: {sorted(env)}")
        with self.lock:
            self.runs += 1
            out, err = self.folder / f"{self.runs}.out", self.folder / f"{self.runs}.err"
            out.write_bytes(b""), err.write_bytes(b"")
            job = {
                "args": args,
                "env": {**os.environ, **(env or {})},
                "cwd": os.getcwd(),
                "stdout": str(out),
                "stderr": str(err),
            }
            start, pid = time.monotonic(), None
            try:
                os.write(self.requests, (json.dumps(job) + "\n").encode())
                pid = int(self._reply(None))
                finished = self._reply(start + timeout)
                killed = finished is None
                if killed:
                    _kill(pid)
                    finished = self._reply(None)
            except BaseException:  # an interrupt or a dead server: nothing may answer the next request
                if pid is not None:
                    _kill(pid)
                self.process.kill()
                raise
            seconds = time.monotonic() - start
            status, peak_kb, cpu = finished.split()
            stderr = err.read_text(errors="replace") + (f"\n[killed after {timeout} s]" if killed else "")
            code = os.waitstatus_to_exitcode(int(status))
            return ChildRun(code, out.read_text(errors="replace"), stderr, seconds, float(cpu), int(peak_kb) / 1024)

    def close(self) -> None:
        os.close(self.requests)  # the server's loop ends
        self.process.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.folder)


def _kill(pid: int) -> None:
    """The command and whatever it started (its own session, once it has called setsid)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


# A fresh command's peak memory and CPU time, from a launcher of a few MB: a process started from
# pytest's (often over 1 GB) would count pytest's resident memory in its own peak.
_FRESH = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
sys.exit(os.waitstatus_to_exitcode(status))
"""

_server: _CommandServer | None = None


def run_cli(*args: str, timeout: float = 60.0, env: dict | None = None) -> ChildRun:
    """`densetriton ARGS` (as `python -m densetriton`) in a child process, killed past `timeout`."""
    global _server
    if _server is None or _server.process.poll() is not None:  # first use, or killed meanwhile
        _server = _CommandServer()
        atexit.register(_server.close)
    run, fresh = _server.run(list(args), timeout, env), _server.offset
    # On the scale of a command started afresh (see the module doc).
    return dataclasses.replace(
        run,
        seconds=run.seconds + fresh.seconds,
        cpu_seconds=run.cpu_seconds + fresh.cpu_seconds,
        peak_mb=run.peak_mb + fresh.peak_mb,
    )


def assert_refused(run: ChildRun, *, mentions: str | None = None, status: int = 2) -> None:
    """One error line, the refusal's exit status, within the time and memory bounds."""
    assert run.returncode == status, f"exit {run.returncode}, stderr: {run.stderr[-2000:]}"
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("densetriton: error: "), run.stderr[-2000:]
    if mentions is not None:
        assert mentions in run.error_lines[0], run.error_lines[0]
    assert run.cpu_seconds < TIME_BOUND_S and run.seconds < WALL_BOUND_S, (run.cpu_seconds, run.seconds)
    assert run.peak_mb < MEMORY_BOUND_MB, f"peak {run.peak_mb:.0f} MB"
