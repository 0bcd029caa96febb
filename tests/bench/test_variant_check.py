"""variant_check's verdict (the GPU A/B runs it before trusting a new variant's timings); the
comparison itself is stubbed here: a whole densenet121 takes ~50 s through the interpreter."""

import pytest
from densetriton.bench import variant_check


def test_a_variant_over_the_tolerance_fails_the_check(monkeypatch, capsys):
    rows = {"v1": (0.0, 4e-3), "v2": (2e-2, 2.1e-2)}
    monkeypatch.setattr(
        variant_check,
        "check_model",
        lambda model, batches, dtype, selections, device, size: [(b, s, *rows[s]) for b in batches for s in selections],
    )
    assert variant_check.main(["--model", "densenet121", "--batch-size", "1", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "DENSETRITON_KERNELS=v2: rel err vs v1 2.00e-02, vs float32 reference 2.10e-02" in out
    assert "FAILED: largest relative error 2.10e-02 (tolerance 1e-02)" in out
    rows["v2"] = (1e-3, 5e-3)
    assert variant_check.main(["--model", "densenet121", "--batch-size", "1", "--device", "cpu"]) == 0


def test_nan_logits_never_pass():
    import torch

    assert variant_check.rel_err(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])) == float("inf")


def test_a_bad_selection_is_one_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        variant_check.main(["--kernels", "v1", "conv1x1=v99"])
    assert e.value.code == 2 and "conv1x1 has no variant 'v99'" in capsys.readouterr().err
