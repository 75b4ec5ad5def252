"""Timing a GRPO run from the outside: the wall time of each optimiser step and the time spent in the
reward path during it (``bench/grpo_step.py`` and ``python -m alignment.doctor``).

    clock = StepClock()
    train_grpo(cfg, client=TimedScorer(ScorerClient(url), clock), callbacks=[clock])
    clock.steps  # [{"step_s": ..., "reward_s": ..., "reward_calls": 1}, ...]
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time of each optimiser step (on_step_begin to on_step_end: generation, reward, loss,
    backward, optimiser step) and the reward time inside it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._begin = 0.0
        self._reward_s = 0.0
        self._calls = 0

    def add_reward_time(self, seconds: float) -> None:
        self._reward_s += seconds
        self._calls += 1

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin, self._reward_s, self._calls = time.perf_counter(), 0.0, 0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step_s = time.perf_counter() - self._begin
        self.steps.append({"step_s": step_s, "reward_s": self._reward_s, "reward_calls": self._calls})
        return control


class TimedScorer:
    """Wraps what the reward function scores with (HTTP client or in-process scorer) and times it."""

    def __init__(self, inner: Any, clock: StepClock) -> None:
        self.inner, self.clock = inner, clock

    def score(self, prompts: list[str], responses: list[str]) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.score(prompts, responses)
        finally:
            self.clock.add_reward_time(time.perf_counter() - t0)
