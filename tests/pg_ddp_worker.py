"""Issue 21, item 3: ``batch``-scaled advantages over the whole generation batch, in both systems,
computed the way their trainers compute them. Run as one torchrun rank (``__main__``: gloo, results
saved to argv[1]/rank<R>.pt; then, in the same process group, character-diffusion GRPO with the
config in argv[2], its final weights added), or called on one process by tests/test_pg_ddp.py for
the reference. (One process group per launch: train_grpo joins the open one and leaves it at the
end; joining a second group in the same torchrun launch can meet the first one's stale rendezvous
keys.)"""

from __future__ import annotations

import os
import sys

import torch

from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.grpo import generation_rewards, grade, rollout
from alignment.char_diffusion.model import Generator, Judge, ModelArgs
from alignment.char_diffusion.runtime import slots
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import load_config
from alignment.distributed import DistInfo, cleanup, init_distributed
from alignment.persona import steps
from alignment.persona.rl import grpo_advantages

V, BANNED, GROUP = 7, (4, 5, 6), 4  # 4 characters, then [MASK] [PAD] [CLS]


def char_advantages(info: DistInfo, accumulation: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each of this rank's slots' advantages [B, k] under ``advantage_scale: batch``, and the gathered
    generation batch's rewards: sampled and scored by a tiny generator and judge, identical on every
    rank (same seed), from per-slot data and fill generators, as train_grpo draws them."""
    torch.manual_seed(0)
    gen = Generator(ModelArgs("generator", V, 6, 1, 2, 8)).eval()
    judge = Judge(ModelArgs("judge", V, 6, 1, 2, 8)).eval()
    cfg = GRPOConfig(group_size=GROUP, advantage_scale="batch")
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1:4] = True
    rollouts = {}
    for _, slot, _ in slots(info, accumulation):  # type: ignore[arg-type]  # a DistInfo has what slots reads
        tokens = torch.randint(0, 4, (2, 6), generator=torch.Generator().manual_seed(100 + slot))
        with torch.no_grad():
            rollouts[slot], _ = rollout(gen, gen, judge, tokens, tokens.masked_fill(mask, 4), mask, cfg, BANNED,
                                        torch.Generator().manual_seed(slot))  # fmt: skip
    everything = generation_rewards(info, [ro.rewards for ro in rollouts.values()])
    return {slot: grade(ro, cfg, everything).advantages for slot, ro in rollouts.items()}, everything


def persona_rewards(rank: int) -> torch.Tensor:
    """Rank ``rank``'s rewards of one GRPO step: 2 rows × G responses (row b·G + g)."""
    return torch.rand(2 * GROUP, generator=torch.Generator().manual_seed(rank)) * 3


def persona_advantages(info: DistInfo) -> torch.Tensor:
    """This rank's advantages [2·G] as persona's grpo_step forms them with scale "batch"."""
    rewards = persona_rewards(info.rank)
    return grpo_advantages(rewards, GROUP, "batch", steps.generation_rewards(rewards, info))[0]


if __name__ == "__main__":
    info = init_distributed("cpu", "gloo")
    char, everything = char_advantages(info, accumulation=2)
    result = {"char": char, "char_batch": everything, "persona": persona_advantages(info)}
    out = train_grpo(load_config(GRPOConfig, sys.argv[2]))  # in this process group; leaves it at the end
    result["model"] = {k: v.detach().clone() for k, v in out["policy"].state_dict().items()}
    result["wrapper"] = out["wrapper"]
    torch.save(result, os.path.join(sys.argv[1], f"rank{info.rank}.pt"))
    cleanup(info)  # a no-op when train_grpo has left the group already
