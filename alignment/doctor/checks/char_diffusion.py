"""Character diffusion: a few GRPO iterations of the masked character generator against the frozen
judge (the tiny synthetic build), bf16 autocast on a GPU (the trainer's ``dtype: auto``), fp32 on a
CPU: the loss is finite on every step, and the step time."""

from __future__ import annotations

from alignment.doctor.checks.steps import step_figures, step_records
from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult

TITLE = "Character diffusion: GRPO steps against the judge"


def run_char_diffusion(ctx: Context) -> CheckResult:
    from alignment.char_diffusion.build import TINY, build
    from alignment.char_diffusion.config import GRPOConfig
    from alignment.char_diffusion.demo import GRPO, HERE
    from alignment.config import load_config

    iterations = 4 if ctx.quick else 8
    work = ctx.work_dir("char_diffusion")
    paths = build(work / "tiny", TINY)  # seconds; never written into a shared models folder
    out = work / "grpo"
    cfg = load_config(GRPOConfig, HERE / "grpo.yaml", {
        **GRPO, "dataset": paths["data"], "generator_checkpoint": paths["generator"],
        "judge_checkpoint": paths["judge"], "out_dir": str(out), "max_iters": iterations, "log_interval": 1,
        "eval_interval": iterations, "eval_iters": 2, "sample_interval": 0, "save_interval": 10**6,
        "device": "cuda" if ctx.on_gpu else "cpu",
    })  # fmt: skip
    from alignment.char_diffusion.train_grpo import train_grpo

    train_grpo(cfg)
    figures = step_figures(
        step_records(out), ctx.on_gpu, f"GRPO (group {cfg.group_size}) from the tiny generator"
    )
    return CheckResult.from_figures("char_diffusion", TITLE, figures)
