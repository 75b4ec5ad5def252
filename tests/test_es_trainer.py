"""The ES trainer end to end against a real scorer: learning, exact resume, loud scorer failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from alignment.es.checkpoint import ReplayLog, load_latest
from alignment.es.config import ESConfig
from alignment.es.executors import LocalExecutor
from alignment.es.population import population
from alignment.es.score_cache import PairScoreCache
from alignment.es.sync import EnginesDivergedError, check_engines
from alignment.es.train_es_alignment import build_executor, run_es
from alignment.es.trainer import ESTrainer, ScorerFailedError, batch_prompts
from alignment.scoring.client import ScorerClient
from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS


def es_config(toy_models, scorer, tmp_path, **overrides) -> ESConfig:
    base = dict(
        policy_model_path=str(toy_models / "policy"), scorer_url=scorer.url, population_size=6, batch_size=8,
        num_iterations=6, sigma=0.02, alpha=0.01, max_new_tokens=12, experiment_dir=str(tmp_path / "runs"),
        eval_max_prompts=8, save_every=2, checksum_every=1, device="cpu", dtype="fp32", scorer_retries=1,
    )  # fmt: skip
    return ESConfig(**{**base, **overrides})


def final_weights(run_dir, iterations):
    return torch.load(run_dir / "model_saves" / f"final_model_iteration_{iterations}" / "pytorch_model.pth")


def test_toy_objective_improves_and_outputs_are_written(toy_models, scorer, tmp_path):
    cfg = es_config(toy_models, scorer, tmp_path, num_iterations=8, batch_size=12, population_size=8, sigma=0.05,
                    alpha=0.03, max_new_tokens=16)  # fmt: skip
    results = run_es(cfg)
    run_dir = next((tmp_path / "runs").iterdir())
    before, after = results["before"], results["after"]
    assert (
        after["R_mean"] - after["C_mean"] > before["R_mean"] - before["C_mean"] + 1.0
    )  # the objective, λ = 1
    assert after["C_mean"] < before["C_mean"]
    saved = json.loads((run_dir / "logs" / "final_eval_results.json").read_text())
    assert set(saved["after"]["counts"]) == {"SH", "SU", "UH", "UU"}
    assert (run_dir / "model_saves" / "latest_hf" / "model.safetensors").is_file()
    assert (run_dir / "model_saves" / "final_model_iteration_8" / "pytorch_model.pth").is_file()
    assert len(ReplayLog(run_dir / "replay.jsonl").read()) == 8
    lines = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["eval/C_mean"] == before["C_mean"]
    assert {"train/reward_mean", "lambda/value", "time/generation", "time/scoring_wait"} <= set(lines[1])
    diagnostics = {"update/realised_intended_ratio", "update/fraction_changed", "es/fitness_spread",
                   "scoring/pairs_sent", "scoring/pairs_total", "scoring/duplicate_fraction"}  # fmt: skip
    assert diagnostics <= set(lines[1])
    assert all(
        0 < r["update/fraction_changed"] <= 1 and r["scoring/pairs_total"] == 8 * 12 for r in lines[1:-1]
    )
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "logs").iterdir())


def test_two_local_engines_match_one_engine(toy_models, exact_scorer, tmp_path):
    scorer = exact_scorer
    one = es_config(toy_models, scorer, tmp_path / "a", num_iterations=3)
    two = es_config(toy_models, scorer, tmp_path / "b", num_iterations=3, num_engines=2)
    run_es(one)
    run_es(two)
    a = final_weights(next((tmp_path / "a" / "runs").iterdir()), 3)
    b = final_weights(next((tmp_path / "b" / "runs").iterdir()), 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diverged_engine_is_repaired_from_a_strict_majority(toy_models, scorer, tmp_path, caplog):
    cfg = es_config(toy_models, scorer, tmp_path, num_iterations=2, num_engines=3)
    executor = build_executor(cfg)
    assert isinstance(executor, LocalExecutor)
    executor.engines[1].apply_update([99], [1.0], 0.01)  # silent corruption on one engine
    client = ScorerClient(scorer.url)
    trainer = ESTrainer(cfg, executor, client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4], tmp_path / "run")
    trainer.train()
    assert len(set(executor.checksums())) == 1
    assert "disagree with the majority checksum" in caplog.text and "(2 of 3)" in caplog.text


def test_two_engines_that_disagree_stop_loudly_with_their_weights_saved(toy_models, scorer, tmp_path):
    """No strict majority (1 vs 1): nobody knows which engine is right, so nothing is repaired."""
    cfg = es_config(toy_models, scorer, tmp_path, num_iterations=3, num_engines=2)
    executor = build_executor(cfg)
    executor.engines[1].apply_update([99], [1.0], 0.01)
    good, bad = executor.checksums()
    run_dir = tmp_path / "run"
    trainer = ESTrainer(
        cfg, executor, ScorerClient(scorer.url), TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4], run_dir
    )
    with pytest.raises(EnginesDivergedError, match="no strict majority") as err:
        trainer.train()
    assert f"--resume {run_dir}" in str(err.value)
    assert executor.checksums() != [good] * 2 and len(set(executor.checksums())) == 2  # nothing overwritten
    saved = run_dir / "model_saves" / "diverged_iteration_0"
    assert json.loads((saved / "checksums.json").read_text())["checksums"] == executor.checksums()
    for k in range(2):
        on_disk = load_file(saved / f"engine_{k}.safetensors")
        assert all(torch.equal(on_disk[n], t) for n, t in executor.state_dict(k).items())
    assert [e.iteration for e in ReplayLog(run_dir / "replay.jsonl").read()] == [0]
    # resuming rebuilds both engines from the base model and the committed log
    again = build_executor(cfg)
    ESTrainer(cfg, again, ScorerClient(scorer.url), TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4], run_dir).train()
    assert len(set(again.checksums())) == 1
    assert [e.iteration for e in ReplayLog(run_dir / "replay.jsonl").read()] == [0, 1, 2]


def test_each_distinct_pair_is_scored_once_with_the_scores_of_scoring_every_pair(
    toy_models, exact_scorer, tmp_path
):
    """Antithetic members with a small σ often answer alike: those pairs are sent once, and every
    member's scores equal scoring all its pairs on a one-row-per-forward scorer."""
    cfg = es_config(toy_models, exact_scorer, tmp_path, population_size=8, antithetic=True, sigma=0.005,
                    batch_size=10, lambda_cost_source="unperturbed")  # fmt: skip
    client = ScorerClient(exact_scorer.url)
    trainer = ESTrainer(
        cfg, build_executor(cfg), client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4], tmp_path / "r"
    )
    prompts = batch_prompts(TOY_TRAIN_PROMPTS, cfg.seed, 0, cfg.batch_size)
    members = population(cfg.seed, 0, cfg.population_size, cfg.antithetic)
    sent: list[tuple[str, str]] = []

    def counting_score(p: list[str], r: list[str]):
        sent.extend(zip(p, r, strict=True))
        return client.score(p, r)

    with ThreadPoolExecutor(2) as pool:
        cache = PairScoreCache(counting_score, pool)
        scores, responses, _ = trainer.score_population(members, prompts, trainer.settings, cache)
        theta = trainer.executor.generate(prompts, trainer.settings)
        theta_scores = cache.submit(prompts, theta).result()
    every = {(p, r) for answers in [*responses, theta] for p, r in zip(prompts, answers, strict=True)}
    assert len(sent) == len(set(sent)) == len(every) < (len(members) + 1) * len(prompts)
    assert cache.metrics()["scoring/pairs_sent"] == len(every)
    for got, answers in zip([*scores, theta_scores], [*responses, theta], strict=True):
        direct = client.score(prompts, answers)
        assert got.rewards == direct.rewards and got.costs == direct.costs  # bit-equal floats


