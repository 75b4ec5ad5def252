"""How a char_diffusion trainer runs: autocast dtype, optimiser, LR schedule, seeds; the torchrun
process group, device choice and DDP wrapping are :mod:`alignment.distributed`'s.

Randomness that decides *what* is trained on (which blocks, which positions are masked, which fills
are sampled) comes from generators seeded by (seed, iteration, slot, stream), where a slot is one
micro-batch of one rank (``slot = micro_step * world_size + rank``). So a resumed run draws exactly
what an uninterrupted one would, and 2 ranks with 1 micro-batch each see the same data as 1 rank
with 2 micro-batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignment.char_diffusion.config import RunConfig
from alignment.distributed import DistInfo, init_distributed


@dataclass(frozen=True)
class Runtime(DistInfo):
    """A :class:`~alignment.distributed.DistInfo` (rank, world, device) plus the autocast dtype."""

    autocast_dtype: torch.dtype | None = None  # None: plain float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def setup_runtime(cfg: RunConfig) -> Runtime:
    """The device and dtype of ``cfg``; under torchrun (WORLD_SIZE > 1) also the process group."""
    info = init_distributed(cfg.device, cfg.backend)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if info.device.type == "cuda" else "float32")
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    return Runtime(info.rank, info.world_size, info.local_rank, info.device, autocast)


def slot_seed(seed: int, iteration: int, slot: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{iteration}/{slot}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def slot_generator(seed: int, iteration: int, slot: int, stream: str,
                   device: torch.device | str = "cpu") -> torch.Generator:  # fmt: skip
    """A generator for one (iteration, slot) and purpose (``"data"``, ``"fills"``, ...)."""
    g = torch.Generator(device=device)
    g.manual_seed(slot_seed(seed, iteration, slot, stream))
    return g


def slots(rt: Runtime, accumulation: int) -> Iterator[tuple[int, int, bool]]:
    """(micro step, slot, is last micro step) of this rank for one optimiser step."""
    for micro in range(accumulation):
        yield micro, micro * rt.world_size + rt.rank, micro == accumulation - 1


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:  # tied weights appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, warmup: int, decay: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, cosine to ``min_ratio`` at ``decay``, then flat."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= decay:
        return min_ratio
    progress = (step - warmup) / max(1, decay - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine (nanoGPT's shape) as a torch LambdaLR, stepped once per optimiser step."""
    warmup, decay, ratio = cfg.warmup_iters, cfg.decay_iters, cfg.min_lr / cfg.learning_rate

    def factor(step: int) -> float:  # a closure: the schedule comes from the config, not the checkpoint
        return lr_factor(step, warmup, decay, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float
) -> float:
    """Clip (if ``grad_clip`` > 0), step, zero the gradients, advance the LR (unless ``scheduler`` is
    None); returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        norm = (
            float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return norm
