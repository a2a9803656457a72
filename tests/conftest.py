"""Shared pytest setup: makes the repository root importable so tests can import ``examples``."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def one_thread():
    """Run torch on one thread. On a busy 2-core machine OpenMP threads spin against each other:
    a 32 px ResNet-50 step took 10-20x longer with 2 threads than with 1, and a tiny model's many
    small ops slow down the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
