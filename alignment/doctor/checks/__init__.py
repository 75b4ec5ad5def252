"""The doctor's checks, in the order they run: name → title, entry point and time limits.

Each ``run(ctx) -> CheckResult`` lives in its own module and is imported only by the process that
runs it (:mod:`alignment.doctor.runner`), so a check pays for its own imports and no more.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult


@dataclass(frozen=True)
class CheckSpec:
    title: str
    module: str  # alignment.doctor.checks.<module>, with run_<name>(ctx)
    limit_s: float  # seconds allowed on a full run
    quick_limit_s: float  # with --quick
    needs_scorer: bool = False  # runs against the scorer the parent keeps running
    one_gpu: bool = False  # sees only the first GPU (HF's Trainer would spread one process over all)

    @property
    def run(self) -> Callable[[Context], CheckResult]:
        name = self.module.rsplit(".", 1)[-1]
        return getattr(importlib.import_module(self.module), f"run_{name}")


def _spec(
    title: str,
    name: str,
    limit_s: float,
    quick_limit_s: float,
    needs_scorer: bool = False,
    one_gpu: bool = False,
) -> CheckSpec:
    return CheckSpec(title, f"alignment.doctor.checks.{name}", limit_s, quick_limit_s, needs_scorer, one_gpu)


CHECKS: dict[str, CheckSpec] = {
    "environment": _spec("Environment: torch, CUDA, GPUs, packages, threads", "environment", 60, 60),
    "models": _spec("Models: build or find the policy and score models", "models", 900, 300),
    "noise": _spec("ES noise: self-check, CPU vs every GPU bit for bit, speed", "noise", 240, 90),
    "scorer": _spec("Scorer service: batching on vs off, uniform and mixed loads", "scorer", 360, 150),
    "es": _spec("ES iteration: full and low-rank, share outside generation, memory", "es", 420, 180, True),
    "grpo": _spec("GRPO: TRL steps against the running scorer", "grpo", 300, 150, True, one_gpu=True),
    "persona": _spec("Persona dialogue: GRPO steps of the FiD reader", "persona", 180, 120),
    "char_diffusion": _spec("Character diffusion: GRPO steps against the judge", "char_diffusion", 180, 120),
}
