"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# The tests, and the processes they start, run the eager reference of the compiled paths
# (clusterformers.fused): compiling every variant a test meets would cost minutes. tests/test_fused.py
# switches fusion on and compares the two.
os.environ["CLUSTERFORMERS_FUSED"] = "0"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (restored afterwards): the tests' tensors are tiny, and two
    OpenMP threads on a busy two-core machine make tiny ops many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
