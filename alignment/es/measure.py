"""Where an ES iteration's time goes, measured on live trainers (``bench/es_iteration.py`` and
``python -m alignment.doctor`` both use these).

    steps = {"full": trainer_step(full_trainer, tokenizer), "lowrank": trainer_step(low_trainer, tokenizer),
             "generate": generate_step(executor, low_trainer, tokenizer)}
    report = interleaved(steps, iterations=4, warmup=1)
    report["full"]["non_generation_share"], throughput_ratio(report)

A *step* is a callable ``step(iteration) -> metrics`` holding at least ``time/iteration`` (seconds)
and ``tokens`` (answer tokens generated, counted with the policy's tokenizer). :func:`interleaved`
runs every step of an iteration before the next iteration, so load on a shared machine hits all of
them alike, drops the first ``warmup`` iterations and averages the rest:

- ``non_generation_share`` = 1 − Σ ``time/generation`` / Σ ``time/iteration``: what an iteration
  spends outside generating (perturb/restore, scoring wait, update, sync, bookkeeping); target
  ≤ 10 % (scoring overlaps generation; perturbations are regenerated from seeds);
- :func:`throughput_ratio`: low-rank ES tokens/s over a pure batched ``generate`` of the same
  population × prompts (unperturbed, no adapters, one call); target ≥ 0.9 on a GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alignment.es.trainer import ESTrainer, batch_prompts

Step = Callable[[int], dict[str, float]]
PARTS = {  # report label -> metrics key of ESTrainer.step
    "generation": "time/generation",
    "perturb/restore": "time/perturb_restore",
    "scoring wait": "time/scoring_wait",
    "update": "time/update",
    "sync": "time/sync",
    "generate phase": "time/generate_phase",
}


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    """Answer tokens of ``texts`` as the policy's tokenizer counts them (no special tokens)."""
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def trainer_step(trainer: ESTrainer, tokenizer: Any) -> Step:
    """``trainer.step`` that also counts the tokens of every member's answers."""
    answers: list[list[str]] = []
    original = trainer.score_population

    def recording(*args: Any, **kwargs: Any):
        scores, responses, timings = original(*args, **kwargs)
        answers.append([r for member in responses for r in member])
        return scores, responses, timings

    trainer.score_population = recording  # type: ignore[method-assign]

    def step(iteration: int) -> dict[str, float]:
        metrics = trainer.step(iteration)
        return {**metrics, "tokens": float(count_tokens(tokenizer, answers[-1]))}

    return step


def generate_step(executor: Any, trainer: ESTrainer, tokenizer: Any) -> Step:
    """One batched ``generate`` of ``trainer``'s iteration prompts repeated once per member, with the
    unperturbed weights: what the population's sequences cost without ES."""
    cfg = trainer.cfg

    def step(iteration: int) -> dict[str, float]:
        prompts = batch_prompts(trainer.train_prompts, cfg.seed, iteration, cfg.batch_size)
        t0 = time.perf_counter()
        answers = executor.generate(prompts * cfg.population_size, trainer.settings)
        seconds = time.perf_counter() - t0
        return {"time/iteration": seconds, "time/generation": seconds,
                "tokens": float(count_tokens(tokenizer, answers))}  # fmt: skip

    return step


def summarise(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Means over ``rows`` (one step's metrics per iteration): seconds per iteration, tokens,
    tokens/s, the timed parts (seconds) and the non-generation share."""
    if not rows:
        raise ValueError("no iterations to summarise")
    total = sum(r["time/iteration"] for r in rows)
    generation = sum(r.get("time/generation") or 0.0 for r in rows)
    seconds = total / len(rows)
    tokens = statistics.fmean(r["tokens"] for r in rows) if all("tokens" in r for r in rows) else None
    parts = {label: statistics.fmean(r.get(key) or 0.0 for r in rows) for label, key in PARTS.items()
             if any(key in r for r in rows)}  # fmt: skip
    return {
        "iterations": len(rows),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if tokens is not None and seconds > 0 else None,
        "parts": parts,
        "non_generation_share": 1.0 - generation / total if total > 0 else None,
    }


def interleaved(
    steps: Mapping[str, Step],
    iterations: int,
    warmup: int = 1,
    on_iteration: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every step once per iteration, in turn; :func:`summarise` each over the iterations after
    ``warmup`` (the last one if none is left). ``on_iteration(i, metrics by step)`` reports progress."""
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in steps}
    for i in range(iterations):
        done = {label: step(i) for label, step in steps.items()}
        for label, metrics in done.items():
            rows[label].append(metrics)
        if on_iteration is not None:
            on_iteration(i, done)
    return {label: summarise(r[warmup:] or r[-1:]) for label, r in rows.items()}


def throughput_ratio(
    report: Mapping[str, Mapping[str, Any]], es: str = "lowrank", base: str = "generate"
) -> float:
    """ES tokens/s over pure-generate tokens/s (tokens of the answers, so members answering longer
    or shorter than θ do not bias it)."""
    return report[es]["tokens_per_s"] / report[base]["tokens_per_s"]
