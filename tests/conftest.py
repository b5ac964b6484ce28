"""Shared test setup. Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
triton is first imported by any test module."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
