"""Policy-gradient losses: the clipped GRPO/PPO surrogate and REINFORCE with a baseline.

Shapes: B sampled sequences (for GRPO, B = inputs × group size), T token positions; ``mask`` marks
the positions that are actions (completion tokens, or masked characters being filled).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Aggregation = Literal["token", "sequence"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (over everything, or along ``dim``); 0 if empty."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, agg: Aggregation = "token", num_items: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    "token": Σ loss·mask / N with N = ``num_items`` (the number of action tokens of the whole
        batch, when it is split into micro-batches: TRL's ``dapo``) or the mask's own count (TRL's
        ``bnpo``). Every token weighs the same, so long answers weigh more.
    "sequence": the mean over rows of each row's masked mean (TRL's ``grpo``): every sequence
        weighs the same, its loss normalised per action token.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token loss {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.to(per_token.dtype)
    if agg == "token":
        denom = mask.sum() if num_items is None else torch.as_tensor(float(num_items))
        return (per_token * mask).sum() / denom.clamp(min=1.0)
    if agg == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"agg must be 'token' or 'sequence', got {agg!r}")


class PGLoss(NamedTuple):
    loss: torch.Tensor  # scalar to backpropagate: policy term + β·KL term
    pg_loss: torch.Tensor  # detached policy term
    kl: torch.Tensor  # detached masked mean of the per-token KL (0 when none is given)
    clip_fraction: torch.Tensor  # share of action tokens where the clip is active
    ratio_mean: torch.Tensor  # masked mean of π/π_old (1 on the first update of a batch)


def clipped_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: Aggregation = "token",
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    num_items: float | None = None,
    kl_importance_weight: bool = False,
) -> PGLoss:
    """The clipped surrogate −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) plus β·KL, aggregated.

    logp [B, T]: log-probs of the sampled tokens under the weights being trained (with grad).
    old_logp [B, T]: the same under the weights that sampled them (no grad). On the first update
        of a batch they are equal (r = 1, the gradient is the plain policy gradient); from the
        second inner epoch on r ≠ 1 and the clip bounds how far one batch moves the policy.
    advantages [B] (one per sequence, broadcast over its tokens) or [B, T].
    kl [B, T]: per-token KL to the reference (see :mod:`alignment.pg.kl`), added with weight β
        before aggregation, as TRL does.
    kl_importance_weight: multiply the per-token KL by r (TRL 1.16's ``use_bias_correction_kl``, on
        by default there). A sampled-token estimator (k1/k2/k3) evaluated on tokens drawn from
        π_old estimates the KL of π_old's samples; weighting by r = π/π_old makes it an estimate
        for π again from the second inner epoch on. The exact KL sums over the whole vocabulary at
        each position and needs no such weight.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)} differ"
        )
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp.detach())
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    adv = adv.detach().to(ratio.dtype)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    pg = aggregate(per_token, mask, agg, num_items)
    kl_mean = torch.zeros(())
    loss = pg
    if kl is not None:
        if kl.shape != mask.shape:
            raise ValueError(f"kl {tuple(kl.shape)} and mask {tuple(mask.shape)} differ")
        if kl_importance_weight:
            kl = kl * ratio
        kl_mean = masked_mean(kl.detach(), mask)
        if beta != 0.0:
            loss = pg + beta * aggregate(kl, mask, agg, num_items)
    active = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return PGLoss(
        loss=loss,
        pg_loss=pg.detach(),
        kl=kl_mean,
        clip_fraction=masked_mean(active.to(ratio.dtype), mask).detach(),
        ratio_mean=masked_mean(ratio.detach(), mask),
    )


def reinforce_loss(
    logp: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """−mean((R − b)·log π(y)): minimising it raises the log-probability of above-baseline samples.

    logp [B]: log-probability of each sampled sequence (sum, or per-token mean, of its tokens'
    log-probs, with grad); rewards [B]; baseline: [B] (e.g. leave-one-out) or a scalar. Rewards
    and baseline are treated as constants.
    """
    if logp.dim() != 1 or rewards.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and rewards {tuple(rewards.shape)} must both be [B]")
    advantage = (rewards - baseline).detach().to(logp.dtype)
    return -(advantage * logp).mean()
