"""bench/lock_cost.py: what sharing one engine between threads costs (a tiny interpreted engine here)."""

import threading

import pytest
import torch
from densetriton.bench import lock_cost

import densetriton
from densetriton import DenseNetSpec

TINY = DenseNetSpec(4, (2,), 8, 2, 0.5, 3, "cifar")


def test_measure_reports_every_figure_and_puts_the_lock_back():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = densetriton.load(TINY, weights=None, device=device, backend="triton")
    x = torch.randn(2, 3, 8, 8, device=device)
    expected = engine(x)
    lock = engine._lock

    class CountingLock:  # the engine's lock, counting the calls that take it
        taken = 0

        def __enter__(self):
            CountingLock.taken += 1
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    engine._lock = counting = CountingLock()
    figures = lock_cost.measure(engine, x, calls=8, threads=4)
    # 3 warm-up calls, 8 from one thread, 8 from four threads; not the 8 timed without it
    assert CountingLock.taken == 3 + 8 + 8
    assert engine._lock is counting  # put back after the timing without it
    engine._lock = lock
    assert set(figures) == {
        "uncontended_lock_ns",
        "call_ms_with_lock",
        "call_ms_without_lock",
        "calls_per_s_1_thread",
        "calls_per_s_4_threads",
    }
    assert all(v > 0 for v in figures.values())
    assert 1 < figures["uncontended_lock_ns"] < 1e5
    assert isinstance(lock, type(threading.Lock())) and not lock.locked()
    assert torch.equal(engine(x), expected)


def test_the_command_takes_a_grayscale_weights_file(tmp_path, capsys):
    spec = TINY.replace(in_channels=1)
    path = tmp_path / "gray.safetensors"
    torch.manual_seed(2)
    densetriton.save_weights(path, densetriton.engine.random_weights(spec).tensors, spec)
    assert (
        lock_cost.main(
            ["--model", str(path), "--batch-size", "2", "--image-size", "8", "--calls", "2", "--threads", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "input (2, 1, 8, 8)" in out and "calls_per_s_2_threads" in out


def test_the_bench_tools_refuse_a_model_without_classifier_before_timing(tmp_path, capsys):
    """Both time logits calls: a features-only file is one usage error, not a traceback after the timing."""
    from densetriton.bench import layer_times

    spec = TINY.replace(num_classes=0)
    path = tmp_path / "backbone.safetensors"
    densetriton.save_weights(path, densetriton.engine.random_weights(spec).tensors, spec)
    for tool in (lock_cost, layer_times):
        with pytest.raises(SystemExit) as stop:
            tool.main(["--model", str(path), "--batch-size", "1", "--image-size", "16"])
        assert stop.value.code == 2 and "has no classifier" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["lock_cost", "layer_times"])
def test_a_model_that_cannot_load_is_one_line_not_a_traceback(module, capsys):
    import importlib

    main = importlib.import_module(f"densetriton.bench.{module}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "densenet999"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{module}: error: unknown model 'densenet999'" in err and "Traceback" not in err
