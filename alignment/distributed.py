"""Data-parallel runs under ``torchrun``: the one home of process group, device, DDP wrapping and
the collectives the own trainers (persona, char_diffusion) use.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) there is no process group and every collective
here is a no-op on the one process. Backend ``auto``: NCCL on CUDA, else gloo (how the tests run
two CPU processes). Imports nothing else of the project (bottom floor).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run (rank 0 of 1 without torchrun) and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Several processes: DDP wrapping and collectives are real."""
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``cuda:<local_rank>``) when CUDA is available, else the CPU;
    ``cuda`` without an index: ``cuda:<local_rank>``; anything else (``cpu``, ``cuda:N``) as named."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """This process's :class:`DistInfo`; under torchrun (``WORLD_SIZE`` > 1) it also joins the
    process group (``backend`` ``auto``: nccl on CUDA, gloo otherwise). A CUDA device is made the
    current one, so collectives and default allocations use this process's card."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=chosen)
        logger.info("DDP rank %d/%d on %s (%s)", dist.get_rank(), world, dev, chosen)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def wrap(module: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes train it, else itself (also when
    nothing in it is trained: a frozen module has nothing to synchronise, and DDP refuses it)."""
    if not info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, find_unused_parameters=find_unused_parameters
    )


def micro_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch of gradient accumulation: DDP's gradient all-reduce runs on the
    ``last`` one only (an unwrapped model has nothing to skip)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order (just ``[obj]`` on one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over all ranks (every rank passes the same keys); float64 all-reduce."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def cleanup(info: DistInfo) -> None:
    """Leave the process group (when this run joined one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
