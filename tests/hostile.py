"""Run a densetriton command on a hostile file in a child process and measure what it cost.

Each command is forked from a server that has already imported what `python -m densetriton` imports
first (torch among them, ~2 s a process), then runs `densetriton/__main__.py` as `python -m` would.
Its peak resident memory and CPU time come from the server's os.wait4 on that child alone: the
memory includes the imports it inherited, as a command started afresh would hold them; the CPU time
is what the file made it do.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# What every hostile file must stay under: a one-line error, quickly, in little memory. Quickly:
# under TIME_BOUND_S of the command's CPU time (what the file made it do, whatever else the machine
# runs), and under WALL_BOUND_S on the clock (a command that waits instead of working).
TIME_BOUND_S = 10.0
WALL_BOUND_S = 30.0
MEMORY_BOUND_MB = 1024


@dataclass
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


class _CommandServer:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="densetriton-hostile-"))
        requests_read, self.requests = os.pipe()
        self.replies, replies_write = os.pipe()
        self.log = open(self.folder / "server.log", "wb")  # noqa: SIM115 -- open while the server runs
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(requests_read), str(replies_write)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            pass_fds=(requests_read, replies_write),
        )
        os.close(requests_read), os.close(replies_write)
        self.pending = b""
        self.lock = threading.Lock()

    def _reply(self, deadline: float | None) -> str | None:
        """The server's next line; None once `deadline` (monotonic) has passed."""
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.replies], [], [], wait)[0]:
                return None
            chunk = os.read(self.replies, 4096)
            if not chunk:
                raise RuntimeError(f"the command server died: {(self.folder / 'server.log').read_text()[-3000:]}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def run(self, args: list[str], timeout: float, env: dict | None) -> ChildRun:
        with self.lock:
            out, err = self.folder / "stdout", self.folder / "stderr"
            out.write_bytes(b""), err.write_bytes(b"")
            job = {
                "args": args,
                "env": {**os.environ, **(env or {})},
                "cwd": os.getcwd(),
                "stdout": str(out),
                "stderr": str(err),
            }
            start = time.monotonic()
            os.write(self.requests, (json.dumps(job) + "\n").encode())
            pid = int(self._reply(None))
            finished = self._reply(start + timeout)
            killed = finished is None
            if killed:
                with contextlib.suppress(ProcessLookupError):  # unless it has just ended
                    os.killpg(pid, signal.SIGKILL)  # the command and whatever it started
                finished = self._reply(None)
            seconds = time.monotonic() - start
            status, peak_kb, cpu = finished.split()
            stderr = err.read_text(errors="replace") + (f"\n[killed after {timeout} s]" if killed else "")
            code = os.waitstatus_to_exitcode(int(status))
            return ChildRun(code, out.read_text(errors="replace"), stderr, seconds, float(cpu), int(peak_kb) / 1024)

    def close(self) -> None:
        os.close(self.requests)  # the server's loop ends
        self.process.wait(timeout=30)
        self.log.close()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


_server: _CommandServer | None = None


def run_cli(*args: str, timeout: float = 60.0, env: dict | None = None) -> ChildRun:
    """`densetriton ARGS` (as `python -m densetriton`) in a child process, killed past `timeout`."""
    global _server
    if _server is None or _server.process.poll() is not None:  # first use, or killed meanwhile
        _server = _CommandServer()
        atexit.register(_server.close)
    return _server.run(list(args), timeout, env)


def assert_refused(run: ChildRun, *, mentions: str | None = None, status: int = 2) -> None:
    """One error line, the refusal's exit status, within the time and memory bounds."""
    assert run.returncode == status, f"exit {run.returncode}, stderr: {run.stderr[-2000:]}"
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("densetriton: error: "), run.stderr[-2000:]
    if mentions is not None:
        assert mentions in run.error_lines[0], run.error_lines[0]
    assert run.cpu_seconds < TIME_BOUND_S and run.seconds < WALL_BOUND_S, (run.cpu_seconds, run.seconds)
    assert run.peak_mb < MEMORY_BOUND_MB, f"peak {run.peak_mb:.0f} MB"
