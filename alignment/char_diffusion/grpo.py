"""One GRPO micro-batch, as pure functions: roll out k fills per masked input from one policy
forward, score them with the judge, and form the loss

    loss = −E[ logπ(fill) · A ] + β · KL(π ‖ π_ref)

through :func:`alignment.pg.clipped_pg_loss` (ratio = 1 on the first update, so its gradient is the
plain policy gradient; clipped from the second inner epoch on). π is exactly the distribution the
fills were drawn from (temperature, top-p, special tokens removed); log-probs and the KL are
normalised per masked character (``agg="sequence"``: each fill's masked mean, then the mean over
fills). π_ref is the frozen initial generator at the same temperature with the special tokens
removed but no nucleus (truncating it would make KL(π‖π_ref) infinite wherever π's nucleus is
wider than its own). ``kl_estimator="exact"`` (default) sums over the vocabulary at every masked
position: value and gradient of KL(π‖π_ref). ``"k3"`` is TRL's sampled estimator corrected for
the nucleus: exp(d) − d − π_ref(S) with S the support sampled from, not TRL's − 1 (which assumes
E_π[π_ref/π] = 1; on S that expectation is π_ref(S), so TRL's form is biased low by 1 − π_ref(S):
with an unchanged policy the KL is −log π_ref(S), 0.0460 for π_ref(S) = 0.955, and TRL's form
averages 0.0010). Its value is then an unbiased estimate of KL(π‖π_ref); its gradient, unchanged
by the constant, is that of the reverse π_ref(S)·KL(π_ref,S‖π) (π_ref,S: π_ref cut to S and
renormalised); see :mod:`alignment.pg.kl`.

Advantages (:func:`grade`) are group-relative; ``advantage_scale: batch`` divides by the std of the
whole generation batch, every micro-batch of every rank (:func:`generation_rewards`), as TRL does.
Those rewards exist only once every micro-batch has been sampled, so that scale samples first
(no-grad forwards) and back-propagates each micro-batch afterwards from one more forward
(:func:`rescore`); ``group`` and ``none`` need nothing beyond the micro-batch and keep one forward.

Shapes: B inputs of T characters, k = group size, N masked positions in the batch, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.judge import judge_rewards
from alignment.char_diffusion.sampling import (
    draw_fills,
    fill_distribution,
    fill_logprobs,
    place_fills,
    to_positions,
)
from alignment.distributed import DistInfo, gather_objects
from alignment.pg import (
    clipped_pg_loss,
    exact_kl,
    group_advantages,
    per_token_kl,
    reference_mass,
    sampling_logits,
)


@dataclass
class Rollout:
    """What one micro-batch sampled and how it was scored (no graph attached)."""

    tokens: torch.Tensor  # long[B, T] the original blocks (ground truth)
    inp: torch.Tensor  # long[B, T] the masked input ([MASK] at masked positions only)
    mask: torch.Tensor  # bool[B, T]
    draws: torch.Tensor  # long[k, N] the sampled characters
    filled: torch.Tensor  # long[B, k, T] the k filled blocks of each input
    keep: torch.Tensor  # bool[N, V] the support that was sampled from
    old_logp: torch.Tensor  # [k, N] log π_old(draw)
    ref_logits: torch.Tensor  # [N, V] π_ref's distribution (tempered, specials removed)
    rewards: torch.Tensor  # [B, k] judge rewards
    advantages: torch.Tensor | None  # [B, k]; None until graded (batch scale: after the whole batch)
    zero_spread_fraction: float | None  # share of groups with equal rewards; set with the advantages
    fill_accuracy: float  # share of masked characters equal to the original, over all fills


def grade(ro: Rollout, cfg: GRPOConfig, batch_rewards: torch.Tensor | None = None) -> Rollout:
    """``ro`` with its advantages [B, k]: group-relative, scaled as ``cfg.advantage_scale`` says; for
    ``batch``, by the std of ``batch_rewards``, the generation batch's (:func:`generation_rewards`)."""
    adv = group_advantages(ro.rewards, cfg.advantage_scale, cfg.advantage_eps, cfg.advantage_baseline,
                           batch_rewards)  # fmt: skip
    return replace(ro, advantages=adv.advantages, zero_spread_fraction=adv.zero_spread_fraction)


