"""Held-out evaluation of a fill-in policy against its judge and the ground truth, and readable samples.

:func:`evaluate` draws ``group_size`` fills per masked validation block exactly as GRPO samples
them (temperature, top-p, special tokens removed) and reports

    mean_reward            the judge's mean reward of those fills (what GRPO maximises)
    fill_accuracy          share of masked characters filled with the original (the ground truth)
    argmax_accuracy        the same for the most likely character at each position (no sampling)
    entropy                mean entropy (nats) of the sampled distribution per masked character
    judge_pair_agreement   how often the judge orders two fills of one block as their accuracy does
                           (:func:`.monitor.pair_agreement`; 0.5 = the judge cannot rank them)

The blocks, masks and draws come from generators seeded by ``eval_seed`` (default: ``seed``), the
same at every evaluation of a run, so two evaluations differ only by the policy.
"""

from __future__ import annotations

import torch
from torch import nn

from alignment.char_diffusion import runtime as rt_
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.data import CharData, Vocab
from alignment.char_diffusion.grpo import Rollout
from alignment.char_diffusion.judge import judge_rewards
from alignment.char_diffusion.masking import masked_blocks
from alignment.char_diffusion.monitor import fill_accuracies, pair_agreement
from alignment.char_diffusion.sampling import draw_fills, fill_distribution, place_fills


def _entropy(dist: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(dist) per row, dist [N, V] with −inf outside the support -> [N]."""
    logp = torch.log_softmax(dist, dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


@torch.no_grad()
def evaluate(
    policy: nn.Module, judge: nn.Module, data: CharData, cfg: GRPOConfig, rt: rt_.Runtime
) -> dict[str, float]:
    """The held-out figures above over ``eval_iters`` batches of ``eval_batch_size`` blocks."""
    seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
    rewards, agree = [], []
    sums = {"correct": 0.0, "argmax": 0.0, "entropy": 0.0, "positions": 0, "draws": 0, "pairs": 0}
    for i in range(cfg.eval_iters):
        tokens, inp, mask = (t.to(rt.device) for t in masked_blocks(
            data, "val", cfg.eval_batch_size, cfg, rt_.slot_generator(seed, -1, i, "eval")))  # fmt: skip
        with rt.autocast():
            dist, _ = fill_distribution(
                policy(inp).float(), mask, cfg.temperature, cfg.top_p, data.vocab.special_ids
            )
            draws = draw_fills(dist, cfg.group_size, rt_.slot_generator(seed, -1, i, "eval-fills", rt.device))
            filled = place_fills(inp, mask, draws)
            reward = judge_rewards(judge, filled, inp, mask)  # [B, k]
        truth = tokens[mask]
        acc = fill_accuracies(draws, tokens, mask)  # [B, k]
        share, pairs = pair_agreement(reward, acc)
        if pairs:
            agree.append(share * pairs)
        rewards.append(reward.flatten())
        sums["correct"] += float((draws == truth.unsqueeze(0)).sum())
        sums["argmax"] += float((dist.argmax(-1) == truth).sum())
        sums["entropy"] += float(_entropy(dist).sum())
        sums["positions"] += int(truth.numel())
        sums["draws"] += int(draws.numel())
        sums["pairs"] += pairs
    out = {
        "mean_reward": float(torch.cat(rewards).mean()),
        "fill_accuracy": sums["correct"] / sums["draws"],
        "argmax_accuracy": sums["argmax"] / sums["positions"],
        "entropy": sums["entropy"] / sums["positions"],
    }
    if sums["pairs"]:  # absent (not NaN) when no two fills of a block differed in accuracy
        out["judge_pair_agreement"] = sum(agree) / sums["pairs"]
    return out


def format_samples(vocab: Vocab, ro: Rollout, iteration: int, row: int = 0) -> str:
    """The masked input, the original and the k fills of one input, best reward first."""
    mask = ro.mask[row]
    lines = [f"iteration {iteration}", f"original  {vocab.decode(ro.tokens[row], readable=True)}",
             f"masked    {vocab.decode(ro.inp[row], readable=True)}"]  # fmt: skip
    order = ro.rewards[row].argsort(descending=True).tolist()
    for j in order:
        fill = ro.filled[row, j]
        right = int((fill[mask] == ro.tokens[row][mask]).sum())
        lines.append(
            f"r={float(ro.rewards[row, j]):.3f} {right:3d}/{int(mask.sum())}  {vocab.decode(fill, readable=True)}"
        )
    return "\n".join(lines) + "\n"
