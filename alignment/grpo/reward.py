"""GRPO reward R − λ·C from the scorer service, with λ moved once per optimiser step on all ranks.

    link = LagrangeLink.create(LagrangeController(cfg.lagrange_config()))
    reward = ScorerReward(ScorerClient("auto"), link, prompt_key="prompt")
    trainer = GRPOTrainer(..., reward_funcs=[reward], callbacks=[LagrangeCallback(link.key)])

:class:`ScorerReward` follows TRL's reward-function protocol ``(prompts, completions, **columns)
-> list[float]``. It scores the raw prompt from the dataset column (never a prompt recovered from
the templated text) with the completion cut at the next turn marker, and records the costs it saw.
:class:`LagrangeCallback` gathers those costs from all ranks (in rank order) at the end of every
optimiser step and updates λ exactly once with them, so every rank uses the same λ (and the same
episode window, when ``episode_cost_window_size`` is set); its state travels with TRL checkpoints
(``ExportableState``; set ``restore_callback_states_from_checkpoint=True``).

Trainer callbacks restored from a checkpoint are rebuilt from JSON arguments, so the reward and the
callback meet through a process-local registry keyed by ``LagrangeLink.key``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from alignment.conversation import truncate_at_stop
from alignment.lagrange import LagrangeController
from alignment.scoring.client import ScorerClient, ScorerError

logger = logging.getLogger(__name__)

_LINKS: dict[str, LagrangeLink] = {}


@dataclass
class LagrangeLink:
    """The controller and the costs seen since the last optimiser step, shared by reward and callback."""

    key: str
    controller: LagrangeController
    costs: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, controller: LagrangeController, key: str = "lagrange") -> LagrangeLink:
        link = cls(key, controller)
        _LINKS[key] = link
        return link

    @classmethod
    def get(cls, key: str) -> LagrangeLink:
        try:
            return _LINKS[key]
        except KeyError:
            raise KeyError(f"no LagrangeLink {key!r} in this process; create it before the trainer") from None

    def add_costs(self, costs: Sequence[float]) -> None:
        with self.lock:
            self.costs.extend(float(c) for c in costs)

    def take(self) -> list[float]:
        with self.lock:
            out, self.costs = self.costs, []
        return out


def gather_costs(local: list[float]) -> list[float]:
    """The costs of all ranks, rank 0's first (every rank gets the same list); local without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(local)
    parts: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(local))
    return [c for part in parts for c in (part or [])]


class LagrangeCallback(TrainerCallback, ExportableState):
    """Updates λ at the end of each optimiser step from the all-reduced mean cost of that step."""

    def __init__(self, key: str = "lagrange") -> None:
        self.key = key
        self.lagrange_state: dict[str, Any] | None = None  # set when restored from a checkpoint
        self.applied_restore = False

    @property
    def link(self) -> LagrangeLink:
        return LagrangeLink.get(self.key)

    def on_step_begin(self, args, state, control, **kwargs):
        # a callback restored from a checkpoint carries λ's state; hand it to the live controller
        if self.lagrange_state is not None and not self.applied_restore:
            self.link.controller.load_state_dict(self.lagrange_state)
            self.applied_restore = True
            logger.info("restored λ=%.5f from the checkpoint", self.link.controller.value)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        costs = gather_costs(self.link.take())
        if costs:  # steps that reuse an earlier generation batch saw no new costs
            self.link.controller.update_costs(costs)
        if dist.is_available() and dist.is_initialized():  # each rank's own λ, to compare in the job log
            step = getattr(state, "global_step", None)
            logger.info("step %s: λ=%.12g (rank %d of %d)", step, self.link.controller.value,
                        dist.get_rank(), dist.get_world_size())  # fmt: skip
        self.lagrange_state = self.link.controller.state_dict()
        self.applied_restore = True
        return control

    def state(self) -> dict:
        return {
            "args": {"key": self.key},
            "attributes": {"lagrange_state": self.link.controller.state_dict(), "applied_restore": False},
        }


def agree_on_failure(failure: ScorerError | None) -> ScorerError | None:
    """The scorer failure of any rank, on every rank (a collective: all ranks call it at the same
    point), so that all ranks stop together instead of the others waiting in TRL's reward gather."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    seen: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, None if failure is None else str(failure))
    if failure is not None:
        return failure
    rank, message = next(((r, m) for r, m in enumerate(seen) if m is not None), (None, None))
    return None if message is None else ScorerError(f"the scorer failed on rank {rank}: {message}")


def _text(completion: Any) -> str:
    """A completion as TRL passes it: plain text, or a conversation whose last message is the answer."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


class ScorerReward:
    """TRL reward function: R − λ·C for each (raw prompt, completion) from the scorer service."""

    def __init__(self, client: ScorerClient, link: LagrangeLink, prompt_key: str = "prompt") -> None:
        self.client, self.link, self.prompt_key = client, link, prompt_key
        self.__name__ = "scorer_reward"  # TRL names the reward's metrics after it

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        log_metric: Callable[[str, float], None] | None = None,
        **columns: Any,
    ) -> list[float]:
        raw = columns.get(self.prompt_key)
        if raw is None:
            raise KeyError(
                f"the dataset has no column {self.prompt_key!r}: the reward scores the raw prompt from it "
                f"(columns given: {sorted(k for k in columns if k not in ('trainer_state', 'log_extra'))})"
            )
        responses = [truncate_at_stop(_text(c)) for c in completions]
        try:
            scores, failure = self.client.score(list(raw), responses), None
        except ScorerError as exc:  # stops training loudly, on every rank (train_grpo saves the steps)
            scores, failure = None, exc
        failure = agree_on_failure(failure)
        if failure is not None:
            raise failure
        assert scores is not None
        self.link.add_costs(scores.costs)
        lam = self.link.controller.value
        if log_metric is not None:
            n = len(scores.rewards)
            r_mean, c_mean = sum(scores.rewards) / n, sum(scores.costs) / n
            log_metric("scorer/reward_mean", r_mean)
            log_metric("scorer/cost_mean", c_mean)
            log_metric("scorer/reward_std", _std(scores.rewards, r_mean))
            log_metric("scorer/cost_std", _std(scores.costs, c_mean))
            log_metric("scorer/safe_ratio", sum(c <= 0 for c in scores.costs) / n)
            stats = self.link.controller.last_stats()
            log_metric("lambda/value", lam)
            if not math.isnan(stats["jc"]):
                log_metric("lambda/jc", stats["jc"])
                log_metric("lambda/jc_ema", stats["jc_ema"])
        return [r - lam * c for r, c in zip(scores.rewards, scores.costs, strict=True)]


def _std(values: Sequence[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan
