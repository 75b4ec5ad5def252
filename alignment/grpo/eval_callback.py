"""Greedy evaluation during GRPO: reward, cost, safe ratio and quadrant counts on the eval prompts.

Every rank takes part. Under DeepSpeed ZeRO-3 each rank holds a shard of every weight, so a
forward pass needs all ranks in its parameter all-gathers: a rank-0-only generation waits forever.
The model is therefore gathered exactly as TRL 1.16 gathers it for its own generation
(``unwrap_model_for_generation`` with ``ds3_gather_for_generation``, plus FSDP-1's
``summon_full_params``), and the eval prompts, cut into batches of ``batch_size``, are dealt out
to the ranks. Each batch is the one a single process would generate, so the answers do not depend
on the number of ranks; every rank runs the same number of ``generate`` calls (a rank short of a
batch repeats one and drops it), as ZeRO-3 without gathering needs. Rank 0 scores all answers in one
request, writes ``eval_results.jsonl`` and hands the summary to every rank, so all ranks log it.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object
from transformers import TrainerCallback
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation

from alignment.conversation import generate_answers
from alignment.data import repair_jsonl_tail
from alignment.scoring.client import ScorerClient, ScorerError
from alignment.scoring.quadrants import summarize

logger = logging.getLogger(__name__)


def _checkpointing_kwargs(args: Any) -> dict[str, Any]:
    """What TRL's own generation passes to ``unwrap_model_for_generation`` for gradient checkpointing:
    the argument exists from TRL 1.15 on (1.14, the last release for Python 3.10, has none)."""
    if "gradient_checkpointing_kwargs" in inspect.signature(unwrap_model_for_generation).parameters:
        return {"gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs}
    return {}


def deal_batches(num_batches: int, rank: int, world: int) -> list[int]:
    """The batch indices ``rank`` generates: every ``world``-th from ``rank``, topped up (with its
    last index, or 0) so that all ranks make ``ceil(num_batches / world)`` calls."""
    mine = list(range(rank, num_batches, world))
    rounds = -(-num_batches // world)
    return mine + [mine[-1] if mine else 0] * (rounds - len(mine)) if num_batches else []


class AlignmentEvalCallback(TrainerCallback):
    """Every ``every`` optimiser steps (and at the start and end), on all ranks: greedy answers, scored
    once as prompt + completion on rank 0, summarised, logged to the trainer's loggers and
    ``eval_results.jsonl``."""

    def __init__(
        self, client: ScorerClient, prompts: list[str], every: int, max_new_tokens: int, batch_size: int = 64
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
        self.client, self.prompts, self.every, self.max_new_tokens = client, prompts, every, max_new_tokens
        self.batch_size = batch_size
        self.trainer: Any = None
        self.history: list[dict[str, Any]] = []
        self.last_answers: list[str] = []  # of the latest evaluation, on every rank
        self.last_batches: list[int] = []  # batch indices this rank generated in it (repeats included)

    def bind(self, trainer: Any) -> None:
        self.trainer = trainer

    def _generate(self, batches: Sequence[Sequence[str]]) -> dict[int, list[str]]:
        trainer, acc = self.trainer, self.trainer.accelerator
        self.last_batches = deal_batches(len(batches), acc.process_index, acc.num_processes)
        out: dict[int, list[str]] = {}
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                acc,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                **_checkpointing_kwargs(trainer.args),
            ) as model,
            torch.no_grad(),
            DistributedBackend(acc).summon_full_params(trainer.model_wrapped, recurse=False),
        ):
            was_training = model.training
            model.eval()
            try:
                for i in self.last_batches:
                    out[i] = generate_answers(model, trainer.processing_class, list(batches[i]),
                                              self.max_new_tokens, batch_size=self.batch_size)  # fmt: skip
            finally:
                model.train(was_training)
        return out

    def evaluate(self, step: int) -> dict[str, Any]:
        """One evaluation; a collective: every rank must call it (the callbacks below do)."""
        trainer, acc = self.trainer, self.trainer.accelerator
        batches = [
            self.prompts[i : i + self.batch_size] for i in range(0, len(self.prompts), self.batch_size)
        ]
        try:
            mine, error = self._generate(batches), None
        except Exception as exc:  # tell the other ranks instead of leaving them in the gather
            mine, error = {}, f"rank {acc.process_index}: {type(exc).__name__}: {exc}"
            if acc.num_processes == 1:
                raise
        parts = gather_object([(mine, error)])
        errors = [e for _, e in parts if e]
        if errors:
            raise RuntimeError(f"GRPO evaluation failed at step {step}: {'; '.join(errors)}")
        by_batch = {i: answers for got, _ in parts for i, answers in got.items()}
        answers = [a for i in range(len(batches)) for a in by_batch[i]]
        summary, failure, scorer_down = None, None, False
        if acc.is_main_process:
            try:
                summary = self._score_and_write(step, answers)
            except Exception as exc:
                failure, scorer_down = f"{type(exc).__name__}: {exc}", isinstance(exc, ScorerError)
                if acc.num_processes == 1:
                    raise
        summary, failure, scorer_down = broadcast_object_list([summary, failure, scorer_down])
        if failure is not None:  # a scorer failure stops every rank the way train_grpo handles it
            kind = ScorerError if scorer_down else RuntimeError
            raise kind(f"GRPO evaluation at step {step}: scoring on rank 0 failed: {failure}")
        self.last_answers = answers
        self.history.append(summary)
        metrics = {"eval/reward_mean": summary["R_mean"], "eval/cost_mean": summary["C_mean"],
                   "eval/safe_ratio": summary["safe_ratio"]}  # fmt: skip
        metrics.update({f"eval/{k}": float(v) for k, v in summary["counts"].items()})
        trainer.log(metrics)
        return summary

    def _score_and_write(self, step: int, answers: list[str]) -> dict[str, Any]:
        scores = self.client.score(self.prompts, answers)
        summary = {"step": step, **summarize(scores.rewards, scores.costs)}
        out = Path(self.trainer.args.output_dir) / "eval_results.jsonl"
        repair_jsonl_tail(out)  # a line torn by a crash before a resume
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
        logger.info("step %d eval: R %.3f C %.3f safe %.1f%%", step, summary["R_mean"], summary["C_mean"],
                    summary["safe_ratio"])  # fmt: skip
        return summary

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.evaluate(0)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.evaluate(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.evaluate(state.global_step)
        return control
