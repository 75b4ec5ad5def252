"""Pretrain the generator: predict the hidden characters of line-aligned blocks (masked-token loss).

    python -m alignment.char_diffusion.train --config alignment/char_diffusion/train.yaml \\
        [--dataset models/char_diffusion/gpu/data --out_dir models/char_diffusion/gpu/generator --max_iters 5000] [--resume]
    torchrun --nproc_per_node 4 -m alignment.char_diffusion.train --config ...

The loss is the cross-entropy at the masked positions only, averaged over them. ``--resume``
continues ``out_dir/ckpt.pt`` (model, optimiser, schedule, RNG states) where it stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignment import cli
from alignment.char_diffusion.config import PretrainConfig
from alignment.char_diffusion.data import CharData
from alignment.char_diffusion.loop import run_cli, run_supervised
from alignment.char_diffusion.masking import masked_blocks
from alignment.char_diffusion.model import Generator, ModelArgs
from alignment.char_diffusion.runtime import Runtime, setup_runtime, slot_generator
from alignment.distributed import cleanup

logger = logging.getLogger("alignment.char_diffusion.train")


def masked_loss(gen: nn.Module, data: CharData, cfg: PretrainConfig, split: str, batch_size: int,
                generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Mean cross-entropy over the masked characters of one batch, and their accuracy."""
    tokens, inp, mask = masked_blocks(data, split, batch_size, cfg, generator)
    tokens, inp, mask = tokens.to(device), inp.to(device), mask.to(device)
    logits = gen(inp)[mask].float()  # [N, V]
    loss = F.cross_entropy(logits, tokens[mask])
    accuracy = float((logits.argmax(-1) == tokens[mask]).float().mean())
    return loss, {"accuracy": accuracy, "masked_fraction": float(mask.float().mean())}


@torch.no_grad()
def evaluate_generator(gen: nn.Module, data: CharData, cfg: PretrainConfig, rt: Runtime) -> dict[str, float]:
    """Masked-token loss and accuracy on ``eval_iters`` fixed validation batches."""
    totals = {"loss": 0.0, "accuracy": 0.0}
    for i in range(cfg.eval_iters):
        with rt.autocast():
            loss, m = masked_loss(gen, data, cfg, "val", cfg.batch_size,
                                  slot_generator(cfg.seed, -1, i, "eval"), rt.device)  # fmt: skip
        totals["loss"] += float(loss) / cfg.eval_iters
        totals["accuracy"] += m["accuracy"] / cfg.eval_iters
    return totals


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the generator of ``cfg``; returns the last metrics and the checkpoint path."""
    data = CharData(cfg.dataset)
    rt = setup_runtime(cfg)
    try:
        args = ModelArgs("generator", data.vocab.size, data.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                         cfg.dropout, cfg.bias)  # fmt: skip
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        gen = Generator(args).to(rt.device)

        def micro(model: nn.Module, it: int, slot: int) -> tuple[torch.Tensor, dict[str, float]]:
            g = slot_generator(cfg.seed, it, slot, "data")
            return masked_loss(model, data, cfg, "train", cfg.batch_size, g, rt.device)

        return run_supervised(cfg, rt, gen, data.vocab, micro, lambda m: evaluate_generator(m, data, cfg, rt),
                              resume=resume)  # fmt: skip
    finally:
        cleanup(rt)


def main(argv: list[str] | None = None) -> int:
    out = run_cli(__doc__, PretrainConfig, pretrain, argv, "YAML recipe (flags override it)")
    print(f"generator: {out['checkpoint']}  val {out['eval']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
