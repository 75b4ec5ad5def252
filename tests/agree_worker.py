"""A rank of the 2-process gloo group in tests/test_scorer_outage.py (a small module: spawned
children import only what it imports)."""

from __future__ import annotations

import torch.distributed as dist

from alignment.grpo.reward import agree_on_failure
from alignment.scoring.client import ScorerError


def agree_worker(rank: int, store: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        calm = agree_on_failure(None)
        mine = ScorerError("scorer at http://node7:8000 unavailable") if rank == 1 else None
        seen = agree_on_failure(mine)
        out.put((rank, calm, type(seen).__name__, str(seen)))
    finally:
        dist.destroy_process_group()
