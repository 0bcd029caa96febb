"""Report writing: strict JSON, Markdown, stdout table and the PNG chart, from a synthetic document."""

import json

import pytest
from densetriton.bench import report
from densetriton.bench.schema import RESULTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(peer, batch, ms, **extra):
    rec = {
        "model": "densenet121",
        "batch": batch,
        "dtype": "float16",
        "image_size": 224,
        "peer": peer,
        "median_ms": ms,
        "p90_ms": ms * 1.1,
        "images_per_s": batch / ms * 1e3,
        "peak_mem_bytes": 3 << 20,
        "cold_start_s": 1.5,
        "max_rel_err": 2e-3,
        "top1_agree": 1.0,
        "floor_ms": ms / 4,
        "times_ms": [ms, ms * 1.1],
        "pct_of_floor": 25.0,
        "peer_dtype": "float16",
        "peak_mem_kind": "cuda_max_allocated",
    }
    rec.update(extra)
    return report.order_record(rec)


def synthetic_doc():
    results = []
    for b, base in ((1, 2.0), (8, 4.0), (64, 20.0)):
        results.append(record("densetriton", b, base, backend="triton", planned_mem_bytes=2 << 20))
        results.append(record("torchvision-eager-fp16-cl", b, base * 2))
    return {
        "device": "NVIDIA Test GPU",
        "torch": "2.11.0",
        "triton": "3.6.0",
        "torchvision": "0.26.0",
        "commit": "0" * 40,
        "created": "2025-01-02T03:04:05+00:00",
        "results": results,
        "skipped": [{"peer": "torch-compile-default", "reason": "because"}],
        "notes": ["a note"],
        "machine": {"copy_bytes_per_s": 3e12, "matmul_flops_per_s": {"float16": 7e14}},
    }


def test_order_record_puts_the_issue_fields_first_and_times_last():
    rec = record("densetriton", 1, 2.0, backend="triton")
    keys = list(rec)
    assert keys[: len(report.RECORD_FIELDS)] == list(report.RECORD_FIELDS)
    assert keys[-1] == "times_ms"


