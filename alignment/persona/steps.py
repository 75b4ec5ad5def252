"""One training step of each kind on a batch of rows and their retrieved passages.

``model`` is the reader as trained (possibly wrapped in DistributedDataParallel: every forward
with gradients goes through it), ``pipe.reader`` the same weights unwrapped, for sampling and the
no-gradient passes. RL steps run the reader in eval mode: without dropout, the distribution the
losses differentiate is exactly the one that was sampled. Each step returns floats to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignment.distributed import DistInfo, gather_objects
from alignment.persona.data import DialogueExample, Passage
from alignment.persona.pipeline import Pipeline
from alignment.persona.reader import sft_loss
from alignment.persona.reward import mean_components
from alignment.persona.rl import (
    GRPOSettings,
    distillation_loss,
    grpo_advantages,
    grpo_objective,
    reinforce_objective,
)
from alignment.persona.sampler import (
    Samples,
    reference_logits,
    response_logprobs,
    sample_responses,
    sampled_logits,
)


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]
    clip: float = 1.0

    def update(self, loss: torch.Tensor) -> float:
        """Backpropagate ``loss``, clip, step; returns the gradient norm before clipping. A non-finite
        loss or gradient stops training before it reaches the weights."""
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"the loss is {float(loss.detach())}; the weights were not updated")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.params if p.grad is not None])
            )
        if not torch.isfinite(norm):
            raise FloatingPointError(f"the gradient norm is {float(norm)}; the weights were not updated")
        self.optimizer.step()
        return float(norm)


def _reward_stats(prefix: str, scores) -> dict[str, float]:
    return {
        f"{prefix}/{'reward' if k == 'reward' else 'reward_' + k}": v
        for k, v in mean_components(scores).items()
    }


def sft_step(
    pipe: Pipeline, model: nn.Module, examples: Sequence[DialogueExample], passages: Sequence[Sequence[Passage]],
    targets: Sequence[str], optim: Optim,
) -> dict[str, float]:  # fmt: skip
    """Teacher forcing on ``targets`` (one gold answer per row)."""
    ids, mask = pipe.reader_inputs(examples, passages)
    tokens, tmask = pipe.targets(targets)
    loss = sft_loss(model(ids, mask, tokens), tokens, tmask)
    return {"train/loss": float(loss.detach()), "train/grad_norm": optim.update(loss)}


def _sample(pipe: Pipeline, ids: torch.Tensor, mask: torch.Tensor, group: int, generator) -> Samples:
    cfg = pipe.cfg
    with torch.no_grad():
        encoded = pipe.reader.encode(ids, mask)
    return sample_responses(pipe.reader, encoded, group, cfg.generation_max_length, cfg.sampling_temperature,
                            cfg.sampling_top_p, pipe.banned, generator)  # fmt: skip


def _dist(pipe: Pipeline, logits: torch.Tensor, samples: Samples) -> torch.Tensor:
    return sampled_logits(
        logits, samples, pipe.cfg.sampling_temperature, pipe.cfg.sampling_top_p, pipe.banned
    )


def _sample_stats(samples: Samples, logp: torch.Tensor) -> dict[str, float]:
    """Response length, and how far the loss's log-probs are from the sampler's (float noise only)."""
    gap = (logp.detach() - samples.logprobs).abs().masked_fill(~samples.mask, 0).max()
    return {
        "train/response_tokens": float(samples.mask.sum(1).float().mean()),
        "train/logprob_gap": float(gap),
    }


def reinforce_step(
    pipe: Pipeline, model: nn.Module, examples: Sequence[DialogueExample], passages: Sequence[Sequence[Passage]],
    optim: Optim, generator: torch.Generator,
) -> dict[str, float]:  # fmt: skip
    """One sampled response per row; loss −mean((R − b)·log π(y))."""
    ids, mask = pipe.reader_inputs(examples, passages)
    samples = _sample(pipe, ids, mask, 1, generator)
    scores = pipe.score(pipe.decode(samples.tokens), examples)
    rewards = torch.tensor([s.reward for s in scores], device=ids.device)
    logp = response_logprobs(_dist(pipe, model(ids, mask, samples.tokens), samples), samples)
    result = reinforce_objective(logp, samples.mask, rewards, pipe.cfg.reinforce_baseline)
    stats = {"train/loss": float(result.loss.detach()), "train/baseline": float(result.baseline.mean()),
             "train/seq_logprob": float(result.seq_logprob.mean()), **_reward_stats("train", scores),
             **_sample_stats(samples, logp)}  # fmt: skip
    stats["train/grad_norm"] = optim.update(result.loss)
    return stats


def generation_rewards(rewards: torch.Tensor, dist: DistInfo | None) -> torch.Tensor:
    """Every rank's rewards [B·G] of this step, in rank order: the generation batch whose std
    ``grpo_scale_rewards: batch`` divides by (as TRL gathers them from all processes). Floats are
    gathered as Python floats, which hold a float32 exactly."""
    if dist is None or not dist.enabled:
        return rewards
    gathered = gather_objects(dist, rewards.tolist())
    return torch.tensor([r for rank in gathered for r in rank], dtype=rewards.dtype, device=rewards.device)


def grpo_step(
    pipe: Pipeline, model: nn.Module, reference: nn.Module, examples: Sequence[DialogueExample],
    passages: Sequence[Sequence[Passage]], optim: Optim, generator: torch.Generator, settings: GRPOSettings,
    group_size: int, inner_epochs: int, dist: DistInfo | None = None,
) -> dict[str, float]:  # fmt: skip
    """G sampled responses per row, group advantages, ``inner_epochs`` clipped updates with β·KL
    to the reference (at the sampling temperature, without the nucleus). ``dist``: the run's
    processes, for ``batch``-scaled advantages over all of them."""
    ids, mask = pipe.reader_inputs(examples, passages)
    samples = _sample(pipe, ids, mask, group_size, generator)
    scores = pipe.score(pipe.decode(samples.tokens), examples, repeats=group_size)
    rewards = torch.tensor([s.reward for s in scores], device=ids.device)
    batch = generation_rewards(rewards, dist) if settings.scale_rewards == "batch" else None
    advantages, zero_spread = grpo_advantages(rewards, group_size, settings.scale_rewards, batch)
    with torch.no_grad():
        ref_logits = reference(ids, mask, samples.tokens, repeats=group_size)
        ref_dist = reference_logits(ref_logits, pipe.cfg.sampling_temperature, pipe.banned)
    stats = {**_reward_stats("train", scores), "train/zero_spread_groups": zero_spread,
             "train/reward_group_std": float(rewards.view(-1, group_size).std(dim=1).mean())}  # fmt: skip
    old_logp = None  # the first inner epoch's own log-probs: the weights that sampled
    for epoch in range(inner_epochs):
        dist = _dist(pipe, model(ids, mask, samples.tokens, repeats=group_size), samples)
        out, logp = grpo_objective(
            dist, ref_dist, samples.tokens, samples.mask, old_logp, advantages, settings
        )
        norm = optim.update(out.loss)
        if epoch == 0:
            old_logp = logp
            stats.update(_sample_stats(samples, logp))
            stats.update({"train/loss": float(out.loss.detach()), "train/pg_loss": float(out.pg_loss),
                          "train/kl": float(out.kl), "train/grad_norm": norm})  # fmt: skip
        stats.update({f"train/ratio_mean_epoch{epoch + 1}": float(out.ratio_mean),
                      f"train/clip_fraction_epoch{epoch + 1}": float(out.clip_fraction)})  # fmt: skip
    return stats


def distill_step(
    pipe: Pipeline, retriever_model: nn.Module, examples: Sequence[DialogueExample],
    passages: Sequence[Sequence[Passage]], optim: Optim,
) -> dict[str, float]:  # fmt: skip
    """The retriever's distribution over the K retrieved passages toward softmax(reward / τ_gold)."""
    rewards, scores = pipe.passage_rewards(examples, passages)
    enc = pipe.retriever_inputs(examples, passages)
    logits = retriever_model(enc["input_ids"], enc["attention_mask"], num_queries=len(examples))
    loss = distillation_loss(logits, rewards, pipe.cfg.temperature_score, pipe.cfg.temperature_gold)
    agree = (logits.detach().argmax(1) == rewards.argmax(1)).float().mean()
    return {
        "train/retriever_loss": float(loss.detach()),
        "train/passage_reward": float(rewards.mean()),
        "train/passage_reward_best": float(rewards.max(1).values.mean()),
        "train/retriever_top1_is_best": float(agree),
        "train/retriever_grad_norm": optim.update(loss),
        **{k.replace("train/", "train/passage_"): v for k, v in _reward_stats("train", scores).items()
           if k != "train/reward"},
    }  # fmt: skip
