"""Kernel tests run on CUDA when there is one, else on CPU through Triton's interpreter.

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (bfloat16 tl.dot is wrong under the Triton interpreter)")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        # This hook sees the whole session; only touch the kernel tests.
        if "gpu" in item.keywords and str(item.path).startswith(here + os.sep):
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test id: fresh inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
