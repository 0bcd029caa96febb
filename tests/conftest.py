"""Shared test set-up.

Without CUDA, Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported: this file is loaded before any test module imports densetriton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
