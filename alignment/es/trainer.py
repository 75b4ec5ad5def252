"""The ES alignment trainer: maximise mean R − λ·mean C with seeded weight perturbations.

Per iteration: sample a prompt batch; draw the population (seeds); each member's perturbed policy
answers the batch on some engine while earlier members are being scored (each distinct
(prompt, response) pair once); fitness fᵢ = R̄ᵢ − λ·C̄ᵢ; zᵢ = shaped fitness;
θ ← θ + α/N Σ zᵢ·signᵢ·εᵢ on every engine from the seeds alone, into the exact weights; λ from the
shared controller, fed every episode's cost of the iteration (member by member, prompt by prompt).
The replay log entry written after the update commits the iteration.

``noise: full`` perturbs every parameter, member by member; ``noise: lowrank`` (EGGROLL) perturbs
the projection matrices by rank-r adapters and evaluates the population in batched calls
(:mod:`alignment.es.lowrank`). The noise id of the mode is recorded in the replay log and the
checkpoints, and a resume in another mode or rank is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from alignment import atomic
from alignment.cli import UserError
from alignment.config import save_config
from alignment.es.checkpoint import (
    ReplayEntry,
    ReplayLog,
    check_numerics,
    load_latest,
    replay_updates,
    save_final,
    save_latest,
)
from alignment.es.config import ESConfig
from alignment.es.diagnostics import population_diagnostics
from alignment.es.engines import GenerationSettings
from alignment.es.population import fitness, population, shape_fitness, update_terms
from alignment.es.score_cache import PairScoreCache
from alignment.es.sync import check_engines
from alignment.lagrange import LagrangeController
from alignment.scoring.client import ScorerClient, ScorerError, Scores
from alignment.scoring.quadrants import summarize
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


RESUME_COMMAND = "python -m alignment.es.train_es_alignment --resume {run_dir}"


class ScorerFailedError(UserError):
    """The scorer stayed unavailable (or failed) mid-run: every finished iteration is kept, and the
    message names the hosts and gives the resume command."""


def batch_prompts(prompts: list[str], run_seed: int, iteration: int, size: int) -> list[str]:
    """The prompt batch of ``iteration``: a pure function of (run seed, iteration)."""
    rng = random.Random(f"batch-{run_seed}-{iteration}")
    return rng.sample(prompts, size) if size <= len(prompts) else rng.choices(prompts, k=size)


def evaluate_policy(
    executor: Any, client: ScorerClient, prompts: list[str], settings: GenerationSettings
) -> dict:
    """Greedy answers of the unperturbed policy, scored: the quadrant summary (see scoring.quadrants)."""
    greedy = GenerationSettings(**{**settings.__dict__, "temperature": 0.0})
    responses = executor.generate(prompts, greedy)
    scores = client.score(prompts, responses)
    return summarize(scores.rewards, scores.costs)


class ESTrainer:
    """One ES run over an executor (local or Ray) and a scorer client."""

    def __init__(
        self,
        cfg: ESConfig,
        executor: Any,
        client: ScorerClient,
        train_prompts: list[str],
        eval_prompts: list[str],
        run_dir: str | Path,
    ) -> None:
        self.cfg, self.executor, self.client = cfg, executor, client
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.run_dir = Path(run_dir)
        self.logs = self.run_dir / "logs"
        self.replay = ReplayLog(self.run_dir / "replay.jsonl")
        self.lagrange = LagrangeController(cfg.lagrange_config())
        self.settings = cfg.generation_settings()
        self.noise = cfg.noise_spec()
        self.start_iteration = 0
        self.weight_bytes_sent = 0

    # -- resume ----------------------------------------------------------------------------
    def restore_progress(self) -> int:
        """Bring engines and λ to the last committed iteration; returns the next iteration."""
        entries = self.replay.read()
        latest = load_latest(self.run_dir)
        check_numerics(entries, latest[1] if latest else None, self.cfg.master_dtype, str(self.run_dir),
                       self.noise.id)  # fmt: skip
        done = -1
        if latest is not None:
            weights, state = latest
            done = int(state["iteration"])
            self.executor.load_state_dict(weights)
            self.lagrange.load_state_dict(state["lagrange"])
        later = [e for e in entries if e.iteration > done]
        if later:
            done = replay_updates(self.executor, later)
            self.lagrange.load_state_dict(later[-1].lagrange)
        if done >= 0:
            logger.info("resumed %s after iteration %d (λ=%.4f)", self.run_dir, done, self.lagrange.value)
        self.start_iteration = done + 1
        return self.start_iteration

    def checkpoint(self, iteration: int) -> None:
        state = {"iteration": iteration, "lagrange": self.lagrange.state_dict(), "noise": self.noise.id,
                 "master_dtype": self.cfg.master_dtype}  # fmt: skip
        save_latest(self.run_dir, self.executor.state_dict(), self.cfg.policy_model_path, state)

    # -- one iteration ---------------------------------------------------------------------
    def score_population(
        self, members: list, prompts: list[str], settings: GenerationSettings, cache: PairScoreCache
    ) -> tuple[list[Scores], list[list[str]], dict[str, float]]:
        """Generate every member; its new pairs go to the scorer as soon as it is generated (scoring
        overlaps generation). Returns (scores, responses, timings) in member order."""
        pending: dict[int, Any] = {}
        responses: dict[int, list[str]] = {}

        def on_generated(i: int, answers: list[str]) -> None:
            responses[i] = answers
            pending[i] = cache.submit(prompts, answers)
            failed = cache.failure()
            if failed is not None:  # the scorer gave up: generating the other members is wasted time
                raise failed

        t0 = time.perf_counter()
        timings = self.executor.evaluate(members, prompts, self.cfg.sigma, settings, on_generated, self.noise)
        t_gen = time.perf_counter()
        scores = [pending[i].result() for i in range(len(members))]
        t_done = time.perf_counter()
        return (
            scores,
            [responses[i] for i in range(len(members))],
            {
                "time/generation": max(timings.generation),
                "time/perturb_restore": max(timings.perturb_restore),
                "time/generate_phase": t_gen - t0,
                "time/scoring_wait": t_done - t_gen,
                # each engine's share of the population: the run log shows every engine worked
                "engines/members_min": float(min(timings.members, default=0)),
                "engines/members_max": float(max(timings.members, default=0)),
            },
        )

    def step(self, iteration: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = batch_prompts(self.train_prompts, cfg.seed, iteration, cfg.batch_size)
        members = population(cfg.seed, iteration, cfg.population_size, cfg.antithetic)
        # every member samples with the same seed (common random numbers); it changes per iteration
        settings = dataclasses.replace(self.settings, seed=cfg.seed * 1_000_003 + iteration)
        with ThreadPoolExecutor(max_workers=max(2, self.executor.num_engines)) as pool:
            cache = PairScoreCache(self.client.score, pool)
            scores, responses, metrics = self.score_population(members, prompts, settings, cache)
            lam = self.lagrange.value
            r_bar = [float(np.mean(s.rewards)) for s in scores]
            c_bar = [float(np.mean(s.costs)) for s in scores]
            f = fitness(r_bar, c_bar, lam)
            z = shape_fitness(f, cfg.fitness_shaping)
            seeds, coefs, scale = update_terms(members, z, cfg.alpha)
            if cfg.lambda_cost_source == "unperturbed":  # θ itself on the batch (one more generation)
                answers = self.executor.generate(prompts, settings)
                episode_costs = list(cache.submit(prompts, answers).result().costs)
            else:  # every member's every episode, in member order: the same on every executor
                episode_costs = [c for s in scores for c in s.costs]
        # nothing below may fail on the scorer: the update and the replay entry commit together
        t_up = time.perf_counter()
        metrics.update(self.executor.apply_update(seeds, coefs, scale, self.noise))
        metrics["time/update"] = time.perf_counter() - t_up
        self.lagrange.update_costs(episode_costs)  # an episode_cost_window_size window spans iterations
        self.replay.append(ReplayEntry(iteration, seeds, coefs, scale, self.lagrange.state_dict(),
                                       noise=self.noise.id, master_dtype=cfg.master_dtype))  # fmt: skip
        metrics["time/sync"] = self.maybe_sync(iteration)
        rewards = np.concatenate([s.rewards for s in scores])
        costs = np.concatenate([s.costs for s in scores])
        stats = self.lagrange.last_stats()
        metrics.update(cache.metrics())
        metrics.update(population_diagnostics(members, responses, f))
        metrics.update({
            "train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()),
            "train/cost_mean": float(costs.mean()), "train/cost_std": float(costs.std()),
            "train/fitness_mean": float(f.mean()), "train/fitness_std": float(f.std()),
            "train/fitness_max": float(f.max()), "train/fitness_min": float(f.min()),
            "lambda/value": stats["lambda"], "lambda/used": lam, "lambda/jc": stats["jc"],
            "lambda/jc_ema": stats["jc_ema"], "lambda/mean_cost": stats["mean_cost"],
            "lambda/window_cost": stats["window_cost"],
            "sync/weight_bytes_sent": float(self.weight_bytes_sent),
        })  # fmt: skip
        self.weight_bytes_sent = 0
        metrics["time/iteration"] = time.perf_counter() - t0
        return metrics

    def maybe_sync(self, iteration: int) -> float:
        """Every ``checksum_every`` iterations compare engines (:func:`alignment.es.sync.check_engines`)."""
        if self.executor.num_engines < 2 or (iteration + 1) % self.cfg.checksum_every:
            return 0.0
        t0 = time.perf_counter()
        self.weight_bytes_sent += check_engines(self.executor, self.run_dir, iteration)
        return time.perf_counter() - t0

    def record_placement(self) -> None:
        """``logs/engines.json``: where each engine runs (a resume on other nodes rewrites it)."""
        placement = self.executor.placement() if hasattr(self.executor, "placement") else []
        nodes = sorted({p.get("node_ip", p.get("host", "?")) for p in placement})
        self.logs.mkdir(parents=True, exist_ok=True)
        atomic.write_text(
            self.logs / "engines.json", json.dumps({"nodes": nodes, "engines": placement}, indent=2)
        )
        logger.info("%d engine(s) on %d node(s): %s", len(placement), len(nodes), ", ".join(nodes))

    # -- the run ---------------------------------------------------------------------------
    def stopped(self, exc: ScorerError, where: str, kept: int) -> ScorerFailedError:
        """The error that ends a run on a scorer failure: what failed (the hosts), what is kept, and
        how to resume."""
        have = (
            f"iterations 0..{kept} are kept in {self.run_dir}" if kept >= 0 else "no iteration had finished"
        )
        return ScorerFailedError(
            f"{exc}. ES stopped {where}; {have}; once the scorer is back, resume with: "
            + RESUME_COMMAND.format(run_dir=self.run_dir)
        )

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.record_placement()
        start = self.restore_progress()
        before_path = self.logs / "eval_before.json"
        with Tracker(
            self.logs, config=cfg.__dict__, wandb=cfg.wandb, wandb_project=cfg.wandb_project
        ) as tracker:
            if before_path.exists():
                before = json.loads(before_path.read_text())
            else:
                try:
                    before = evaluate_policy(self.executor, self.client, self.eval_prompts, self.settings)
                except ScorerError as exc:
                    raise self.stopped(exc, "in the evaluation before training", start - 1) from exc
                before_path.parent.mkdir(parents=True, exist_ok=True)
                before_path.write_text(json.dumps(before, indent=2))
                # step 0 of the eval curves (plot_training_curves, TensorBoard): the policy before ES
                tracker.log(
                    {f"eval/{key}": before[key] for key in ("R_mean", "C_mean", "safe_ratio")}, step=0
                )
            bar = tqdm(range(start, cfg.num_iterations), desc="ES", initial=start, total=cfg.num_iterations)
            iteration = start - 1
            for iteration in bar:
                try:
                    metrics = self.step(iteration)
                except ScorerError as exc:
                    # the replay log already holds every finished iteration; a checkpoint of the
                    # last one (unless just saved) makes the resume quick
                    if iteration > start and iteration % cfg.save_every:
                        self.checkpoint(iteration - 1)
                    raise self.stopped(exc, f"in iteration {iteration}", iteration - 1) from exc
                tracker.log(metrics, step=iteration)
                bar.set_postfix(R=f"{metrics['train/reward_mean']:.3f}", C=f"{metrics['train/cost_mean']:.3f}",
                                lam=f"{metrics['lambda/value']:.3f}")  # fmt: skip
                if (iteration + 1) % cfg.save_every == 0:
                    self.checkpoint(iteration)
            self.checkpoint(iteration)
            save_final(self.run_dir, cfg.num_iterations, self.executor.state_dict())
            try:
                after = evaluate_policy(self.executor, self.client, self.eval_prompts, self.settings)
            except ScorerError as exc:
                raise self.stopped(exc, "in the final evaluation", cfg.num_iterations - 1) from exc
            tracker.log({f"eval/{key}": after[key] for key in ("R_mean", "C_mean", "safe_ratio")},
                        step=cfg.num_iterations)  # fmt: skip
        results = {
            "before": before,
            "after": after,
            "iterations": cfg.num_iterations,
            "run_dir": str(self.run_dir),
        }
        (self.logs / "final_eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
        logger.info("eval reward %.3f -> %.3f, cost %.3f -> %.3f, safe %.1f%% -> %.1f%%",
                    before["R_mean"], after["R_mean"], before["C_mean"], after["C_mean"],
                    before["safe_ratio"], after["safe_ratio"])  # fmt: skip
        return results
