"""The judge's task and reward: how much of a block did the generator's own fills change?

Training examples are made the way GRPO will present them: mask a clean block, let the (frozen)
generator fill the masked positions from one forward with the sampling settings, and take as target
the fraction of the block's characters that now differ from the original. The judge learns to
predict it from the block alone (:class:`~.model.Judge` prepends ``[CLS]`` itself, so training and
scoring see one layout). Its reward for a filled block is ``1 − sigmoid(judge(block))``.
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
                       rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``fills`` fillings of each masked block from one generator forward: (filled blocks
    long[B * fills, T], target float[B * fills] = fraction of characters differing from ``tokens``).
    Several fills of one input differ only where the generator's draws differ, as in a GRPO group:
    the judge learns to rank them, not only to guess how much was masked."""
    dist, _ = fill_distribution(generator(inp).float(), mask, temperature, top_p, banned_ids)
    filled = place_fills(inp, mask, draw_fills(dist, fills, rng))  # [B, fills, T]
    target = (filled != tokens.unsqueeze(1)).float().mean(dim=-1)
    return filled.flatten(0, 1), target.flatten()


def judge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between sigmoid(logits) float[M] and the corrupted fraction float[M]
    (a soft label in [0, 1])."""
    return F.binary_cross_entropy_with_logits(logits.float(), target)


@torch.no_grad()
def judge_rewards(judge: nn.Module, blocks: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """1 − predicted corrupted fraction: blocks long[M, T] -> float[M], in chunks of ``chunk`` rows."""
    scores = [torch.sigmoid(judge(part).float()) for part in blocks.split(chunk)]
    return 1.0 - torch.cat(scores)
