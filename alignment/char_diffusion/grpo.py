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
position: value and gradient of KL(π‖π_ref). ``"k3"`` is TRL's sampled estimator: its value
estimates KL(π‖π_ref), its gradient is that of KL(π_ref‖π); see :mod:`alignment.pg.kl`.

Shapes: B inputs of T characters, k = group size, N masked positions in the batch, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from alignment.pg import clipped_pg_loss, exact_kl, group_advantages, per_token_kl, sampling_logits


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
    advantages: torch.Tensor  # [B, k]
    zero_spread_fraction: float
    fill_accuracy: float  # share of masked characters equal to the original, over all fills


def rescore(policy: nn.Module, ro: Rollout, cfg: GRPOConfig, banned: tuple[int, ...]) -> torch.Tensor:
    """A later inner epoch: one new policy forward, restricted to the support that was sampled
    from -> logits [N, V] with grad."""
    dist, _ = fill_distribution(policy(ro.inp).float(), ro.mask, cfg.temperature, cfg.top_p, banned, ro.keep)
    return dist


def rollout(policy: nn.Module, reference: nn.Module, judge: nn.Module, tokens: torch.Tensor, inp: torch.Tensor,
            mask: torch.Tensor, cfg: GRPOConfig, banned: tuple[int, ...],
            rng: torch.Generator | None = None) -> tuple[Rollout, torch.Tensor]:  # fmt: skip
    """Sample ``group_size`` fills per input from ONE policy forward; score them.

    Returns the rollout and the policy's sampled-distribution logits [N, V] with their graph, so
    the first update needs no second forward.
    """
    logits = policy(inp).float()  # [B, T, V]: the one forward of this micro-batch
    dist, keep = fill_distribution(logits, mask, cfg.temperature, cfg.top_p, banned)
    draws = draw_fills(dist, cfg.group_size, rng)  # [k, N]
    with torch.no_grad():
        ref_logits, _ = sampling_logits(reference(inp).float()[mask], cfg.temperature, 1.0, banned)
        filled = place_fills(inp, mask, draws)  # [B, k, T]
        rewards = judge_rewards(judge, filled, inp, mask).float()
        adv = group_advantages(rewards, cfg.advantage_scale, cfg.advantage_eps, cfg.advantage_baseline)
        truth = tokens[mask].unsqueeze(0)  # [1, N]
        accuracy = float((draws == truth).float().mean())
    ro = Rollout(tokens, inp, mask, draws, filled, keep, fill_logprobs(dist, draws).detach(), ref_logits, rewards,
                 adv.advantages, adv.zero_spread_fraction, accuracy)  # fmt: skip
    return ro, dist


def grpo_loss(dist: torch.Tensor, ro: Rollout, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to backpropagate for one micro-batch, from the policy's sampled-distribution logits
    ``dist`` [N, V] (the rollout's own on the first update, a new forward with ``keep=ro.keep``
    later), and the metrics.

    The tensor is :func:`alignment.pg.clipped_pg_loss`'s (ratio form: on the first update its value
    is −mean(A) + β·KL but its gradient is that of −E[logπ·A] + β·KL). The metrics ``loss``,
    ``pg_loss`` and ``kl_penalty`` report the seed's formula itself: ``pg_loss`` = −E[logπ(fill)·A]
    with logπ per masked character, ``kl_penalty`` = β·``mean_kl``, ``loss`` their sum."""
    b, k, t = ro.filled.shape
    logp = fill_logprobs(dist, ro.draws)  # [k, N]
    if cfg.kl_estimator == "exact":
        kl = exact_kl(dist, ro.ref_logits).unsqueeze(0).expand(k, -1)  # the same at every draw
    else:
        ref_logp = fill_logprobs(ro.ref_logits, ro.draws)
        kl = per_token_kl(cfg.kl_estimator, logp=logp, ref_logp=ref_logp)
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
