"""Fixtures shared by test modules (opted into by name, never autouse here)."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on 1 thread for a module (as the checks run, and so that parallel halves of the suite do not fight over
    the 2 cores), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
