"""bench/gpu_run.sh's kernel-variant A/B stage (RUN_AB=1), run with a stand-in for python that
records each command and its DENSETRITON_KERNELS instead of timing anything."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_run.sh"


def _fake_python(tmp_path, fail_on=""):
    """Logs 'DENSETRITON_KERNELS | args' per `-m` call; fails the call whose args contain fail_on."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/usr/bin/env bash\n[[ $1 == -m ]] || exit 0\n"
        f'echo "${{DENSETRITON_KERNELS:-unset}} | $*" >> {tmp_path}/calls\n'
        f'[[ -n "{fail_on}" && "$*" == *"{fail_on}"* ]] && {{ echo "FAILED: boom"; exit 1; }}\n'
        'echo "ok: largest relative error 1e-03"\n'
    )
    fake.chmod(0o755)
    return fake


def _run(tmp_path, **env):
    base = dict(os.environ, RUN_INSTALL="0", RUN_TESTS="0", RUN_BENCH="0", RUN_AB="1", **env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")], env=base, capture_output=True, text=True, timeout=120
    )


def test_ab_checks_the_variants_then_times_each_shape_under_each_variant_interleaved(tmp_path):
    done = _run(tmp_path, PYTHON=str(_fake_python(tmp_path)), AB_MODELS="densenet121 densenet201", AB_BATCHES="1 256")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == (
        "v1 | -m densetriton.bench.variant_check --model densenet121 densenet201 "
        "--batch-size 1 256 --dtype float16 --kernels v1 v2"
    )
    timed = [(c.split(" | ")[0], c.split("--model ")[1]) for c in calls[1:]]
    assert timed == [
        (v, f"{m} --batch-size {b} --dtype float16")
        for m in ("densenet121", "densenet201")
        for b in (1, 256)
        for v in ("v1", "v2")
    ]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "A/B variant check: ok - ok: largest relative error 1e-03" in log
    assert "A/B layer times: ok - 8 run, 0 failed, 0 skipped" in log
    assert "=== DENSETRITON_KERNELS=v2 " in (tmp_path / "out" / "ab.log").read_text()


def test_a_wrong_variant_or_a_failed_timing_fails_the_run(tmp_path):
    done = _run(tmp_path, PYTHON=str(_fake_python(tmp_path, fail_on="variant_check")), AB_BATCHES="1")
    assert done.returncode == 1 and "A/B variant check: FAILED (exit 1) - FAILED: boom" in done.stdout
    (tmp_path / "calls").unlink()
    done = _run(tmp_path, PYTHON=str(_fake_python(tmp_path, fail_on="densenet201 --batch-size 1")), AB_BATCHES="1")
    assert done.returncode == 1 and "A/B layer times: FAILED (exit 1) - 4 run, 2 failed, 0 skipped" in done.stdout


def test_ab_is_off_by_default(tmp_path):
    fake = _fake_python(tmp_path)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=str(fake), RUN_INSTALL="0", RUN_TESTS="0", RUN_BENCH="0"),
    )
    assert done.returncode == 0 and not (tmp_path / "calls").exists() and "A/B" not in done.stdout
