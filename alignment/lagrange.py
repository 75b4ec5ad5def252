"""The one adaptive Lagrange multiplier (λ) controller shared by the ES and GRPO trainers.

Both trainers solve ``max E[R] - λ·E[C]`` subject to ``E[C] <= threshold`` (R reward, C cost; a
response is safe iff C <= 0). Keeping a single controller means both trainers move λ identically, so
their runs are comparable and a fix to the rule lands in both at once.

Sign convention (the one our recipes use): ``J_C = mean(C) + d`` with ``d = cost_threshold_d``, so
``d = -0.1`` encodes the constraint ``E[C] <= 0.1``. ``J_C > 0`` means the constraint is violated and
λ must rise; ``J_C < 0`` means there is slack and λ may fall. With ``lambda_pos_cost_only`` J_C is
clipped to ``max(J_C, 0)`` so λ never falls (it only reacts to violations).

Rules (λ lives in log space so it stays positive and moves multiplicatively):

* ``ema_log`` (seed rule): ``ema <- β·ema + (1-β)·J_C``; ``ln λ <- ln λ + lr·ema``. The first update
  sets ``ema = J_C`` instead of starting from 0, because a zero start would bias early steps toward
  "no violation" and delay the reaction to an unsafe initial policy.
* ``ppo_lag`` (safe-rlhf PPO-Lagrangian, SGD on ln λ): ``ln λ <- ln λ + lr·λ·J_C``; no EMA.

After either rule λ is clipped to ``[lambda_min, lambda_max]``. With ``lambda_adapt=False`` the
controller still records J_C and its EMA (for logging) but λ stays at ``lambda_init``.

Distributed GRPO: the controller is process-local and deterministic. The caller must all-reduce the
mean cost across ranks *before* ``update`` and call ``update`` exactly once per optimiser step; then
identical inputs on every rank give bit-identical λ without any communication here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from alignment.config import finite_number

logger = logging.getLogger(__name__)

Rule = Literal["ema_log", "ppo_lag"]
_RULES: tuple[str, ...] = ("ema_log", "ppo_lag")


@dataclass
class LagrangeConfig:
    """Hyper-parameters of the λ controller; ``lambda_init`` is what recipes call ``lambda_cost``."""

    lambda_init: float = 1.0
    lambda_adapt: bool = False
    rule: Rule = "ema_log"
    cost_threshold_d: float = 0.0
    lambda_lr: float = 0.005
    lambda_min: float = 1e-4
    lambda_max: float = 5.0
    jc_ema_beta: float = 0.9
    lambda_pos_cost_only: bool = False

    def __post_init__(self) -> None:
        """Reject configs that would make λ undefined (log of <= 0) or silently diverge."""
        for name in (
            "lambda_init",
            "cost_threshold_d",
            "lambda_lr",
            "lambda_min",
            "lambda_max",
            "jc_ema_beta",
        ):
            finite_number(getattr(self, name), name)
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {self.rule!r}")
        if not self.lambda_min > 0:
            raise ValueError(f"lambda_min must be > 0 (λ is kept in log space), got {self.lambda_min}")
        if self.lambda_min > self.lambda_max:
            raise ValueError(
                f"lambda_min must be <= lambda_max, got lambda_min={self.lambda_min}, lambda_max={self.lambda_max}"
            )
        if not self.lambda_min <= self.lambda_init <= self.lambda_max:
            raise ValueError(
                f"lambda_init must be within [lambda_min, lambda_max] = [{self.lambda_min}, {self.lambda_max}],"
                f" got {self.lambda_init}"
            )
        if not 0 <= self.jc_ema_beta < 1:
            raise ValueError(f"jc_ema_beta must satisfy 0 <= jc_ema_beta < 1, got {self.jc_ema_beta}")
        if self.lambda_lr < 0:
            raise ValueError(f"lambda_lr must be >= 0, got {self.lambda_lr}")


class LagrangeController:
    """Holds ln λ and the J_C EMA; one ``update`` per optimiser step with the (global) mean cost."""

    def __init__(self, config: LagrangeConfig | None = None) -> None:
        self.config = config if config is not None else LagrangeConfig()
        self._log_lambda: float = math.log(self.config.lambda_init)
        self._jc_ema: float | None = None
        self._steps: int = 0
        self._last_jc: float = math.nan
        self._last_mean_cost: float = math.nan

    @property
    def value(self) -> float:
        """Current λ; exactly the bound when clipped (exp(log(b)) can round to just below b)."""
        cfg = self.config
        if self._log_lambda >= math.log(cfg.lambda_max):
            return cfg.lambda_max
        if self._log_lambda <= math.log(cfg.lambda_min):
            return cfg.lambda_min
        return min(max(math.exp(self._log_lambda), cfg.lambda_min), cfg.lambda_max)

    def _clip_log(self, log_lambda: float) -> float:
        """Clip ln λ to [ln lambda_min, ln lambda_max]; comparing logs avoids exp overflow."""
        return min(max(log_lambda, math.log(self.config.lambda_min)), math.log(self.config.lambda_max))

    def update(self, mean_cost: float) -> float:
        """Advance one step with the batch mean cost; returns the new λ.

        A NaN/inf cost raises instead of being absorbed: it would poison the EMA (or ln λ) forever
        and the run would keep training with a meaningless penalty.
        """
        mean_cost = float(mean_cost)
        if not math.isfinite(mean_cost):
            raise ValueError(f"mean_cost must be finite, got {mean_cost!r}")
        cfg = self.config
        jc = mean_cost + cfg.cost_threshold_d
        if cfg.lambda_pos_cost_only:
            jc = max(jc, 0.0)
        if self._jc_ema is None:
            self._jc_ema = jc
        else:
            self._jc_ema = cfg.jc_ema_beta * self._jc_ema + (1.0 - cfg.jc_ema_beta) * jc
        if cfg.lambda_adapt:
            # ppo_lag scales by λ: the gradient of λ·J_C w.r.t. ln λ, as in safe-rlhf.
            step = cfg.lambda_lr * (self._jc_ema if cfg.rule == "ema_log" else self.value * jc)
            self._log_lambda = self._clip_log(self._log_lambda + step)
        self._steps += 1
        self._last_jc = jc
        self._last_mean_cost = mean_cost
        return self.value

    def penalised(self, reward: float, cost: float) -> float:
        """The scalar the policy maximises: ``reward - λ·cost``."""
        return reward - self.value * cost

    def penalise(self, rewards: Sequence[float], costs: Sequence[float]) -> list[float]:
        """Vectorised ``penalised`` with one λ for the whole batch (so a batch sees a consistent λ)."""
        if len(rewards) != len(costs):
            raise ValueError(
                f"rewards and costs must have the same length, got {len(rewards)} and {len(costs)}"
            )
        lam = self.value
        return [float(r) - lam * float(c) for r, c in zip(rewards, costs, strict=True)]

    def last_stats(self) -> dict[str, float]:
        """Flat floats for the trackers; NaN before the first update so plots show a gap, not a fake 0."""
        return {
            "lambda": self.value,
            "jc": self._last_jc,
            "jc_ema": math.nan if self._jc_ema is None else self._jc_ema,
            "mean_cost": self._last_mean_cost,
            "steps": float(self._steps),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; ln λ (not λ) is saved so resume is bit-identical."""
        return {
            "log_lambda": self._log_lambda,
            "jc_ema": self._jc_ema,
            "steps": self._steps,
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore λ, EMA and step count exactly; the current config's hyper-parameters are kept.

        A different rule is an error: ln λ and the EMA mean different things under the two rules, so
        continuing would be a silent change of algorithm. Other differences (e.g. a new lambda_lr on
        resume) are allowed deliberately but logged.
        """
        missing = [k for k in ("log_lambda", "jc_ema", "steps") if k not in state]
        if missing:
            raise ValueError(f"Lagrange state is missing keys {missing}")
        saved_cfg = dict(state.get("config") or {})
        saved_rule = saved_cfg.get("rule", self.config.rule)
        if saved_rule != self.config.rule:
            raise ValueError(
                f"Lagrange state was saved with rule={saved_rule!r} but the current config has "
                f"rule={self.config.rule!r}; refusing to resume with a different rule"
            )
        current = dataclasses.asdict(self.config)
        diffs = {k: (v, current[k]) for k, v in saved_cfg.items() if k in current and current[k] != v}
        if diffs:
            logger.warning(
                "Lagrange config differs from the checkpoint (saved, current): %s; using current", diffs
            )
        log_lambda = float(state["log_lambda"])
        if not math.isfinite(log_lambda):
            raise ValueError(f"log_lambda in Lagrange state must be finite, got {log_lambda!r}")
        jc_ema = state["jc_ema"]
        if jc_ema is not None and not math.isfinite(float(jc_ema)):
            raise ValueError(f"jc_ema in Lagrange state must be finite or None, got {jc_ema!r}")
        clipped = self._clip_log(log_lambda)
        if clipped != log_lambda:
            logger.warning(
                "Restored λ=%g is outside the current [lambda_min, lambda_max]; clipped", math.exp(log_lambda)
            )
        self._log_lambda = clipped
        self._jc_ema = None if jc_ema is None else float(jc_ema)
        self._steps = int(state["steps"])


@dataclass
class LagrangeRecipe:
    """The λ keys of a training recipe (ES flags, GRPO YAML), named as users know them.

    Trainer configs inherit these fields, so both trainers accept the same keys and build the same
    :class:`LagrangeConfig`.
    """

    lambda_cost: float = 1.0
    lambda_adapt: bool = False
    lambda_rule: Rule = "ema_log"
    cost_threshold_d: float = 0.0
    lambda_lr: float = 0.005
    lambda_min: float = 1e-4
    lambda_max: float = 5.0
    jc_ema_beta: float = 0.9
    lambda_pos_cost_only: bool = False

    def lagrange_config(self) -> LagrangeConfig:
        return LagrangeConfig(
            lambda_init=self.lambda_cost, lambda_adapt=self.lambda_adapt, rule=self.lambda_rule,
            cost_threshold_d=self.cost_threshold_d, lambda_lr=self.lambda_lr, lambda_min=self.lambda_min,
            lambda_max=self.lambda_max, jc_ema_beta=self.jc_ema_beta, lambda_pos_cost_only=self.lambda_pos_cost_only,
        )  # fmt: skip
