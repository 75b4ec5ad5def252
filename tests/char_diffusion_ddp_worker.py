"""One torchrun rank of the DDP test: GRPO with each config (YAML) in argv[2:], one after the other
(each run joins and leaves the process group); the rank's final weights and the wrapper its policy
ran in are saved to argv[1]/rank<R>-<i>.pt for the i-th config."""

from __future__ import annotations

import os
import sys

import torch

from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import load_config

if __name__ == "__main__":
    for i, path in enumerate(sys.argv[2:]):
        out = train_grpo(load_config(GRPOConfig, path))
        state = {k: v.detach().clone() for k, v in out["policy"].state_dict().items()}
        torch.save({"model": state, "wrapper": out["wrapper"], "world": int(os.environ["WORLD_SIZE"])},
                   os.path.join(sys.argv[1], f"rank{os.environ['RANK']}-{i}.pt"))  # fmt: skip
