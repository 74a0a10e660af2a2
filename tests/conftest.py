from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def ddp_pool():
    """One 2-rank gloo process group, shared by every DDP test of the session."""
    from tests.helpers.ddp import DDPPool

    pool = DDPPool()
    yield pool
    pool.close()


@pytest.fixture(params=["32-true", "bf16-mixed"])
def precision(request) -> str:
    """Run a test in full precision and in ``bf16-mixed`` (which runs on CPU)."""
    return request.param


@pytest.fixture
def bf16() -> str:
    return "bf16-mixed"
