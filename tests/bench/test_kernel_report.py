"""The kernel report: what the plan's kernels compile to for an H100 (sm_90), read without a GPU.

It runs in a child process without TRITON_INTERPRET, since it needs Triton's compiler (this
process may have the interpreter on).
"""

import os
import re
import subprocess
import sys

import pytest
from densetriton.bench.kernel_report import Specialisation, main, table


def report(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "densetriton.bench.kernel_report", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_new_batch_and_image_sizes_compile_nothing_new_when_their_tiles_are_the_same():
    # Batches 64 and 72 at 224 and 240 px choose the same tiles at every layer of densenet121
    # (their row counts fall on the same side of every tile threshold). 64 and 240 are multiples
    # of 16 and 72 and 224/2 are not, so kernels that specialised on N, H, W, OH or OW would need
    # new compiles for some of these shapes (23 in all instead of 10, measured so).
    out = report("--count-only", "--model", "densenet121", "--batch-size", "64", "72", "--image-size", "224", "240")
    assert out.returncode == 0, out.stderr
    per_shape = [int(n) for n in re.findall(r"^\d+px b\d+ float16: (\d+) specialisations$", out.stdout, re.M)]
    total = int(re.search(r"^(\d+) specialisations, \d+ launches$", out.stdout, re.M).group(1))
    assert len(per_shape) == 4 and per_shape == [total] * 4, out.stdout


def test_a_new_dtype_needs_its_own_kernels():
    # The count is not blind: float32 plans compile their own kernels (other tiles, IEEE dots).
    out = report("--count-only", "--model", "densenet121", "--batch-size", "1", "--dtype", "float16", "float32")
    assert out.returncode == 0, out.stderr
    float16 = int(re.search(r"^224px b1 float16: (\d+) specialisations$", out.stdout, re.M).group(1))
    float32 = int(re.search(r"^224px b1 float32: (\d+) specialisations$", out.stdout, re.M).group(1))
    total = int(re.search(r"^(\d+) specialisations, \d+ launches$", out.stdout, re.M).group(1))
    # Only the classifier (float32 in every plan) is shared between the two.
    assert total == float16 + float32 - 1 and min(float16, float32) > 1, out.stdout


def test_densenet121_kernels_build_for_sm90_without_spills():
    # Every kernel the float16 plans launch at batch 1 and 64, compiled by Triton and ptxas.
    out = report("--model", "densenet121", "--batch-size", "1", "64", "--dtype", "float16", "--fail-on-spill")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| _")]
    assert rows, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        registers, spill, shared = int(cells[5]), int(cells[6]), int(cells[7])
        assert 0 < registers <= 255 and spill == 0 and 0 <= shared <= 227 * 1024, row
    assert re.search(r"\d+ specialisations, \d+ launches; 0 spill, 0 failed", out.stdout)


def test_table_flags_spills_failures_and_shared_memory_over_the_limit():
    specs = [
        Specialisation("_k", {"BLOCK_M": 128}, ["C_in"], ["a", "b"], 255, 68, 1024, 1.0),
        Specialisation("_k", {"BLOCK_M": 64}, [], ["c"], 120, 0, 240 * 1024, 0.5),
        Specialisation("_k", {"BLOCK_M": 32}, [], ["d"], error="CompilationError: boom"),
        Specialisation("_k", {"BLOCK_M": 16}, [], ["e"], 80, 0, 1024, 0.25),
    ]
    text = table(specs, 90)
    lines = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| _k")}
    assert "SPILLS" in lines["BLOCK_M=128"]
    assert "shared memory over sm_90's 227 KB" in lines["BLOCK_M=64"]
    assert "CompilationError: boom" in lines["BLOCK_M=32"]
    assert lines["BLOCK_M=16"].rstrip().endswith("|  |")  # nothing to say about a clean kernel
    assert "4 specialisations, 5 launches; 1 spill, 1 failed; build time 1.8 s" in text


def _argument_error(capsys, *argv) -> str:
    """main(argv) in this process (argparse's errors come before any compile): its one-line error."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_refuses_to_run_under_the_interpreter(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "unset TRITON_INTERPRET" in _argument_error(capsys, "--count-only")


@pytest.mark.parametrize(
    "bad,says", [(["--dtype", "float64"], "invalid choice: 'float64'"), (["--model", "resnet50"], "invalid choice")]
)
def test_bad_arguments_are_one_clear_error(bad, says, capsys):
    assert says in _argument_error(capsys, "--count-only", *bad)
