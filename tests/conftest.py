import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recipe.device import configure_device  # noqa: E402
from recipe.net import free_port  # noqa: E402

configure_device()  # before any test imports fla/triton: the CPU path (gloo + Triton interpreter)


import pytest  # noqa: E402


@pytest.fixture
def single_process_group(monkeypatch):
    """Environment for a Trainer (or anything torchrun-shaped) in this process: a process group of
    one on a free port, torn down afterwards."""
    import torch.distributed as dist

    port = free_port()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
