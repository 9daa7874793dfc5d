"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run tiny tensors: one thread is as fast, and many times faster on a shared CPU
    (two OpenMP threads per process oversubscribe a loaded 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
