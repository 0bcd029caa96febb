"""Kernel tests run on CUDA when there is one, else on CPU through Triton's interpreter.

tests/conftest.py does the same set-up and skips `gpu`-marked tests without CUDA; the
environment line is repeated here so that this folder stands on its own.

TRITON_INTERPRET is read when a kernel is decorated with @triton.jit, i.e. when
densetriton.kernels is first imported, so it must be set before that happens.
"""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if not torch.cuda.is_available() and "densetriton.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "densetriton.kernels was imported before tests/kernels/conftest.py could set "
        "TRITON_INTERPRET=1; set it in the environment (or in tests/conftest.py)."
    )


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test id: fresh inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