def test_write_produces_strict_json_markdown_and_a_png(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    doc = synthetic_doc()
    doc["results"][0]["max_rel_err"] = float("nan")  # must not reach the file as NaN
    doc["results"].append(record("onnxruntime", 8, 3.0, peer_detail="onnxruntime CUDAExecutionProvider"))
    doc["results"].append(record("torch-compile-reduce-overhead", 8, 3.5))
    doc["skipped"].append(
        {
            "peer": "torch-compile-max-autotune",
            "model": "densenet121",
            "batch": 64,
            "dtype": "float16",
            "reason": "interrupted after 212.5 s of this record, before its first result",
            "elapsed_s": 212.5,
        }
    )
    paths = report.write(doc, tmp_path, "2025-01-02-nvidia-test-gpu")
    text = paths["json"].read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["results"][0]["max_rel_err"] is None
    jsonschema.validate(data, RESULTS)
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    md = paths["md"].read_text()
    assert "![images/s by batch size](2025-01-02-nvidia-test-gpu.png)" in md
    assert md.count("| densetriton |") == 3 and "skipped torch-compile-default: because" in md
    assert "onnxruntime: ran on onnxruntime CUDAExecutionProvider" in md and "| torch-compile-reduce-overhead |" in md
    assert "skipped torch-compile-max-autotune (densenet121 64 float16): interrupted after 212.5 s" in md


def test_chart_is_readable_by_matplotlib(tmp_path):
    import matplotlib.image

    path = report.draw_chart(synthetic_doc(), tmp_path / "c.png")
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # not a blank canvas


def test_text_table_lists_every_record_with_planned_memory():
    out = report.text_table(synthetic_doc())
    lines = out.splitlines()
    assert lines[0].startswith("densenet121 224x224, float16 run")
    rows = [line for line in lines if line.startswith(("densetriton", "torchvision"))]
    assert len(rows) == 6
    assert rows[0].split()[:3] == ["densetriton", "1", "float16"]
    assert "plan MiB" in lines[1] and " 2 " in rows[0]  # planned 2 MiB beside the 3 MiB peak


def test_schema_rejects_a_record_missing_an_issue_field():
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads(json.dumps(synthetic_doc()))
    jsonschema.validate(doc, RESULTS)
    del doc["results"][2]["top1_agree"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RESULTS)


def test_report_main_rerenders_without_touching_the_json(tmp_path, capsys):
    paths = report.write(synthetic_doc(), tmp_path, "r", chart=False)
    before = paths["json"].read_bytes()
    assert not (tmp_path / "r.png").exists()
    assert report.main([str(paths["json"])]) == 0
    assert paths["json"].read_bytes() == before
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    assert "densetriton" in capsys.readouterr().out


def test_skipped_records_are_grouped_by_peer_and_reason():
    from densetriton.bench import report

    doc = {
        "skipped": [
            {
                "peer": "densetriton",
                "model": "densenet121",
                "batch": 8,
                "dtype": "float16",
                "reason": "not run: interrupted",
            },
            {
                "peer": "densetriton",
                "model": "densenet121",
                "batch": 64,
                "dtype": "float16",
                "reason": "not run: interrupted",
            },
            {"peer": "torch-compile-default", "reason": "no CUDA"},
            {"peer": "densetriton", "model": "densenet201", "batch": 1, "dtype": "float16", "reason": "failed: boom"},
        ]
    }
    assert report._skipped_lines(doc) == [
        "skipped densetriton (densenet121 8 float16, densenet121 64 float16): not run: interrupted",
        "skipped torch-compile-default: no CUDA",
        "skipped densetriton (densenet201 1 float16): failed: boom",
    ]


def test_chart_has_one_panel_per_model_and_one_line_per_peer(tmp_path, monkeypatch):
    """What the chart shows, read off the figure: a panel per model, a line per peer, batch sizes
    on x and each record's images/s on y."""
    from matplotlib.figure import Figure

    doc = synthetic_doc()
    doc["results"] += [dict(r, model="densenet201", images_per_s=r["images_per_s"] / 2) for r in doc["results"]]
    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    report.draw_chart(doc, tmp_path / "c.png")
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["densenet121 224x224", "densenet201 224x224"]
    for ax in fig.axes:
        model = ax.get_title().split()[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"densetriton", "torchvision-eager-fp16-cl"}
        for peer, line in lines.items():
            rows = sorted(
                (r["batch"], r["images_per_s"]) for r in doc["results"] if r["model"] == model and r["peer"] == peer
            )
            assert list(line.get_xdata()) == [b for b, _ in rows] == [1, 8, 64]
            assert list(line.get_ydata()) == pytest.approx([y for _, y in rows])


def test_gpu_run_script_records_each_stage_and_fails_when_one_does(tmp_path):
    """bench/gpu_run.sh, with its stages off (a GPU host runs them): it still writes run.log with
    the versions and exits 0; a stage that fails (an interpreter that cannot install) is in the
    summary and the exit status."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_run.sh"
    off = dict(os.environ, PYTHON=sys.executable, RUN_INSTALL="0", RUN_TESTS="0", RUN_BENCH="0")
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "a")], env=off, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "a" / "run.log").read_text()
    assert "gpu_run: started" in log and f"torch {__import__('torch').__version__}" in log
    failing = dict(off, PYTHON="false", RUN_INSTALL="1")
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "b")], env=failing, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "install: FAILED (exit 1)" in done.stdout
    # Each test stage lists its own failing tests in run.log and on stdout (tests.log may not
    # come back whole from a GPU host): a stand-in for python fails one new test per pytest run.
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/usr/bin/env bash\n[[ $1 == -m ]] || exit 0\n"
        f"n=$(( $(cat {tmp_path}/count 2>/dev/null || echo 0) + 1 )); echo $n > {tmp_path}/count\n"
        'echo "FAILED tests/fake.py::test_$n - boom"; echo "1 failed in 0.01s"; exit 1\n'
    )
    fake.chmod(0o755)
    tests = dict(off, PYTHON=str(fake), RUN_TESTS="1", TEST_BUDGET_S="600")
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "c")], env=tests, capture_output=True, text=True, timeout=120
    )
    log = (tmp_path / "c" / "run.log").read_text()
    assert done.returncode == 1, done.stdout + done.stderr
    for n in (1, 2, 3):  # kernel tests, gpu tests, the rest: each stage's own failure, once
        assert log.count(f"  FAILED tests/fake.py::test_{n} - boom") == 1, log
        assert done.stdout.count(f"FAILED tests/fake.py::test_{n} - boom") == 1, done.stdout
