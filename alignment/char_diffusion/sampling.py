"""k fills of the masked positions from ONE generator forward, and their log-probs under exactly
the distribution they were drawn from.

The generator's logits at the N masked positions of a batch become the sampled distribution with
:func:`alignment.pg.sampling_logits` (temperature, top-p nucleus, the special tokens ``[MASK]``,
``[PAD]``, ``[CLS]`` removed). The k fills of every input are k independent draws from that one
distribution (the logits are expanded, not recomputed), and their log-probs are read from the same
logits with :func:`alignment.pg.token_logprobs`. Only masked positions are sampled: visible
characters are copied from the input.

Shapes: B inputs, T = block size, V vocabulary, N = mask.sum() masked positions over the batch,
k = group size. Values per masked position are kept as [k, N] and spread to [B, k, T] (zeros at
visible positions) with :func:`to_positions` for the per-sequence losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignment.pg import sample, sampling_logits, token_logprobs


def fill_distribution(logits: torch.Tensor, mask: torch.Tensor, temperature: float, top_p: float,
                      banned_ids: Sequence[int], keep: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logits [N, V] of the sampled distribution at the masked positions, with −inf outside its
    support and gradient flowing to ``logits`` [B, T, V]; support ``keep`` bool [N, V]).
    ``keep`` given (a later inner epoch): that support is reused as is."""
    return sampling_logits(logits[mask], temperature, top_p, banned_ids, keep)


def draw_fills(dist_logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k independent draws at each masked position: dist_logits [N, V] -> long [k, N]."""
    return sample(dist_logits.detach().unsqueeze(0).expand(k, *dist_logits.shape), generator)


def fill_logprobs(dist_logits: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """log π(draw) under the sampled distribution: dist_logits [N, V], draws long [k, N] -> [k, N]."""
    k = draws.shape[0]
    return token_logprobs(dist_logits.unsqueeze(0).expand(k, *dist_logits.shape), draws)


def place_fills(inp: torch.Tensor, mask: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The k filled sequences: inp long[B, T] with draws long[k, N] at the masked positions ->
    long[B, k, T]."""
    filled = inp.unsqueeze(0).repeat(draws.shape[0], 1, 1)  # [k, B, T]
    filled[:, mask] = draws
    return filled.transpose(0, 1).contiguous()


def to_positions(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [k, N] (per masked position) -> [B, k, T] with zeros at visible positions
    (differentiable in ``values``)."""
    full = values.new_zeros(values.shape[0], *mask.shape)
    full[:, mask] = values
    return full.transpose(0, 1)
