"""The torchrun/DDP home outside torchrun: device choice, the one-process DistInfo and no-op
collectives, and the no-sync context on a real (one-rank gloo) DistributedDataParallel. Two real
ranks are covered by tests/test_persona_ddp.py and tests/test_char_diffusion_ddp.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from alignment.distributed import (
    DistInfo,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    micro_sync,
    pick_device,
    wrap,
)


def test_pick_device_names_and_local_rank():
    assert pick_device("cpu", local_rank=3) == torch.device("cpu")
    assert pick_device("cuda", local_rank=3) == torch.device("cuda:3")  # one card per torchrun process
    assert pick_device("cuda:1", local_rank=3) == torch.device("cuda:1")  # an explicit index is kept
    expected = torch.device("cuda:2") if torch.cuda.is_available() else torch.device("cpu")
    assert pick_device("auto", local_rank=2) == expected


def test_auto_takes_this_process_gpu_when_cuda_is_available(monkeypatch):
    # no GPU on the test machines: only the choice is tested here, nothing is allocated on it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", local_rank=1) == torch.device("cuda:1")


def test_one_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu")) and info.is_main and not info.enabled
    assert not dist.is_initialized()
    barrier(info)
    assert gather_objects(info, {"a": 1}) == [{"a": 1}]
    values = {"loss": 0.5}
    assert mean_over_ranks(info, values) == values and mean_over_ranks(info, values) is not values
    module = nn.Linear(2, 2)
    assert wrap(module, info) is module
    cleanup(info)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_micro_sync_skips_the_all_reduce_until_the_last_micro_batch(one_rank_group):
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
    with micro_sync(ddp, last=False):
        assert not ddp.require_backward_grad_sync  # DDP's own flag: this backward is not reduced
        ddp(torch.ones(1, 2)).sum().backward()
    with micro_sync(ddp, last=True):
        assert ddp.require_backward_grad_sync
        ddp(torch.ones(1, 2)).sum().backward()
    plain = nn.Linear(2, 1)
    with micro_sync(plain, last=False):  # an unwrapped model has nothing to skip
        plain(torch.ones(1, 2)).sum().backward()
