import ctypes
import platform

import pytest
import torch

from cmae.config import load_config
from cmae.models.cmae import build_model
from tests.helpers import tiny_overrides

_LIBC = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """A training command run in this process calls keep_freed_memory(): glibc then keeps every
    freed block for reuse, which serves one run well, but here each test's peak would stay
    resident for the rest of the suite. Hand the freed memory back after each test."""
    yield
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@pytest.fixture
def tiny_cfg():
    def make(**extra):
        return load_config(None, tiny_overrides(**extra))

    return make


@pytest.fixture
def tiny_model(tiny_cfg):
    def make(**extra):
        torch.manual_seed(0)
        return build_model(tiny_cfg(**extra).model)

    return make
