"""Shared test setup. Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
triton is first imported by any test module. The tests' models are tiny and the CPU is shared: one intra-op thread
runs them fastest and avoids OpenMP stalls under contention."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
