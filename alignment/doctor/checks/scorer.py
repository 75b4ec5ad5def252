"""Scorer service on the chosen score models: the real service (child processes on 127.0.0.1) with
batching on and off, under the uniform and the mixed-length loads of ``bench/scorer_throughput.py``
(:mod:`alignment.doctor.scorer_load`). Target on a GPU: batching ≥ 3x on both (``ratio``,
``mixed_ratio``); on a CPU the work grows with the rows, so the ratios are shown, not judged."""

from __future__ import annotations

from pathlib import Path

from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult, Figure, judged
from alignment.doctor.scorer_load import WORKLOADS, LoadSettings, measure_batching

TITLE = "Scorer service: batching on vs off, uniform and mixed loads"


def settings(ctx: Context) -> LoadSettings:
    device = "cuda" if ctx.on_gpu else "cpu"
    if ctx.quick:
        return LoadSettings(clients=16, requests_per_client=6, mixed_requests_per_client=2, warmup_requests=1,
                            rounds=1, device=device, scorer_threads=ctx.scorer_threads, max_length=1024,
                            start_timeout=600)  # fmt: skip
    return LoadSettings(rounds=2, device=device, scorer_threads=ctx.scorer_threads, start_timeout=900)


def run_scorer(ctx: Context) -> CheckResult:
    s = settings(ctx)
    models = (Path(ctx.reward_model), Path(ctx.cost_model))
    summary, runs = measure_batching(s, models, WORKLOADS, ctx.work_dir("scorer"))
    figures = []
    for workload, key in (("uniform", "ratio"), ("mixed", "mixed_ratio")):
        n = s.requests_per_client if workload == "uniform" else s.mixed_requests_per_client
        note = (f"{summary[f'{workload}_on']:.1f} vs {summary[f'{workload}_off']:.1f} pairs/s; "
                f"{summary[f'{workload}_merged']:.1f} requests per batch; {s.clients} clients x {n} requests "
                f"x {s.items_per_request} pairs, median of {s.rounds} round(s)")  # fmt: skip
        figures.append(judged(f"{workload} load, batching on/off ({key})", summary[workload], "x", ">=", 3.0,
                              ctx.on_gpu, gpu_target=True, note=note))  # fmt: skip
    figures.append(
        Figure("score models", ctx.score_label, note=f"reward {ctx.reward_model}, cost {ctx.cost_model}")
    )
    return CheckResult.from_figures("scorer", TITLE, figures, data={"summary": summary, "runs": runs})
