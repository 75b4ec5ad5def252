"""The judge's task and reward: how much of a block did the generator's own fills change?

Training examples are made the way GRPO will present them: mask a clean block, let the (frozen)
generator fill the masked positions from one forward with the sampling settings, and take as target
the fraction of the block's characters that now differ from the original (a ``"cls"`` judge), or
which characters differ (a ``"tokens"`` judge, whose predicted fraction is the mean over them). The
judge learns it from the block alone (:class:`~.model.Judge` prepends ``[CLS]`` itself, so training
and scoring see one layout). Its reward for a filled block is ``1 − judge.corrupted_fraction(block)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignment.char_diffusion.sampling import draw_fills, fill_distribution, place_fills


@torch.no_grad()
def corrupt_with_fills(generator: nn.Module, tokens: torch.Tensor, inp: torch.Tensor, mask: torch.Tensor,
                       temperature: float, top_p: float, banned_ids: Sequence[int], fills: int = 1,
                       rng: torch.Generator | None = None, per_position: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``fills`` fillings of each masked block from one generator forward: (filled blocks
    long[B * fills, T], target float[B * fills] = fraction of characters differing from ``tokens``;
    with ``per_position``, float[B * fills, T] = 1 where a character differs).
    Several fills of one input differ only where the generator's draws differ, as in a GRPO group:
    the judge learns to rank them, not only to guess how much was masked."""
    dist, _ = fill_distribution(generator(inp).float(), mask, temperature, top_p, banned_ids)
    filled = place_fills(inp, mask, draw_fills(dist, fills, rng))  # [B, fills, T]
    changed = (filled != tokens.unsqueeze(1)).float().flatten(0, 1)  # [B * fills, T]
    return filled.flatten(0, 1), changed if per_position else changed.mean(dim=-1)


def judge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between sigmoid(logits) and the target: the corrupted fraction float[M]
    (a soft label in [0, 1]) for a ``"cls"`` judge, the replaced characters float[M, T] (mean over
    all of them) for a ``"tokens"`` judge."""
    return F.binary_cross_entropy_with_logits(logits.float(), target)


@torch.no_grad()
def judge_rewards(judge: nn.Module, filled: torch.Tensor, inp: torch.Tensor, mask: torch.Tensor,
                  chunk: int = 32) -> torch.Tensor:  # fmt: skip
    """1 − predicted corrupted fraction of k fills of each masked block: filled long[B, k, T], inp
    long[B, T] (the masked blocks), mask bool[B, T] -> float[B, k], ``chunk`` blocks at a time."""
    parts = zip(filled.split(chunk), inp.split(chunk), mask.split(chunk), strict=True)
    return 1.0 - torch.cat([judge.corrupted_fraction(f, i, m) for f, i, m in parts])
