"""One torchrun rank of the DDP test: GRPO with the config (YAML) in argv[1]; the rank's final weights
and the wrapper its policy ran in are saved to argv[2]/rank<R>.pt."""

from __future__ import annotations

import os
import sys

import torch

from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import load_config

if __name__ == "__main__":
    out = train_grpo(load_config(GRPOConfig, sys.argv[1]))
    state = {k: v.detach().clone() for k, v in out["policy"].state_dict().items()}
    torch.save({"model": state, "wrapper": out["wrapper"], "world": int(os.environ["WORLD_SIZE"])},
               os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))  # fmt: skip
