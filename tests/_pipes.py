"""Shared fixtures for the pipeline tests."""

import warnings

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny networks: thread fan-out only costs time on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)
