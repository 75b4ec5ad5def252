"""Which characters of a block are hidden, and the masked input the generator sees.

Three strategies, each drawing a per-row target ratio uniformly from ``[mask_min, mask_max]``:

* ``random``: exactly ``round(ratio * T)`` positions, uniformly without replacement;
* ``span``: contiguous spans with geometric lengths (mean ``span_mean``) at random starts until
  exactly that many positions are hidden;
* ``sticky``: a two-state Markov chain along the row whose stationary masked fraction is the ratio
  and whose ``sticky_p`` in [0, 1) is the correlation between neighbours (0: independent; near 1:
  long runs; mean masked run length ``1 / ((1 - ratio)(1 - sticky_p))``).

Every row has at least one hidden position. Hidden positions always become ``[MASK]``: never a
random character the generator could not know to fix (the judge would penalise it regardless).
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch

from alignment.char_diffusion.data import CharData

Strategy = Literal["random", "span", "sticky"]
STRATEGIES: tuple[str, ...] = ("random", "span", "sticky")


def draw_ratios(batch: int, mask_min: float, mask_max: float, generator: torch.Generator) -> torch.Tensor:
    """Per-row target masked fractions: float[B] uniform in [mask_min, mask_max]."""
    if not 0.0 <= mask_min <= mask_max <= 1.0:
        raise ValueError(f"need 0 <= mask_min <= mask_max <= 1, got {mask_min}, {mask_max}")
    return mask_min + (mask_max - mask_min) * torch.rand(batch, generator=generator)


def _counts(ratios: torch.Tensor, length: int) -> torch.Tensor:
    return (ratios * length).round().long().clamp(1, length)


def random_mask(ratios: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """bool[B, T] with exactly ``round(ratio * T)`` (at least 1) True per row."""
    keys = torch.rand(len(ratios), length, generator=generator)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < _counts(ratios, length)[:, None]


def span_mask(
    ratios: torch.Tensor, length: int, generator: torch.Generator, span_mean: float
) -> torch.Tensor:
    """bool[B, T] of spans (geometric lengths, mean ``span_mean`` >= 1), exactly the target count.

    Spans are laid down in order (all rows at once) and the first ``count`` positions they cover are
    kept, so the last span may be cut short. A row whose candidate spans cover too little (rare:
    about three times the count is drawn) gets further spans one at a time.
    """
    if span_mean < 1.0:
        raise ValueError(f"span_mean must be >= 1, got {span_mean}")
    counts = _counts(ratios, length)
    batch = len(ratios)
    n_spans = int(3 * int(counts.max()) / span_mean) + 2
    starts = torch.randint(length, (batch, n_spans), generator=generator)
    spans = _geometric(torch.rand(batch, n_spans, generator=generator), span_mean)
    pos = torch.arange(length)
    covers = (pos >= starts[..., None]) & (pos < (starts + spans)[..., None])  # [B, S, T]
    first = torch.where(covers.any(1), covers.float().argmax(1), n_spans)  # first span over each position
    order = (first * length + pos).argsort(1).argsort(1)  # rank of each position in painting order
    mask = (order < counts[:, None]) & (first < n_spans)
    for row in (mask.sum(1) < counts).nonzero().flatten().tolist():
        while (have := int(mask[row].sum())) < int(counts[row]):
            start = int(torch.randint(length, (1,), generator=generator))
            span = int(_geometric(torch.rand(1, generator=generator), span_mean))
            free = (~mask[row, start : start + span]).nonzero().flatten()[: int(counts[row]) - have] + start
            mask[row, free] = True
    return mask


def _geometric(u: torch.Tensor, mean: float) -> torch.Tensor:
    """Geometric lengths on {1, 2, ...} with the given mean, from uniforms ``u`` in [0, 1)."""
    stop = 1.0 / mean
    if stop >= 1.0:
        return torch.ones_like(u, dtype=torch.long)
    return 1 + (torch.log1p(-u) / math.log1p(-stop)).long()


def sticky_mask(
    ratios: torch.Tensor, length: int, generator: torch.Generator, sticky_p: float
) -> torch.Tensor:
    """bool[B, T] from a Markov chain with stationary fraction ``ratio`` and neighbour correlation
    ``sticky_p``; a row that came out empty gets one random position."""
    if not 0.0 <= sticky_p < 1.0:
        raise ValueError(f"sticky_p must be in [0, 1), got {sticky_p}")
    r = ratios.clamp(0.0, 1.0)
    stay = r + sticky_p * (1.0 - r)  # P(masked | previous masked)
    start = r * (1.0 - sticky_p)  # P(masked | previous visible)
    u = torch.rand(len(r), length, generator=generator)
    mask = torch.zeros(len(r), length, dtype=torch.bool)
    mask[:, 0] = u[:, 0] < r
    for t in range(1, length):
        mask[:, t] = u[:, t] < torch.where(mask[:, t - 1], stay, start)
    empty = ~mask.any(dim=1)
    if empty.any():
        pos = torch.randint(length, (int(empty.sum()),), generator=generator)
        mask[empty.nonzero().flatten(), pos] = True
    return mask


def make_mask(batch: int, length: int, generator: torch.Generator, strategy: Strategy = "random",
              mask_min: float = 0.15, mask_max: float = 0.15, span_mean: float = 4.0,
              sticky_p: float = 0.5) -> torch.Tensor:  # fmt: skip
    """bool[B, T]: the positions to hide, by ``strategy``."""
    ratios = draw_ratios(batch, mask_min, mask_max, generator)
    if strategy == "random":
        return random_mask(ratios, length, generator)
    if strategy == "span":
        return span_mask(ratios, length, generator, span_mean)
    if strategy == "sticky":
        return sticky_mask(ratios, length, generator, sticky_p)
    raise ValueError(f"unknown mask strategy {strategy!r}; choose one of {STRATEGIES}")


def apply_mask(tokens: torch.Tensor, mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The generator's input: ``tokens`` long[B, T] with ``[MASK]`` (and nothing else) where ``mask``."""
    return tokens.masked_fill(mask, mask_id)


class MaskSettings(Protocol):
    mask_strategy: Strategy
    mask_min: float
    mask_max: float
    span_mean: float
    sticky_p: float


def masked_blocks(data: CharData, split: str, batch_size: int, cfg: MaskSettings,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(original long[B, T], masked input long[B, T], mask bool[B, T]) of random line-aligned blocks."""
    tokens = data.blocks(split, batch_size, generator)
    mask = make_mask(batch_size, tokens.shape[1], generator, cfg.mask_strategy, cfg.mask_min, cfg.mask_max,
                     cfg.span_mean, cfg.sticky_p)  # fmt: skip
    return tokens, apply_mask(tokens, mask, data.vocab.mask_id), mask
