"""Shared test set-up.

Without CUDA, Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported: this file is loaded before any test module imports densetriton.
"""

import gc
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown where it is not installed
def pytest_xdist_auto_num_workers(config):
    """pyproject's `-n auto`: one process where there is a GPU (its tests share and time it), else
    pytest-xdist's own count, one worker per core."""
    return 0 if torch.cuda.is_available() else None


# Under pytest-xdist (pyproject's addopts) each worker takes its share of the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_finish(session):
    """What collection imported (torch, keras, every test module: ~0.5 M objects) lives to the end:
    frozen, each full collection (the automatic ones, the bench's before every record) skips it,
    ~0.2 s each instead of walking it all."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty densetriton cache and torch hub directory, so no test touches the user's."""
    monkeypatch.setenv("DENSETRITON_HOME", str(tmp_path / "densetriton-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path
