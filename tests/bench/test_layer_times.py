"""bench/layer_times.py: a plan's launches timed one by one and summed per roofline layer kind."""

import pytest
import torch

import densetriton
from densetriton import DenseNetSpec, get_spec
from densetriton.bench import report
from densetriton.bench.layer_times import layer_times, stage_kind, table
from densetriton.bench.roofline import KINDS, layer_kinds, roofline_entry
from densetriton.plan import build_stages

TINY = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")


@pytest.mark.parametrize("name", ["densenet121", "densenet40_k12"])
def test_every_stage_has_the_kind_the_roofline_counts_it_under(name):
    spec = get_spec(name)
    kinds = [stage_kind(s) for s in build_stages(spec)]
    layers, blocks = sum(spec.block_config), len(spec.block_config)
    bottleneck = spec.bn_size is not None
    assert kinds.count("dense_1x1") == (layers if bottleneck else 0)
    assert kinds.count("dense_3x3") == layers
    assert kinds.count("transition") == blocks - 1
    assert kinds.count("stem") == (2 if spec.stem == "imagenet" else 1)
    assert kinds.count("head") == 2  # norm5-ReLU-pool, classifier
    # a kind with launches has work in the roofline and the other way round
    counted = layer_kinds(spec, 1, 224, 224, 2)
    assert {k for k in KINDS if counted[k]["macs"] > 0} == set(kinds)


def test_layer_times_cover_every_launch_and_leave_the_engine_correct():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    engine = densetriton.load(TINY, weights=None, device=device, backend="triton")
    x = torch.randn(2, 3, 40, 40, device=device)
    expected = engine(x)
    times = layer_times(engine, x, repeats=2)
    assert list(times) == list(KINDS)
    plan = engine._model.plan(2, 40, 40)
    assert sum(d["launches"] for d in times.values()) == len(plan.launches)
    assert all((d["ms"] > 0) == (d["launches"] > 0) for d in times.values())
    assert torch.equal(engine(x), expected)
    entry = roofline_entry(TINY, "tiny", 2, 40, "float32", 4, 1e12, 1e11)
    text = table(times, entry["kinds"])
    assert text.splitlines()[0].split()[:3] == ["kind", "launches", "ms"] and "% floor" in text
    with pytest.raises(ValueError, match="backend='triton'"):
        layer_times(densetriton.load(TINY, weights=None, device="cpu", backend="reference"), x.cpu())


def test_the_command_takes_a_grayscale_weights_file(tmp_path, capsys):
    from densetriton.bench.layer_times import main

    spec = TINY.replace(in_channels=1)
    path = tmp_path / "gray.safetensors"
    torch.manual_seed(1)
    densetriton.save_weights(path, densetriton.engine.random_weights(spec).tensors, spec)
    assert main(["--model", str(path), "--batch-size", "1", "--image-size", "40", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 1, 40, 40)" in out and "whole forward" in out


def test_the_report_sets_each_kind_against_its_floor():
    from test_bench_report import record, synthetic_doc

    doc = synthetic_doc()
    doc["roofline"] = [roofline_entry(get_spec("densenet121"), "densenet121", 64, 224, "float16", 2, 7e14, 3e12)]
    kinds_ms = {k: 2 * d["floor_ms"] for k, d in doc["roofline"][0]["kinds"].items()}  # every kind at 50% of its floor
    doc["results"].append(record("densetriton", 64, 25.0, kinds_ms=kinds_ms))
    doc["results"] = [r for r in doc["results"] if not (r["peer"] == "densetriton" and r["batch"] == 64 and "kinds_ms" not in r)]
    md = report.markdown(doc, None)
    assert "| kind | GMACs |" in md and "densetriton ms | % of floor |" in md
    for kind in KINDS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {kind} |"))
        assert row.rstrip().endswith("| 50.0% |"), row
