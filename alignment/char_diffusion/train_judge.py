"""Train the judge: how much of a block did the generator's fills get wrong?

    python -m alignment.char_diffusion.train_judge --config alignment/char_diffusion/judge.yaml \\
        [--generator_checkpoint models/char_diffusion/gpu/generator/ckpt.pt --out_dir models/char_diffusion/gpu/judge] [--resume]

The generator is frozen. Each example masks ``mask_min``–``mask_max`` of a line-aligned block. A
``cls`` or ``tokens`` judge sees it filled by sampling the generator (``temperature``, ``top_p``,
special tokens excluded) ``fills_per_block`` times and learns the fraction (``cls``) or the places
(``tokens``) of the characters that differ from the original text; a ``denoise`` judge learns the
original characters of the masked block itself (see :mod:`.model` and :mod:`.judge`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignment import cli
from alignment.char_diffusion.checkpoint import load_model, load_strict
from alignment.char_diffusion.config import JudgeConfig
from alignment.char_diffusion.data import CharData, check_same_vocab
from alignment.char_diffusion.judge import corrupt_with_fills, judge_loss
from alignment.char_diffusion.loop import run_cli, run_supervised
from alignment.char_diffusion.masking import masked_blocks
from alignment.char_diffusion.model import Judge, ModelArgs
from alignment.char_diffusion.monitor import pair_agreement
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
        args = replace(gen.args, kind="judge", dropout=cfg.dropout, judge_head=cfg.judge_head)
        judge = Judge(args)
        load_strict(judge.body, gen.body.state_dict(), cfg.generator_checkpoint)
        return judge
    return Judge(ModelArgs("judge", data.vocab.size, data.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                           cfg.dropout, cfg.bias, judge_head=cfg.judge_head))  # fmt: skip


def judge_batch(judge: nn.Module, gen: nn.Module, data: CharData, cfg: JudgeConfig, split: str, batch_size: int,
                rng: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The judge's loss on one batch, and a figure of how well it does.

    ``cls``/``tokens``: blocks filled by the generator, labelled with the fraction (or the places) of
    characters the fills changed; the figure is the mean absolute error of the predicted fraction.
    ``denoise``: the masked blocks themselves, cross-entropy of the original characters at the masked
    positions (no fills needed); the figure is the argmax accuracy there."""
    tokens, inp, mask = (t.to(device) for t in masked_blocks(data, split, batch_size, cfg, rng))
    if cfg.judge_head == "denoise":
        logits = judge(inp)[mask].float()  # [N, V]; called as given (maybe DDP-wrapped)
        loss = F.cross_entropy(logits, tokens[mask])
        return loss, {"accuracy": float((logits.argmax(-1) == tokens[mask]).float().mean())}
    fill_rng = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=rng)))
    tokens_head = cfg.judge_head == "tokens"
    filled, target = corrupt_with_fills(gen, tokens, inp, mask, cfg.temperature, cfg.top_p, data.vocab.special_ids,
                                        cfg.fills_per_block, fill_rng, per_position=tokens_head)  # fmt: skip
    logits = judge(filled).float()  # [M] or [M, T]
    loss = judge_loss(logits, target)
    fraction = torch.sigmoid(logits.detach())
    if tokens_head:
        fraction, target = fraction.mean(-1), target.mean(-1)
    return loss, {"mae": float((fraction - target).abs().mean()), "target_mean": float(target.mean())}


@torch.no_grad()
def evaluate_judge(
    judge: Judge, gen: nn.Module, data: CharData, cfg: JudgeConfig, rt: Runtime
) -> dict[str, float]:
    """On fixed validation batches: the training loss, and for the generator's fills of fixed masked
    blocks the mean absolute error and correlation of the predicted corrupted fraction with the
    true one, and ``pair_agreement``: how often the judge orders two fills of the same block as
    their true corrupted fractions are ordered (what GRPO's group-relative advantages use; 0.5 =
    chance)."""
    preds, targets, losses, agree, pairs = [], [], [], 0.0, 0
    for i in range(cfg.eval_iters):
        with rt.autocast():
            loss, _ = judge_batch(judge, gen, data, cfg, "val", cfg.batch_size,
                                  slot_generator(cfg.seed, -1, i, "eval-loss"), rt.device)  # fmt: skip
            tokens, inp, mask = (t.to(rt.device) for t in masked_blocks(
                data, "val", cfg.batch_size, cfg, slot_generator(cfg.seed, -1, i, "eval")))  # fmt: skip
            fill_rng = torch.Generator(device=rt.device).manual_seed(i)
            filled, target = corrupt_with_fills(gen, tokens, inp, mask, cfg.temperature, cfg.top_p,
                                                data.vocab.special_ids, cfg.fills_per_block, fill_rng)  # fmt: skip
            filled, target = filled.view(len(tokens), cfg.fills_per_block, -1), target.view(len(tokens), -1)
            pred = judge.corrupted_fraction(filled, inp, mask)  # [B, fills]
        losses.append(float(loss))
        preds.append(pred.flatten())
        targets.append(target.flatten())
        share, n = pair_agreement(-pred, -target)
        agree, pairs = agree + (share * n if n else 0.0), pairs + n
    p, t = torch.cat(preds), torch.cat(targets)
    corr = float(torch.corrcoef(torch.stack([p, t]))[0, 1]) if p.std() > 0 and t.std() > 0 else 0.0
    out = {"loss": sum(losses) / len(losses), "mae": float((p - t).abs().mean()), "corr": corr}
    if pairs:  # absent when no two fills of a block differed (fills_per_block 1)
        out["pair_agreement"] = agree / pairs
    return out


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
