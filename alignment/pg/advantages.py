"""Group-relative advantages (GRPO) and leave-one-out baselines (RLOO).

Semantics follow TRL 1.16's ``GRPOTrainer`` so that every trainer of this project means the same
thing by "advantage": subtract the group's mean reward, then optionally divide by a standard
deviation (unbiased, as TRL's ``nanstd``) plus ``eps``, the guard that keeps a group whose
rewards are all equal at advantage 0 instead of 0/0. With ``scale="batch"`` that deviation is the
one of the whole *generation batch*, as TRL takes it after gathering the rewards of every process:
all ranks and all gradient-accumulation micro-batches whose samples were drawn by the same weights.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Scale = Literal["group", "batch", "none"]
Baseline = Literal["mean", "leave_one_out"]


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor  # [B, G]
    zero_spread_fraction: float  # share of the B groups whose G rewards are all (close to) equal


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """For each entry, the mean of the *other* entries along the last dimension.

    rewards: [..., N] with N ≥ 2 -> [..., N]. Unlike the plain mean, this baseline does not depend
    on the sample it is subtracted from, so the policy-gradient estimate stays unbiased.
    """
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per group, got {n}")
    return (rewards.sum(dim=-1, keepdim=True) - rewards) / (n - 1)


def group_advantages(
    rewards: torch.Tensor,
    scale: Scale = "group",
    eps: float = 1e-4,
    baseline: Baseline = "mean",
    batch_rewards: torch.Tensor | None = None,
) -> GroupAdvantages:
    """Advantages of G sampled answers to each of B inputs.

    rewards: [B, G] (row b holds the G rewards of input b's group).
    scale: "group" divides by each group's std (TRL's default), "batch" by the std of every reward
        of the generation batch (the group mean is still subtracted, as TRL does), "none" leaves
        them unscaled (Dr. GRPO).
    batch_rewards: for "batch", all rewards of the generation batch, any shape: every rank's, every
        micro-batch's (TRL gathers them from all processes before taking the std). None: ``rewards``
        is the whole generation batch. The caller gathers them (this module runs no collectives);
        for bit-equal results across layouts, gather in one fixed order.
    baseline: "mean" subtracts the group mean (GRPO), "leave_one_out" the mean of the group's
        other G − 1 rewards (RLOO; equals the mean baseline times G/(G − 1)).
    Returns advantages [B, G] and the fraction of groups with zero spread (they carry no signal).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; a failed reward must fail the step, not enter it")
    rewards = rewards.float()
    n_groups, group_size = rewards.shape
    if baseline == "mean":
        centred = rewards - rewards.mean(dim=1, keepdim=True)
    elif baseline == "leave_one_out":
        centred = rewards - leave_one_out_baseline(rewards)
    else:
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
    group_std = rewards.std(dim=1, keepdim=True) if group_size > 1 else rewards.new_zeros(n_groups, 1)
    if scale == "group":
        advantages = centred / (group_std + eps)
    elif scale == "batch":
        everything = rewards if batch_rewards is None else batch_rewards.float()
        if everything.numel() < rewards.numel() or not torch.isfinite(everything).all():
            raise ValueError(
                f"batch_rewards ({everything.numel()}) must be the whole generation batch, these "
                f"{rewards.numel()} rewards included, all finite"
            )
        # one flat reduction whatever the layout (one process's [B, G], gathered [ranks·B·G])
        batch_std = everything.reshape(-1).std() if everything.numel() > 1 else rewards.new_zeros(())
        advantages = centred / (batch_std + eps)
    elif scale == "none":
        advantages = centred
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if batch_rewards is not None and scale != "batch":
        raise ValueError(f"batch_rewards only apply with scale 'batch', not {scale!r}")
    zero = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()
    return GroupAdvantages(advantages, zero)
