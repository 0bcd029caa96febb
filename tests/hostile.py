"""Run a densetriton command on a hostile file in a child process and measure what it cost.

The child's peak resident memory comes from os.wait4: that child's rusage alone (RUSAGE_CHILDREN
would keep the maximum over every child the test process ever waited for).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

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


def _drain(stream, chunks: list) -> None:
    chunks.append(stream.read())


# The command is started by this few-MB launcher, which reports the command's peak memory and CPU
# time on a pipe: a process started from this one (pytest, often over 1 GB) would report this process's
# resident memory as part of its own peak (Linux folds the parent's in at exec).
_LAUNCHER = """
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
os.write(int(sys.argv[1]), f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}".encode())
code = os.waitstatus_to_exitcode(status)
if code < 0:  # die of the same signal
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_python(code_or_args: list[str], *, timeout: float = 60.0, env: dict | None = None) -> ChildRun:
    """`python ARGS` in a child, killed past `timeout`; its exit status, output, times and peak memory."""
    start = time.monotonic()
    peak_read, peak_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, str(peak_write), sys.executable, *code_or_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
        errors="replace",
        pass_fds=(peak_write,),
        start_new_session=True,
    )
    os.close(peak_write)
    out, err = [], []
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out)),
        threading.Thread(target=_drain, args=(proc.stderr, err)),
    ]
    for r in readers:
        r.start()
    deadline, killed = start + timeout, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline and not killed:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command
            killed = True
        time.sleep(0.02)
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    stderr = "".join(err) + (f"\n[killed after {timeout} s]" if killed else "")
    with os.fdopen(peak_read, "rb") as reported:
        # Killed: nothing reported; the launcher's own figures (its memory an upper bound).
        peak_kb, cpu = reported.read().split() or (usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
    seconds = time.monotonic() - start
    return ChildRun(proc.returncode, "".join(out), stderr, seconds, float(cpu), int(peak_kb) / 1024)


def run_cli(*args: str, timeout: float = 60.0, env: dict | None = None) -> ChildRun:
    """`densetriton ARGS` (as `python -m densetriton`) in a child process."""
    return run_python(["-m", "densetriton", *args], timeout=timeout, env=env)


def assert_refused(run: ChildRun, *, mentions: str | None = None, status: int = 2) -> None:
    """One error line, the refusal's exit status, within the time and memory bounds."""
    assert run.returncode == status, f"exit {run.returncode}, stderr: {run.stderr[-2000:]}"
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("densetriton: error: "), run.stderr[-2000:]
    if mentions is not None:
        assert mentions in run.error_lines[0], run.error_lines[0]
    assert run.cpu_seconds < TIME_BOUND_S and run.seconds < WALL_BOUND_S, (run.cpu_seconds, run.seconds)
    assert run.peak_mb < MEMORY_BOUND_MB, f"peak {run.peak_mb:.0f} MB"
