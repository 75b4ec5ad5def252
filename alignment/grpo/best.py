"""``<output_dir>/best``: the model of the best greedy evaluation so far, kept beside ``final/``.

GRPO against a learned reward can peak and then degrade (the toy run of issue 19: reward 1.43 at
step 10, −1.05 at the end), and ``final/`` holds only the last step. After every evaluation of
:class:`~alignment.grpo.eval_callback.AlignmentEvalCallback` the evaluation is ranked, and a better
one replaces ``best/`` (model, tokenizer and ``best.json`` = the evaluation, its step and the
rule), written into a temporary folder and swapped in whole (:func:`alignment.atomic.replace_dir`).

Ranking (``best_by``):

- ``constrained`` (default): the constrained problem's own order. An evaluation that meets the
  cost constraint (mean cost + d ≤ 0, the d of the λ controller) beats one that does not; among
  those that meet it the higher mean reward wins; among those that do not, the smaller violation.
- ``reward``: the higher mean reward, whatever the cost.
- ``safe_ratio``: the higher share of safe answers, then the higher mean reward.

Ties keep the earlier model. The step-0 evaluation (the initial policy) takes part, so ``best/`` can
be the starting model when training only made it worse. A resumed run reads ``best/best.json`` and
keeps that model until an evaluation beats it. Every rank calls the save (DeepSpeed ZeRO-3 gathers
the weights collectively); rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alignment.atomic import replace_dir

logger = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_FILE = "best.json"
RULES = ("constrained", "reward", "safe_ratio")


def rank_key(summary: Mapping[str, Any], by: str, cost_threshold_d: float) -> tuple[float, float]:
    """The sort key of an evaluation summary (``R_mean``, ``C_mean``, ``safe_ratio``): larger is better."""
    if by == "constrained":
        violation = summary["C_mean"] + cost_threshold_d  # J_C: the constraint is J_C <= 0
        return (1.0, summary["R_mean"]) if violation <= 0 else (0.0, -violation)
    if by == "reward":
        return (summary["R_mean"], 0.0)
    if by == "safe_ratio":
        return (summary["safe_ratio"], summary["R_mean"])
    raise ValueError(f"best_by must be one of {RULES}, got {by!r}")


class BestCheckpoint(TrainerCallback):
    """Saves ``<output_dir>/best`` whenever ``evaluation`` records a better summary (see the module).

    Register it after ``evaluation`` so that it sees each step's evaluation on the same step.
    """

    def __init__(self, evaluation: Any, by: str, cost_threshold_d: float) -> None:
        rank_key(
            {"R_mean": 0.0, "C_mean": 0.0, "safe_ratio": 0.0}, by, cost_threshold_d
        )  # a bad rule fails now
        self.evaluation, self.by, self.d = evaluation, by, cost_threshold_d
        self.trainer: Any = None
        self.best: dict[str, Any] | None = None
        self._seen = 0

    def bind(self, trainer: Any) -> None:
        self.trainer = trainer
        saved = Path(trainer.args.output_dir) / BEST_DIR / BEST_FILE
        if saved.is_file():  # a resumed run: the kept model stays until something beats it
            record = json.loads(saved.read_text(encoding="utf-8"))
            if record.get("best_by") == self.by:
                self.best = record["eval"]

    def _better(self, summary: Mapping[str, Any]) -> bool:
        if self.best is None:
            return True
        return rank_key(summary, self.by, self.d) > rank_key(self.best, self.by, self.d)

    def _check(self) -> None:
        history = self.evaluation.history
        new, self._seen = history[self._seen :], len(history)
        for summary in new:
            if self._better(summary):
                self._save(summary)

    def _save(self, summary: Mapping[str, Any]) -> None:
        trainer = self.trainer
        out = Path(trainer.args.output_dir)
        tmp = out / f".{BEST_DIR}.tmp"
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))  # a collective under ZeRO-3; rank 0 writes
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(tmp)
            record = {
                "step": summary["step"],
                "best_by": self.by,
                "cost_threshold_d": self.d,
                "eval": summary,
            }
            (tmp / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            replace_dir(tmp, out / BEST_DIR)
            logger.info("step %d: best evaluation so far by %s (R %.3f, C %.3f): saved to %s", summary["step"],
                        self.by, summary["R_mean"], summary["C_mean"], out / BEST_DIR)  # fmt: skip
        trainer.accelerator.wait_for_everyone()
        self.best = dict(summary)

    def on_train_begin(self, args, state, control, **kwargs):
        self._check()  # the step-0 evaluation, made by the evaluation callback just before
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._check()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._check()
        return control
