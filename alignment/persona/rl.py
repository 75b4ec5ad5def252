"""The persona system's losses, as pure functions of tensors, built on :mod:`alignment.pg`.

Shapes: B inputs, G sampled responses per input (N = B·G rows, row b·G + g), T response tokens,
V vocabulary, K retrieved passages.

* :func:`reinforce_objective`: one sampled response per input, loss −mean((R − b)·log π(y)) with
  log π(y) the sum of the response's token log-probs (the exact score-function gradient of E[R])
  and b none, the batch mean, or the leave-one-out mean of the other inputs' rewards.
* :func:`grpo_objective`: G responses per input, group-relative advantages, the clipped ratio
  against the log-probs of the weights that sampled them, plus β·KL(π‖ref) per token, π the
  sampled distribution (nucleus included) and ref the reference without the nucleus.
* :func:`distillation_loss`: the retriever's distribution over its K passages toward
  softmax(reward per passage / τ_gold), as LAPDOG distils its retriever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from alignment.pg import (
    PGLoss,
    clipped_pg_loss,
    group_advantages,
    leave_one_out_baseline,
    per_token_kl,
    reference_mass,
    reinforce_loss,
    token_logprobs,
)
from alignment.pg.advantages import Scale

Baseline = Literal["none", "batch_mean", "leave_one_out"]


@dataclass(frozen=True)
class ReinforceResult:
    loss: torch.Tensor  # scalar with grad
    baseline: torch.Tensor  # [B] the baseline subtracted from each reward
    seq_logprob: torch.Tensor  # [B] detached log π(y)


def reinforce_baseline(rewards: torch.Tensor, kind: Baseline) -> torch.Tensor:
    """The baseline [B] for rewards [B]: zeros, the batch mean, or the mean of the other B − 1."""
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "batch_mean":
        if rewards.numel() < 2:
            raise ValueError("a batch-mean baseline needs at least 2 inputs per batch (it would cancel R)")
        return rewards.mean().expand_as(rewards)
    if kind == "leave_one_out":
        return leave_one_out_baseline(rewards)
    raise ValueError(f"baseline must be 'none', 'batch_mean' or 'leave_one_out', got {kind!r}")


def reinforce_objective(
    token_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, baseline: Baseline
) -> ReinforceResult:
    """token_logp [B, T] (with grad, 0 off ``mask``), mask [B, T], rewards [B] -> the REINFORCE loss."""
    seq = (token_logp * mask).sum(dim=1)
    rewards = rewards.to(seq.dtype)
    b = reinforce_baseline(rewards, baseline)
    return ReinforceResult(reinforce_loss(seq, rewards, b), b, seq.detach())


@dataclass(frozen=True)
class GRPOSettings:
    kl_coeff: float = 0.1  # β
    kl_estimator: Literal["exact", "k1", "k2", "k3"] = "exact"
    clip_eps: float = 0.2
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_agg: Literal["token", "sequence"] = "token"


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale, batch_rewards: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """rewards [B·G] (row b·G + g) -> advantages [B·G] and the share of groups with equal rewards.

    batch_rewards: with scale "batch", every rank's rewards of this step (the generation batch, as
    TRL means it); None on one process."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    adv = group_advantages(rewards.view(-1, group_size), scale=scale, batch_rewards=batch_rewards)
    return adv.advantages.reshape(-1), adv.zero_spread_fraction


def grpo_objective(
    dist_logits: torch.Tensor,
    ref_dist_logits: torch.Tensor | None,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    settings: GRPOSettings,
) -> tuple[PGLoss, torch.Tensor]:
    """The GRPO loss of one inner epoch.

    dist_logits [N, T, V]: the policy's *sampled distribution* (tempered, on the sampled support:
        see :func:`alignment.persona.sampler.sampled_logits`), with grad.
    ref_dist_logits [N, T, V]: the frozen reference's at the same temperature and banned ids but
        without the nucleus (:func:`alignment.persona.sampler.reference_logits`; no grad), so the
        KL is that of the distribution really sampled; None only when β = 0 and no KL is wanted.
    tokens, mask [N, T]: the sampled responses; old_logp [N, T]: their log-probs under the weights
        that sampled them, or None on the first inner epoch, when those are the current weights:
        the detached log-probs of this very forward are used, so the ratio is exactly 1.
    advantages [N]. Returns :class:`alignment.pg.PGLoss` (loss with grad; pg_loss, kl, clip
    fraction and ratio mean for logging) and the detached log-probs [N, T] (the next inner
    epochs' ``old_logp``).
    """
    safe = torch.where(mask, tokens, dist_logits.detach().argmax(-1))  # pad is outside the support
    logp = token_logprobs(dist_logits, safe)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    if old_logp is None:
        old_logp = logp.detach()
    kl = None
    if ref_dist_logits is not None:
        if settings.kl_estimator == "exact":
            kl = per_token_kl("exact", logits=dist_logits, ref_logits=ref_dist_logits)
        else:
            ref_logp = torch.where(mask, token_logprobs(ref_dist_logits, safe), torch.zeros_like(old_logp))
            # k3 under a nucleus: subtract ref(S), not 1, so that its value stays unbiased
            mass = reference_mass(dist_logits, ref_dist_logits) if settings.kl_estimator == "k3" else None
            kl = per_token_kl(settings.kl_estimator, logp=logp, ref_logp=ref_logp, ref_mass=mass)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    elif settings.kl_coeff != 0:
        raise ValueError("grpo_kl_coeff > 0 needs the reference model's logits")
    out = clipped_pg_loss(
        logp,
        old_logp,
        advantages,
        mask,
        eps_low=settings.clip_eps,
        eps_high=settings.clip_eps,
        agg=settings.loss_agg,
        kl=kl,
        beta=settings.kl_coeff,
        # sampled-token estimators on tokens drawn by the old weights: importance-weight them (as
        # TRL 1.16 does by default); the exact KL sums over the vocabulary and needs no weight
        kl_importance_weight=settings.kl_estimator != "exact",
    )
    return out, old_logp


def distillation_loss(
    retriever_scores: torch.Tensor,
    passage_rewards: torch.Tensor,
    temperature_score: float,
    temperature_gold: float,
) -> torch.Tensor:
    """KL(softmax(reward/τ_gold) ‖ softmax(score/τ_score)), averaged over the B inputs.

    retriever_scores [B, K] (with grad): the retriever's scores of each input's K passages;
    passage_rewards [B, K]: the reward of the reader's response given only that passage. (LAPDOG
    calls ``nn.KLDivLoss()`` with its default element-wise mean, i.e. this divided by K.)
    """
    if retriever_scores.shape != passage_rewards.shape:
        raise ValueError(
            f"scores {tuple(retriever_scores.shape)} and rewards {tuple(passage_rewards.shape)} differ"
        )
    if temperature_score <= 0 or temperature_gold <= 0:
        raise ValueError("distillation temperatures must be > 0")
    target = torch.softmax(passage_rewards.detach().float() / temperature_gold, dim=-1)
    log_q = torch.log_softmax(retriever_scores.float() / temperature_score, dim=-1)
    return torch.nn.functional.kl_div(log_q, target, reduction="batchmean")