def test_resume_after_sigkill_is_bit_identical(toy_models, exact_scorer, tmp_path):
    scorer = exact_scorer
    cmd = [
        sys.executable, "-m", "alignment.es.train_es_alignment", "--policy_model_path", str(toy_models / "policy"),
        "--scorer_url", scorer.url, "--population_size", "4", "--batch_size", "6", "--num_iterations", "8",
        "--sigma", "0.02", "--alpha", "0.01", "--max_new_tokens", "10", "--eval_max_prompts", "4",
        "--save_every", "3", "--device", "cpu", "--dtype", "bf16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(
        [*cmd, "--experiment_dir", str(straight)], check=True, env=env, capture_output=True, timeout=600
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--experiment_dir", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = list(killed.glob("alignment_*/replay.jsonl"))
        if runs and len(ReplayLog(runs[0]).read()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = runs[0].parent
    assert len(ReplayLog(runs[0]).read()) < 8, "the run finished before it could be killed"
    subprocess.run([*cmd, "--resume", str(run_dir)], check=True, env=env, capture_output=True, timeout=600)

    a = final_weights(next(straight.iterdir()), 8)
    b = final_weights(run_dir, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scorer_outage_stops_with_a_checkpoint_and_resumes(toy_models, scorer_factory, tmp_path):
    proc = scorer_factory()
    cfg = es_config(toy_models, proc, tmp_path, num_iterations=40, save_every=100)
    run_dir = tmp_path / "run"
    executor = build_executor(cfg)
    budget = 3.0
    client = ScorerClient(proc.url, retry_budget=budget, backoff=0.05, max_backoff=0.5, timeout=10)
    trainer = ESTrainer(cfg, executor, client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4], run_dir)
    outcome: dict = {}

    def train() -> None:
        try:
            trainer.train()
        except BaseException as exc:  # inspected below
            outcome["error"], outcome["at"] = exc, time.monotonic()

    thread = threading.Thread(target=train)
    thread.start()
    while len(ReplayLog(run_dir / "replay.jsonl").read()) < 2:
        time.sleep(0.02)
    proc.kill()
    killed_at = time.monotonic()
    thread.join(timeout=300)
    error = outcome.get("error")
    assert isinstance(error, ScorerFailedError)  # a UserError: one line and exit 2 from the CLI
    # within the budget, plus the member being generated and the checkpoint write (seconds here)
    assert outcome["at"] - killed_at < budget + 30
    message = str(error)
    assert proc.url in message and "retry budget of 3s used up" in message
    assert f"resume with: python -m alignment.es.train_es_alignment --resume {run_dir}" in message
    committed = ReplayLog(run_dir / "replay.jsonl").read()
    assert f"iterations 0..{committed[-1].iteration} are kept" in message
    weights, state = load_latest(run_dir)
    assert state["iteration"] == committed[-1].iteration
    assert all(torch.equal(weights[k], v) for k, v in executor.state_dict().items())

    # a new scorer (new port, same toy models) and the run continues from its checkpoint
    again = scorer_factory()
    done = committed[-1].iteration
    cfg2 = es_config(toy_models, again, tmp_path, num_iterations=done + 3, save_every=100)
    resumed = ESTrainer(cfg2, build_executor(cfg2), ScorerClient(again.url), TOY_TRAIN_PROMPTS,
                        TOY_EVAL_PROMPTS[:4], run_dir)  # fmt: skip
    resumed.train()
    assert resumed.start_iteration == done + 1
    assert [e.iteration for e in ReplayLog(run_dir / "replay.jsonl").read()] == list(range(done + 3))


def test_ray_executor_matches_local_for_the_same_seeds(toy_models, exact_scorer, tmp_path, monkeypatch):
    scorer = exact_scorer
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    threads = torch.get_num_threads()
    # Ray gives each 1-CPU actor one OpenMP thread; the local engines get one too, so both sides
    # block their matmuls alike and the weights can be compared bit for bit
    torch.set_num_threads(1)
    try:
        local = es_config(toy_models, scorer, tmp_path / "local", num_iterations=3)
        remote = es_config(
            toy_models, scorer, tmp_path / "ray", num_iterations=3, executor="ray", num_engines=2
        )
        run_es(local)
        executor = build_executor(remote)
        try:
            client = ScorerClient(scorer.url)
            ESTrainer(
                remote, executor, client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:8], tmp_path / "ray"
            ).train()
            # two actors that disagree: no strict majority, so nothing is repaired and the run stops
            ray.get(executor.actors[1].apply_update.remote([99], [1.0], 0.01))
            sums = executor.checksums()
            with pytest.raises(EnginesDivergedError, match="no strict majority"):
                check_engines(executor, tmp_path / "ray", 3)
            assert executor.checksums() == sums
            assert (
                tmp_path / "ray" / "model_saves" / "diverged_iteration_3" / "engine_1.safetensors"
            ).is_file()
        finally:
            executor.close()
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
    a = final_weights(next((tmp_path / "local" / "runs").iterdir()), 3)
    b = final_weights(tmp_path / "ray", 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_lag_episode_window_gets_every_cost_in_member_order_and_resumes(toy_models, scorer, tmp_path):
    """λ sees each episode's cost (member by member, prompt by prompt), so safe-rlhf's episode window
    works in ES: a window of 20 cuts each iteration's 6 x 8 = 48 episodes, so the order matters."""
    from alignment.lagrange import LagrangeController

    def run(iterations: int) -> tuple[ESTrainer, list[list[float]]]:
        cfg = es_config(toy_models, scorer, tmp_path, num_iterations=iterations, lambda_adapt=True,
                        lambda_rule="ppo_lag", lambda_lr=0.2, episode_cost_window_size=20, save_every=100)  # fmt: skip
        trainer = ESTrainer(cfg, build_executor(cfg), ScorerClient(scorer.url), TOY_TRAIN_PROMPTS,
                            TOY_EVAL_PROMPTS[:4], tmp_path / "run")  # fmt: skip
        seen: list[list[float]] = []
        original = trainer.score_population

        def recording(*args, **kwargs):
            scores, responses, timings = original(*args, **kwargs)
            seen.append([c for s in scores for c in s.costs])
            return scores, responses, timings

        trainer.score_population = recording
        trainer.train()
        return trainer, seen

    first, costs = run(2)
    second, more = run(4)  # resumes after iteration 1: λ, its window and step count from the replay log
    assert second.start_iteration == 2 and len(costs) == 2 and len(more) == 2
    reference = LagrangeController(first.cfg.lagrange_config())
    entries = ReplayLog(tmp_path / "run" / "replay.jsonl").read()
    for step_costs, entry in zip(costs + more, entries, strict=True):
        assert len(step_costs) == 48
        reference.update_costs(step_costs)
        assert entry.lagrange == reference.state_dict()  # ln λ, window and steps: bit-equal
    assert len(entries[-1].lagrange["window"]) == 20 and reference.value != first.cfg.lambda_cost
