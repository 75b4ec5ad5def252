"""The one adaptive Lagrange multiplier (λ) controller shared by the ES and GRPO trainers.

Both trainers solve ``max E[R] - λ·E[C]`` subject to ``E[C] <= -d`` (R reward, C cost; a response
is safe iff C <= 0). Keeping a single controller means both trainers move λ identically, so their
runs are comparable and a fix to the rule lands in both at once.

Sign convention (the seed study's, and our recipes'): ``J_C = mean(C) + d`` with
``d = cost_threshold_d``, so the constraint is ``E[C] <= -d``: ``d = 0`` asks for ``E[C] <= 0`` and
``d = -0.1`` for ``E[C] <= 0.1``. (safe-rlhf's ``threshold`` is ``-d``.) ``J_C > 0`` means the
constraint is violated and λ must rise; ``J_C < 0`` means there is slack and λ may fall. With
``lambda_pos_cost_only`` J_C is clipped to ``max(J_C, 0)`` so λ never falls.

What ``mean(C)`` is: by default the mean cost of the step's episodes. With
``episode_cost_window_size = N > 0`` it is the mean of the last N episode costs (a window that spans
steps, as safe-rlhf's ``episode_costs`` deque); the trainer must then hand over the episodes' costs
(:meth:`LagrangeController.update_costs`), not only their mean. With
``lambda_update_delay_steps = K`` the first K updates record J_C (and fill the window) but leave λ
where it is (safe-rlhf: ``global_step >= lambda_update_delay_steps``).

Rules (λ lives in log space so it stays positive and moves multiplicatively):

* ``ema_log`` (seed rule): ``ema <- β·ema + (1-β)·J_C``; ``ln λ <- ln λ + lr·ema``; λ clipped to
  ``[lambda_min, lambda_max]``. The first update sets ``ema = J_C`` instead of starting from 0,
  because a zero start would bias early steps toward "no violation" and delay the reaction to an
  unsafe initial policy.
* ``ppo_lag`` (safe-rlhf's PPO-Lagrangian, ``safe_rlhf/algorithms/ppo_lag/trainer.py``): one SGD
  step on the loss ``-J_C·λ`` with respect to ``ln λ``, i.e. ``ln λ <- ln λ + lr·λ·J_C``; no EMA;
  only the top is clamped (``ln λ <= ln lambda_max``; ``lambda_min`` does not apply). safe-rlhf
  updates once per PPO micro-batch; we update once per call (GRPO: optimiser step, ES: iteration).

With ``lambda_adapt=False`` the controller still records J_C and its EMA (for logging) but λ stays
at ``lambda_init``.

Distributed GRPO: the controller is process-local and deterministic. The caller must hand every
rank the same costs (GRPO gathers them from all ranks) and call ``update``/``update_costs`` exactly
once per optimiser step; then every rank computes a bit-identical λ without communication here.
safe-rlhf keeps a window of N episodes per rank and averages the ranks' means; our window holds
the last N episodes of all ranks together, which is the same average when N is P times safe-rlhf's
window (P ranks) and a multiple of the costs each rank adds per step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from alignment.config import field_help as _help
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
    episode_cost_window_size: int = 0  # 0: the step's own episodes
    lambda_update_delay_steps: int = 0

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
        for name in ("episode_cost_window_size", "lambda_update_delay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


class LagrangeController:
    """Holds ln λ, the J_C EMA and the episode-cost window; one update per optimiser step."""

    def __init__(self, config: LagrangeConfig | None = None) -> None:
        self.config = config if config is not None else LagrangeConfig()
        self._log_lambda: float = math.log(self.config.lambda_init)
        self._jc_ema: float | None = None
        self._steps: int = 0
        self._window: deque[float] = deque(maxlen=self.config.episode_cost_window_size or None)
        self._last_jc: float = math.nan
        self._last_mean_cost: float = math.nan
        self._last_window_cost: float = math.nan

    @property
    def value(self) -> float:
        """Current λ; exactly the bound when clipped (exp(log(b)) can round to just below b)."""
        cfg = self.config
        if self._log_lambda >= math.log(cfg.lambda_max):
            return cfg.lambda_max
        if cfg.rule == "ppo_lag":  # safe-rlhf clamps only the top
            return math.exp(self._log_lambda)
        if self._log_lambda <= math.log(cfg.lambda_min):
            return cfg.lambda_min
        return min(max(math.exp(self._log_lambda), cfg.lambda_min), cfg.lambda_max)

    def _clip_log(self, log_lambda: float) -> float:
        """Clip ln λ to the rule's bounds; comparing logs avoids exp overflow."""
        top = min(log_lambda, math.log(self.config.lambda_max))
        return top if self.config.rule == "ppo_lag" else max(top, math.log(self.config.lambda_min))

    def update(self, mean_cost: float) -> float:
        """Advance one step with the step's mean episode cost; returns the new λ.

        A NaN/inf cost raises instead of being absorbed: it would poison the EMA (or ln λ) forever
        and the run would keep training with a meaningless penalty. With an episode window the
        individual costs are needed: use :meth:`update_costs`.
        """
        if self.config.episode_cost_window_size:
            raise ValueError(
                "episode_cost_window_size > 0 averages the last episodes' costs: pass this step's costs "
                "with update_costs(costs), not their mean"
            )
        mean_cost = _finite(mean_cost, "mean_cost")
        return self._advance(mean_cost, mean_cost)

    def update_costs(self, costs: Sequence[float]) -> float:
        """Advance one step with the costs of the step's episodes (in a fixed order); returns the new λ.

        J_C is computed from the mean of the last ``episode_cost_window_size`` episode costs, or of
        ``costs`` alone when the window is off. Sums are exact (``math.fsum``), so the result does not
        depend on the summation order.
        """
        values = [_finite(c, "cost") for c in costs]
        if not values:
            raise ValueError("update_costs needs at least one cost")
        step_mean = math.fsum(values) / len(values)
        if not self.config.episode_cost_window_size:
            return self._advance(step_mean, step_mean)
        self._window.extend(values)
        return self._advance(step_mean, math.fsum(self._window) / len(self._window))

    def _advance(self, step_mean: float, cost: float) -> float:
        cfg = self.config
        jc = cost + cfg.cost_threshold_d
        if cfg.lambda_pos_cost_only:
            jc = max(jc, 0.0)
        if self._jc_ema is None:
            self._jc_ema = jc
        else:
            self._jc_ema = cfg.jc_ema_beta * self._jc_ema + (1.0 - cfg.jc_ema_beta) * jc
        if cfg.lambda_adapt and self._steps >= cfg.lambda_update_delay_steps:
            # ppo_lag: minus the gradient of the loss -J_C·λ w.r.t. ln λ (safe-rlhf's SGD step)
            step = cfg.lambda_lr * (self._jc_ema if cfg.rule == "ema_log" else self.value * jc)
            self._log_lambda = self._clip_log(self._log_lambda + step)
        self._steps += 1
        self._last_jc = jc
        self._last_mean_cost = step_mean
        self._last_window_cost = cost
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
        """Flat floats for the trackers; NaN before the first update so plots show a gap, not a fake 0.

        ``mean_cost`` is the last step's own mean cost, ``window_cost`` the mean J_C was computed from.
        """
        return {
            "lambda": self.value,
            "jc": self._last_jc,
            "jc_ema": math.nan if self._jc_ema is None else self._jc_ema,
            "mean_cost": self._last_mean_cost,
            "window_cost": self._last_window_cost,
            "steps": float(self._steps),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; ln λ (not λ) is saved so resume is bit-identical."""
        return {
            "log_lambda": self._log_lambda,
            "jc_ema": self._jc_ema,
            "steps": self._steps,
            "window": list(self._window),
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore λ, EMA, step count (hence the delay) and the cost window; the current config is kept.

        A different rule is an error: ln λ and the EMA mean different things under the two rules, so
        continuing would be a silent change of algorithm. Other differences (e.g. a new lambda_lr on
        resume) are allowed deliberately but logged; a smaller window keeps the newest costs. States
        saved before the window existed have none (an empty window).
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
        window = [_finite(c, "window cost in Lagrange state") for c in state.get("window") or []]
        clipped = self._clip_log(log_lambda)
        if clipped != log_lambda:
            logger.warning(
                "Restored λ=%g is outside the current [lambda_min, lambda_max]; clipped", math.exp(log_lambda)
            )
        self._log_lambda = clipped
        self._jc_ema = None if jc_ema is None else float(jc_ema)
        self._steps = int(state["steps"])
        self._window = deque(window, maxlen=self.config.episode_cost_window_size or None)


def _finite(value: Any, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


@dataclass
class LagrangeRecipe:
    """The λ keys of a training recipe (ES flags, GRPO YAML), named as users know them.

    Trainer configs inherit these fields, so both trainers accept the same keys and build the same
    :class:`LagrangeConfig`. A trainer that hands the controller its episodes' costs
    (:meth:`LagrangeController.update_costs`) sets ``passes_episode_costs``; only then is an episode
    window accepted, so a trainer that passes one mean per step fails at start, not after a step.
    """

    passes_episode_costs: ClassVar[bool] = False

    lambda_cost: float = field(default=1.0, metadata=_help("initial λ"))
    lambda_adapt: bool = field(default=False, metadata=_help("adapt λ toward the constraint E[C] <= -d"))
    lambda_rule: Rule = field(
        default="ema_log",
        metadata=_help("ema_log: ln λ += lr·EMA(J_C) (the study's); ppo_lag: ln λ += lr·λ·J_C (safe-rlhf's)"),
    )
    cost_threshold_d: float = field(
        default=0.0,
        metadata=_help("d in J_C = mean(C) + d: the constraint is E[C] <= -d (d = -0.1: E[C] <= 0.1)"),
    )
    lambda_lr: float = field(default=0.005, metadata=_help("learning rate of ln λ"))
    lambda_min: float = field(default=1e-4, metadata=_help("lower clip of λ (ema_log only)"))
    lambda_max: float = field(default=5.0, metadata=_help("upper clip of λ"))
    jc_ema_beta: float = field(default=0.9, metadata=_help("β of the EMA of J_C (ema_log)"))
    lambda_pos_cost_only: bool = field(default=False, metadata=_help("clip J_C at 0: λ never falls"))
    episode_cost_window_size: int = field(
        default=0, metadata=_help("mean(C) over the last N episodes across steps (safe-rlhf); 0: the step's")
    )
    lambda_update_delay_steps: int = field(default=0, metadata=_help("λ stays fixed for the first K updates"))

    def lagrange_config(self) -> LagrangeConfig:
        if self.episode_cost_window_size and not self.passes_episode_costs:
            raise ValueError(
                f"episode_cost_window_size={self.episode_cost_window_size}: {type(self).__name__}'s trainer "
                "hands λ one mean cost per step, not the episodes' costs; leave it at 0"
            )
        return LagrangeConfig(
            lambda_init=self.lambda_cost, lambda_adapt=self.lambda_adapt, rule=self.lambda_rule,
            cost_threshold_d=self.cost_threshold_d, lambda_lr=self.lambda_lr, lambda_min=self.lambda_min,
            lambda_max=self.lambda_max, jc_ema_beta=self.jc_ema_beta, lambda_pos_cost_only=self.lambda_pos_cost_only,
            episode_cost_window_size=self.episode_cost_window_size,
            lambda_update_delay_steps=self.lambda_update_delay_steps,
        )  # fmt: skip
