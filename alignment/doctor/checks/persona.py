"""Persona dialogue: a few GRPO steps of the LAPDOG-style FiD reader on the toy task, in bf16
autocast on a GPU (fp32 on a CPU): the loss is finite on every step, and the step time."""

from __future__ import annotations

import contextlib

from alignment.doctor.checks.steps import step_figures, step_records
from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult

TITLE = "Persona dialogue: GRPO steps of the FiD reader"


def run_persona(ctx: Context) -> CheckResult:
    import torch

    from alignment.persona.config import load_persona_config
    from alignment.persona.demo import RECIPE, _paths
    from alignment.persona.toy import build_persona_toy
    from alignment.persona.trainer import train

    steps = 4 if ctx.quick else 8
    runs = ctx.work_dir("persona")
    toy = build_persona_toy(runs / "toy")  # seconds; never written into a shared models folder
    cfg = load_persona_config(RECIPE, {
        **_paths(toy, runs), "name": "grpo", "reader_rl_learning": True, "use_grpo": True, "grpo_group_size": 4,
        "per_gpu_batch_size": 4, "total_steps": steps, "eval_freq": steps, "save_freq": steps, "log_freq": 1,
        "eval_max_examples": 8, "device": "cuda" if ctx.on_gpu else "cpu",
    })  # fmt: skip
    # the persona trainer has no dtype option: bf16 autocast around it, as a GPU user would run it
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.on_gpu else contextlib.nullcontext()
    with autocast:
        train(cfg)
    figures = step_figures(
        step_records(runs / "grpo"), ctx.on_gpu, "GRPO (G = 4) from the untrained toy reader"
    )
    return CheckResult.from_figures("persona", TITLE, figures)
