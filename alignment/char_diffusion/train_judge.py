"""Train the judge on the generator's own fills: predict the fraction of characters they changed.

    python -m alignment.char_diffusion.train_judge --config alignment/char_diffusion/judge.yaml \\
        [--generator_checkpoint models/char_diffusion/gpu/generator/ckpt.pt --out_dir models/char_diffusion/gpu/judge] [--resume]

The generator is frozen. Each example masks ``mask_min``–``mask_max`` of a line-aligned block, fills
it by sampling the generator (``temperature``, ``top_p``, special tokens excluded) and is labelled
with the fraction of the block that differs from the original text (see :mod:`.judge`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from alignment import cli
from alignment.char_diffusion.checkpoint import load_model, load_strict
from alignment.char_diffusion.config import JudgeConfig
from alignment.char_diffusion.data import CharData, check_same_vocab
from alignment.char_diffusion.judge import corrupt_with_fills, judge_loss
from alignment.char_diffusion.loop import run_cli, run_supervised
from alignment.char_diffusion.masking import masked_blocks
from alignment.char_diffusion.model import Judge, ModelArgs
from alignment.char_diffusion.runtime import Runtime, setup_runtime, slot_generator
from alignment.distributed import cleanup

logger = logging.getLogger("alignment.char_diffusion.train_judge")


def load_frozen_generator(path: str, data: CharData) -> nn.Module:
    """The generator of ``path``, checked against the data (vocabulary, block size), frozen."""
    gen, vocab, _ = load_model(path, "generator", "generator_checkpoint")
    check_same_vocab(vocab, path, data.vocab, str(data.meta_path))
    data.check_block_size(gen.args.block_size, path)
    gen.eval().requires_grad_(False)
    return gen


def build_judge(cfg: JudgeConfig, gen: nn.Module, data: CharData) -> Judge:
    """A new judge: the generator's shape and body weights with ``init_from_generator``, else the
    config's shape, randomly initialised (the same on every rank)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from_generator:
        args = replace(gen.args, kind="judge", dropout=cfg.dropout)
        judge = Judge(args)
        load_strict(judge.body, gen.body.state_dict(), cfg.generator_checkpoint)
        return judge
    return Judge(ModelArgs("judge", data.vocab.size, data.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                           cfg.dropout, cfg.bias))  # fmt: skip


def judge_batch(judge: nn.Module, gen: nn.Module, data: CharData, cfg: JudgeConfig, split: str, batch_size: int,
                rng: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The judge's loss on one batch of generator-filled blocks, and its mean absolute error."""
    tokens, inp, mask = (t.to(device) for t in masked_blocks(data, split, batch_size, cfg, rng))
    fill_rng = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=rng)))
    filled, target = corrupt_with_fills(gen, tokens, inp, mask, cfg.temperature, cfg.top_p, data.vocab.special_ids,
                                        cfg.fills_per_block, fill_rng)  # fmt: skip
    logits = judge(filled).float()
    loss = judge_loss(logits, target)
    mae = float((torch.sigmoid(logits.detach()) - target).abs().mean())
    return loss, {"mae": mae, "target_mean": float(target.mean())}


@torch.no_grad()
def evaluate_judge(
    judge: nn.Module, gen: nn.Module, data: CharData, cfg: JudgeConfig, rt: Runtime
) -> dict[str, float]:
    """Loss, mean absolute error and the correlation of prediction and target on fixed val batches."""
    preds, targets, losses = [], [], []
    for i in range(cfg.eval_iters):
        rng = slot_generator(cfg.seed, -1, i, "eval")
        tokens, inp, mask = (t.to(rt.device) for t in masked_blocks(data, "val", cfg.batch_size, cfg, rng))
        fill_rng = torch.Generator(device=rt.device).manual_seed(i)
        with rt.autocast():
            filled, target = corrupt_with_fills(gen, tokens, inp, mask, cfg.temperature, cfg.top_p,
                                                data.vocab.special_ids, cfg.fills_per_block, fill_rng)  # fmt: skip
            logits = judge(filled).float()
        preds.append(torch.sigmoid(logits))
        targets.append(target)
        losses.append(float(judge_loss(logits, target)))
    p, t = torch.cat(preds), torch.cat(targets)
    corr = float(torch.corrcoef(torch.stack([p, t]))[0, 1]) if p.std() > 0 and t.std() > 0 else 0.0
    return {"loss": sum(losses) / len(losses), "mae": float((p - t).abs().mean()), "corr": corr}


def train_judge(cfg: JudgeConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the judge of ``cfg``; returns the last metrics and the checkpoint path."""
    data = CharData(cfg.dataset)
    gen = load_frozen_generator(cfg.generator_checkpoint, data)
    rt = setup_runtime(cfg)
    try:
        gen.to(rt.device)
        judge = build_judge(cfg, gen, data).to(rt.device)

        def micro(model: nn.Module, it: int, slot: int) -> tuple[torch.Tensor, dict[str, float]]:
            rng = slot_generator(cfg.seed, it, slot, "data")
            return judge_batch(model, gen, data, cfg, "train", cfg.batch_size, rng, rt.device)

        return run_supervised(cfg, rt, judge, data.vocab, micro, lambda m: evaluate_judge(m, gen, data, cfg, rt),
                              resume=resume, extra={"generator_checkpoint": cfg.generator_checkpoint})  # fmt: skip
    finally:
        cleanup(rt)


def main(argv: list[str] | None = None) -> int:
    out = run_cli(__doc__, JudgeConfig, train_judge, argv, "YAML recipe (flags override it)")
    print(f"judge: {out['checkpoint']}  val {out['eval']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
