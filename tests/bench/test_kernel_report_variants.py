"""kernel_report under a kernel selection (--kernels), and its SASS count of one K step."""

import os
import re
import subprocess
import sys

import pytest
from densetriton.bench.kernel_report import main, sass_k_loop


def report(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DENSETRITON_KERNELS")}
    return subprocess.run(
        [sys.executable, "-m", "densetriton.bench.kernel_report", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _sass(*lines):
    return "\n".join(
        f"        /*{i * 16:04x}*/ {line} ;" if not line.startswith(".L") else line for i, line in enumerate(lines)
    )


def test_sass_k_loop_counts_the_innermost_loop_holding_the_mma_and_what_its_outer_loop_adds():
    text = _sass(
        "MOV R1, R2",
        ".L_x_0:",
        "IADD3 R1, R1, 0x1, RZ",
        "LDS R4, [R1]",
        ".L_x_1:",
        "LDS R5, [R2]",
        "HGMMA.64x32x16.F32 R40, gdesc[UR8].tnspB, R40",
        "HGMMA.64x32x16.F32 R40, gdesc[UR9].tnspB, R40",
        "@P5 BRA `(.L_x_1)",
        "ISETP.GE.AND P0, PT, R1, 0x9, PT",
        "@P0 BRA `(.L_x_0)",
        "EXIT",
        ".L_x_2:",
        "BRA `(.L_x_2)",
    )
    # inner loop: LDS, 2 HGMMA, BRA = 4; the outer adds IADD3, LDS, ISETP, BRA = 4
    assert sass_k_loop(text) == (4, 2, 4)
    assert sass_k_loop(_sass(".L_x_0:", "FFMA R1, R2, R3, R1", "@P0 BRA `(.L_x_0)")) is None  # no MMA


def test_v2_kernels_build_for_sm90_without_spills_and_fewer_instructions_per_k_step():
    # The 1x1 with programmatic dependent launch, the 3x3 without: both paths of the v2 kernels and
    # of the split-K reduction in one build (--fail-on-spill also fails a PDL kernel whose PTX
    # lacks griddepcontrol.wait).
    kernels = "conv1x1=v2-pdl,conv3x3=v2"
    out = report("--model", "densenet121", "--batch-size", "1", "--kernels", kernels, "--fail-on-spill")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"kernel variants: {kernels}\n" in out.stdout
    pdl = {(kernel, flag) for kernel, flag in re.findall(r"^\| (_\w+_kernel) \| [^|]*PDL=([01])", out.stdout, re.M)}
    assert pdl == {
        ("_conv1x1_v2_kernel", "1"),
        ("_conv_taps_v2_kernel", "0"),
        ("_split_k_reduce_kernel", "1"),
        ("_split_k_reduce_kernel", "0"),
    }, pdl
    rows = {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in out.stdout.splitlines()
            if line.startswith("| _")
        )
    }
    for kernel in ("_conv1x1_v2_kernel", "_conv_taps_v2_kernel"):
        registers, spill, shared, k_step = (
            int(rows[kernel][5]),
            int(rows[kernel][6]),
            int(rows[kernel][7]),
            rows[kernel][9],
        )
        assert 0 < registers <= 255 and spill == 0 and shared <= 227 * 1024, rows[kernel]
        instructions, mma = map(int, re.fullmatch(r"(\d+)/(\d+)", k_step).groups())  # one flat loop: no outer
        assert mma >= 2 and instructions < 300, rows[kernel]
    assert "_bn_relu_conv_kernel" in rows  # the classifier stays v1
    # Batch 1's late blocks split K (densetriton.tiles.split_k): the partials' reduction builds too.
    assert "_split_k_reduce_kernel" in rows, rows
    for kernel in ("_conv1x1_v2_kernel", "_conv_taps_v2_kernel"):
        assert re.search(rf"^\| {kernel} \| [^|]*SPLIT_K=[248] ", out.stdout, re.M), kernel


def test_a_bad_selection_is_one_argparse_error(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # past the interpreter check; the selection fails before any compile
    with pytest.raises(SystemExit) as exit_:
        main(["--count-only", "--kernels", "conv1x1=v7"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "conv1x1 has no variant 'v7'" in err and "Traceback" not in err