def generation_rewards(info: DistInfo, rewards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rewards of one generation batch: this rank's micro-batches' ``rewards`` ([B, k] each, in
    micro-step order) gathered from every rank -> [slots, B, k], in slot order (slot = micro step ·
    world + rank, the order the data is drawn in). So 2 ranks × 1 micro-batch and 1 rank × 2
    micro-batches hold the same tensor, and their std is bit-equal. Floats travel as Python floats,
    which hold a float32 exactly."""
    local = torch.stack(list(rewards))
    if not info.enabled:
        return local
    gathered = gather_objects(info, local.tolist())  # [world][micro][B][k]
    micro = len(gathered[0])
    if any(len(g) != micro for g in gathered):
        raise RuntimeError(f"ranks sampled different numbers of micro-batches: {[len(g) for g in gathered]}")
    ordered = [gathered[r][m] for m in range(micro) for r in range(info.world_size)]
    return torch.tensor(ordered, dtype=local.dtype, device=local.device)


def rescore(policy: nn.Module, ro: Rollout, cfg: GRPOConfig, banned: tuple[int, ...]) -> torch.Tensor:
    """A later inner epoch: one new policy forward, restricted to the support that was sampled
    from -> logits [N, V] with grad."""
    dist, _ = fill_distribution(policy(ro.inp).float(), ro.mask, cfg.temperature, cfg.top_p, banned, ro.keep)
    return dist


def rollout(policy: nn.Module, reference: nn.Module, judge: nn.Module, tokens: torch.Tensor, inp: torch.Tensor,
            mask: torch.Tensor, cfg: GRPOConfig, banned: tuple[int, ...],
            rng: torch.Generator | None = None) -> tuple[Rollout, torch.Tensor]:  # fmt: skip
    """Sample ``group_size`` fills per input from ONE policy forward; score them; grade them
    (except with ``advantage_scale: batch``: the caller grades once the whole batch is sampled).

    Returns the rollout and the policy's sampled-distribution logits [N, V] with their graph (when
    called with gradients), so the first update needs no second forward.
    """
    logits = policy(inp).float()  # [B, T, V]: the one forward of this micro-batch
    dist, keep = fill_distribution(logits, mask, cfg.temperature, cfg.top_p, banned)
    draws = draw_fills(dist, cfg.group_size, rng)  # [k, N]
    with torch.no_grad():
        ref_logits, _ = sampling_logits(reference(inp).float()[mask], cfg.temperature, 1.0, banned)
        filled = place_fills(inp, mask, draws)  # [B, k, T]
        rewards = judge_rewards(judge, filled, inp, mask).float()
        truth = tokens[mask].unsqueeze(0)  # [1, N]
        accuracy = float((draws == truth).float().mean())
    ro = Rollout(tokens, inp, mask, draws, filled, keep, fill_logprobs(dist, draws).detach(), ref_logits, rewards,
                 None, None, accuracy)  # fmt: skip
    return (ro if cfg.advantage_scale == "batch" else grade(ro, cfg)), dist


def grpo_loss(dist: torch.Tensor, ro: Rollout, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to backpropagate for one micro-batch, from the policy's sampled-distribution logits
    ``dist`` [N, V] (the rollout's own on the first update, a new forward with ``keep=ro.keep``
    later), and the metrics.

    The tensor is :func:`alignment.pg.clipped_pg_loss`'s (ratio form: on the first update its value
    is −mean(A) + β·KL but its gradient is that of −E[logπ·A] + β·KL). The metrics ``loss``,
    ``pg_loss`` and ``kl_penalty`` report the seed's formula itself: ``pg_loss`` = −E[logπ(fill)·A]
    with logπ per masked character, ``kl_penalty`` = β·``mean_kl``, ``loss`` their sum."""
    if ro.advantages is None:
        raise ValueError(
            "the rollout has no advantages yet: advantage_scale 'batch' grades it with the "
            "generation batch's rewards first (grade(ro, cfg, generation_rewards(...)))"
        )
    b, k, t = ro.filled.shape
    logp = fill_logprobs(dist, ro.draws)  # [k, N]
    if cfg.kl_estimator == "exact":
        kl = exact_kl(dist, ro.ref_logits).unsqueeze(0).expand(k, -1)  # the same at every draw
    else:
        ref_logp = fill_logprobs(ro.ref_logits, ro.draws)
        # k3 under the nucleus subtracts π_ref(S), the reference's mass on the support sampled from
        mass = reference_mass(dist, ro.ref_logits) if cfg.kl_estimator == "k3" else None
        kl = per_token_kl(cfg.kl_estimator, logp=logp, ref_logp=ref_logp, ref_mass=mass)
    mask = ro.mask.unsqueeze(1).expand(b, k, t).reshape(b * k, t)

    def rows(values: torch.Tensor) -> torch.Tensor:  # [k, N] -> [B * k, T]
        return to_positions(values, ro.mask).reshape(b * k, t)

    out = clipped_pg_loss(rows(logp), rows(ro.old_logp), ro.advantages.reshape(b * k), mask,
                          cfg.clip_eps, cfg.clip_eps, agg="sequence", kl=rows(kl), beta=cfg.kl_beta)  # fmt: skip
    with torch.no_grad():
        per_fill_logp = rows(logp.detach()).sum(-1) / mask.sum(-1).clamp(min=1)
        per_fill_kl = rows(kl.detach()).sum(-1) / mask.sum(-1).clamp(min=1)
        # the seed's −E[logπ(fill)·A] as a value; the ratio surrogate optimised above has its gradient
        pg_value = float(-(per_fill_logp * ro.advantages.reshape(b * k)).mean())
    mean_kl = float(per_fill_kl.mean())
    metrics = {
        "loss": pg_value + cfg.kl_beta * mean_kl,
        "pg_loss": pg_value,
        "kl_penalty": cfg.kl_beta * mean_kl,
        "mean_reward": float(ro.rewards.mean()),
        "std_reward": float(ro.rewards.std()),
        "mean_advantage": float(ro.advantages.mean()),
        "mean_kl": mean_kl,
        "mean_log_prob": float(per_fill_logp.mean()),
        "zero_spread_fraction": ro.zero_spread_fraction,
        "fill_accuracy": ro.fill_accuracy,
        "clip_fraction": float(out.clip_fraction),
        "ratio_mean": float(out.ratio_mean),
    }
    return out.loss, metrics
