"""GRPO: a few TRL steps of the chosen policy against the running scorer (bf16 on a GPU).

The toy recipe (``alignment/grpo/grpo_toy.yaml``) on the chosen policy, timed from the outside
(:mod:`alignment.grpo.timing`): the step time, the share of it in the reward path (HTTP scoring),
and on a GPU the peak memory. A policy whose full fine-tuning cannot fit the free GPU memory (bf16
weights, gradients and AdamW state: ~8 bytes a parameter, plus activations) is not run, with the
estimate: on one GPU a 7B policy beside a 7B scorer needs ZeRO across GPUs, as users run it.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from alignment.doctor.context import Context
from alignment.doctor.report import NO_GPU, CheckResult, Figure, judged, not_run

TITLE = "GRPO: TRL steps against the running scorer"
RECIPE = Path(__file__).resolve().parents[2] / "grpo" / "grpo_toy.yaml"
BYTES_PER_PARAM = 8  # bf16 weights and gradients, AdamW's two moments in the weights' dtype


def run_grpo(ctx: Context) -> CheckResult:
    from alignment.es.memory import count_parameters
    from alignment.grpo.config import load_grpo_config
    from alignment.grpo.timing import StepClock, TimedScorer
    from alignment.grpo.train_grpo_alignment import train_grpo
    from alignment.scoring.client import ScorerClient

    steps, warmup = (3, 1) if ctx.quick else (6, 2)
    params = count_parameters(ctx.policy)
    if ctx.on_gpu:
        import torch

        free = torch.cuda.mem_get_info()[0]
        need = params * BYTES_PER_PARAM * 1.25 + 2 * 2**30
        if need > free:
            reason = (f"{params / 1e9:.2f}B parameters need ~{need / 2**30:.0f} GiB to fine-tune on one GPU, "
                      f"{free / 2**30:.0f} GiB are free (the scorer holds its share); use --policy-shape 1b, "
                      "or GRPO with ZeRO across GPUs")  # fmt: skip
            return CheckResult("grpo", TITLE, "not run", reason=reason)
        torch.cuda.reset_peak_memory_stats()
    toy = ctx.policy_label == "toy"
    out = ctx.work_dir("grpo") / "run"
    cfg = load_grpo_config(RECIPE, {
        "model_name": ctx.policy, "scorer_url": ctx.scorer_url, "output_dir": str(out), "max_steps": steps,
        "eval_every": 0, "eval_max_prompts": 8, "save_steps": 10**6, "logging_steps": 1,
        "max_completion_length": 24 if toy else 64,
    })  # fmt: skip
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "runs")
    clock = StepClock()
    with ScorerClient(ctx.scorer_url) as client:
        train_grpo(cfg, client=TimedScorer(client, clock), callbacks=[clock])
    kept = clock.steps[warmup:] or clock.steps[-1:]
    step_s = statistics.fmean(s["step_s"] for s in kept)
    reward_s = statistics.fmean(s["reward_s"] for s in kept)
    shape = (f"{len(kept)} step(s) after {warmup} warm-up; {cfg.per_device_train_batch_size} completions "
             f"({cfg.num_generations} per prompt) of <= {cfg.max_completion_length} tokens a step; "
             f"{'bf16' if ctx.on_gpu else 'fp32'}")  # fmt: skip
    figures = [
        Figure("step time", step_s * 1e3, "ms", note=shape),
        judged(
            "reward path share of the step",
            reward_s / step_s,
            "",
            "<=",
            0.10,
            ctx.on_gpu,
            gpu_target=True,
            note=f"{reward_s * 1e3:.1f} ms a step scoring over HTTP",
        ),  # fmt: skip
    ]
    if ctx.on_gpu:
        import torch

        peak = torch.cuda.max_memory_allocated()
        figures.append(Figure("peak GPU memory", peak / 2**30, "GiB",
                              note=f"{params / 1e9:.2f}B parameters: {peak / params:.1f} bytes a parameter"))  # fmt: skip
    else:
        figures.append(not_run("peak GPU memory", NO_GPU))
    return CheckResult.from_figures("grpo", TITLE, figures, data={"steps": clock.steps})
