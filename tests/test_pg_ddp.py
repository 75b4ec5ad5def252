"""Issue 21, item 3 with 2 real gloo ranks (torchrun): ``batch``-scaled advantages divide by the std of
the whole generation batch (every rank, every micro-batch), as TRL's do, so each rank's advantages
equal those of one process holding the whole batch; and character-diffusion GRPO with that scale
ends with the weights of one process accumulating both ranks' micro-batches."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import yaml

from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import config_to_dict
from alignment.distributed import DistInfo
from alignment.persona.rl import grpo_advantages
from tests.conftest import REPO
from tests.pg_ddp_worker import GROUP, char_advantages, persona_advantages, persona_rewards
from tests.test_char_diffusion_ddp import _config, _run_group


def test_two_gloo_ranks_scale_advantages_by_the_whole_generation_batch(char_diffusion_models, tmp_path):
    def batch_config(name: str, accumulation: int):
        cfg = _config(char_diffusion_models, tmp_path / name, accumulation)
        return dataclasses.replace(cfg, advantage_scale="batch")

    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(batch_config("ddp", 1))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
           str(REPO / "tests" / "pg_ddp_worker.py"), str(tmp_path), str(cfg_file)]  # fmt: skip
    proc = _run_group(cmd, env, timeout=300)
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

    # The char trainer end to end: each rank samples its micro-batch, the rewards of both are
    # gathered, then each re-forwards and back-propagates; DDP averages. One process accumulating
    # the same 2 slots divides by the std of the same tensor and sums g0/2 + g1/2 (a power-of-two
    # scale and a two-term sum are exact and commutative), so the weights agree bit for bit.
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * 2
    w0, w1 = ranks[0]["model"], ranks[1]["model"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    one = train_grpo(batch_config("single", 2))["policy"].state_dict()
    assert all(torch.equal(w0[k], one[k]) for k in w0)
    group = train_grpo(_config(char_diffusion_models, tmp_path / "group", 2))["policy"].state_dict()
    assert any(not torch.equal(w0[k], group[k]) for k in w0)  # the scale changed the update
