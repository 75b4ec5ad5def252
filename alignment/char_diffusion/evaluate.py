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

    python -m alignment.char_diffusion.evaluate --config alignment/char_diffusion/cpu/grpo.yaml \
        --dataset D --judge_checkpoint J --policy GEN.pt GRPO.pt --temperature 0.8 0.5
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from alignment import cli
from alignment.char_diffusion import runtime as rt_
from alignment.char_diffusion.checkpoint import load_model
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.data import CharData, Vocab, check_same_vocab
from alignment.char_diffusion.grpo import Rollout
from alignment.char_diffusion.judge import judge_rewards
from alignment.char_diffusion.masking import masked_blocks
from alignment.char_diffusion.monitor import fill_accuracies, pair_agreement
from alignment.char_diffusion.sampling import draw_fills, fill_distribution, place_fills
from alignment.config import load_config

FIGURES = ("mean_reward", "fill_accuracy", "argmax_accuracy", "entropy", "judge_pair_agreement")


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


def main(argv: list[str] | None = None) -> int:
    """``python -m alignment.char_diffusion.evaluate``: the held-out figures of generator checkpoints
    (a pretrained generator, a GRPO ``ckpt.pt`` or ``best/ckpt.pt``) against a judge, at one or more
    sampling temperatures; the other settings (masks, eval blocks, group size, top-p) from a GRPO
    YAML. Lowering the temperature of the pretrained generator is the baseline GRPO has to beat."""
    p = cli.parser(main.__doc__)
    p.add_argument("--config", required=True, help="GRPO YAML whose masks and eval settings to use")
    p.add_argument("--policy", nargs="+", required=True, help="generator checkpoints to evaluate")
    p.add_argument("--judge_checkpoint", help="judge (default: the YAML's)")
    p.add_argument("--dataset", help="prepared data folder (default: the YAML's)")
    p.add_argument("--temperature", type=float, nargs="+", help="sampling temperatures (default: the YAML's)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("judge_checkpoint", a.judge_checkpoint), ("dataset", a.dataset)) if v}
    cfg = load_config(GRPOConfig, a.config, overrides)
    data = CharData(cfg.dataset)
    judge, judge_vocab, _ = load_model(cfg.judge_checkpoint, "judge", "judge_checkpoint")
    check_same_vocab(judge_vocab, cfg.judge_checkpoint, data.vocab, str(data.meta_path))
    rt = rt_.setup_runtime(cfg)
    judge.to(rt.device).eval()
    width = max(len("policy"), *(len(p) for p in a.policy))
    print(f"{'policy':{width}} {'T':>5} " + " ".join(f"{k:>20}" for k in FIGURES))
    for path in a.policy:
        policy, vocab, _ = load_model(path, "generator", "policy")
        check_same_vocab(vocab, path, data.vocab, str(data.meta_path))
        policy.to(rt.device).eval()
        for t in a.temperature or [cfg.temperature]:
            ev = evaluate(policy, judge, data, replace(cfg, temperature=t), rt)
            figures = " ".join(f"{ev.get(k, float('nan')):20.4f}" for k in FIGURES)
            print(f"{path:{width}} {t:5.2f} {figures}")
    return 0


if __name__ == "__main__":
    cli.run(main)
