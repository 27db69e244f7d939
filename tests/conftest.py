from __future__ import annotations

import os

import pytest
import torch

# Parity checks need deterministic fp32 CPU math; 2 threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
