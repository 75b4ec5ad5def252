"""Issue 21, item 3 with 2 real gloo ranks (torchrun): ``batch``-scaled advantages divide by the std of
the whole generation batch (every rank, every micro-batch), as TRL's do, so each rank's advantages
equal those of one process holding the whole batch."""

from __future__ import annotations

import os
import sys

import torch

from alignment.distributed import DistInfo
from alignment.persona.rl import grpo_advantages
from tests.conftest import REPO
from tests.pg_ddp_worker import GROUP, char_advantages, persona_advantages, persona_rewards
from tests.test_char_diffusion_ddp import _run_group


def test_two_gloo_ranks_scale_advantages_by_the_whole_generation_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
           str(REPO / "tests" / "pg_ddp_worker.py"), str(tmp_path)]  # fmt: skip
    proc = _run_group(cmd, env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Character diffusion: 2 ranks × 2 micro-batches (slots 0..3) against 1 process × 4. The same
    # rewards are gathered in slot order on both layouts and reduced by the same flat std, so the
    # advantages agree bit for bit.
    single, everything = char_advantages(DistInfo(), accumulation=4)
    assert everything.shape == (4, 2, GROUP)
    for r, rank in enumerate(ranks):
        assert sorted(rank["char"]) == [r, r + 2]  # slot = micro step · world + rank
        assert torch.equal(rank["char_batch"], everything)
        for slot, adv in rank["char"].items():
            assert torch.equal(adv, single[slot]), slot
    # ... and really the batch's std, not a micro-batch's (4 · 2 · G rewards, group means removed)
    rewards = everything[1]
    centred = rewards - rewards.mean(1, keepdim=True)
    torch.testing.assert_close(single[1], centred / (everything.std() + 1e-4))
    assert not torch.allclose(single[1], centred / (rewards.std() + 1e-4))

    # Persona: each rank's 2 rows × G against one process holding both ranks' rows.
    whole = torch.cat([persona_rewards(0), persona_rewards(1)])
    one_process, _ = grpo_advantages(whole, GROUP, "batch")
    assert torch.equal(torch.cat([ranks[0]["persona"], ranks[1]["persona"]]), one_process)
    assert not torch.allclose(ranks[0]["persona"], persona_advantages(DistInfo()))  # rank 0 alone differs
