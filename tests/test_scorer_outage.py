"""ES and GRPO against scorer replicas and scorer outages: a replica SIGKILLed mid-run changes nothing;
a whole outage stops the run within the retry budget with every finished iteration or step kept, a
message naming the host and the way to resume (ES's outage: tests/test_es_trainer.py)."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from alignment.es.checkpoint import ReplayLog
from alignment.es.train_es_alignment import build_executor
from alignment.es.trainer import ESTrainer
from alignment.grpo.config import load_grpo_config
from alignment.grpo.train_grpo_alignment import ScorerStoppedError, train_grpo
from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_replicas
from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS
from tests.conftest import REPO
from tests.test_es_trainer import es_config, final_weights


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_es_on_three_replicas_one_killed_mid_run_equals_a_single_scorer(toy_models, exact_scorer, tmp_path):
    """The local version of the SLURM scenario: 3 one-row-per-forward replicas found through their
    address directory (``--scorer_url auto``), one SIGKILLed after the first iteration; the run
    finishes with the scores and weights of a run against a single scorer (equal by construction:
    each text is scored alone, whichever replica scores it)."""
    small = dict(num_iterations=3, population_size=4, batch_size=6, max_new_tokens=8, save_every=100)

    def run(cfg, client, run_dir, during=None):
        trainer = ESTrainer(
            cfg, build_executor(cfg), client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:6], run_dir
        )
        thread = threading.Thread(target=during, daemon=True) if during else None
        if thread:
            thread.start()
        result = trainer.train()
        if thread:
            thread.join(timeout=60)
        return result

    single_dir = tmp_path / "single"
    single = run(
        es_config(toy_models, exact_scorer, tmp_path, **small), ScorerClient(exact_scorer.url), single_dir
    )

    directory = tmp_path / "scorers"
    procs = start_replicas(toy_models / "reward", toy_models / "cost", directory, 3,
                           extra_args=["--max-batch-size", "1"], log_dir=tmp_path)  # fmt: skip
    victim = procs[2]
    replica_dir = tmp_path / "replicas"
    cfg = es_config(toy_models, exact_scorer, tmp_path, scorer_url="auto", scorer_address_dir=str(directory),
                    scorer_retries=None, **small)  # fmt: skip
    client = cfg.scorer_client()

    def kill_after_first_iteration() -> None:
        while not ReplayLog(replica_dir / "replay.jsonl").read():
            time.sleep(0.02)
        victim.kill()

    try:
        replicated = run(cfg, client, replica_dir, kill_after_first_iteration)
        spread = client.spread()
    finally:
        client.close()
        for proc in procs:
            proc.stop()
    assert victim.popen.returncode is not None and spread[victim.url]["failures"] >= 1
    assert all(spread[p.url]["requests"] > 0 for p in procs)
    assert replicated["before"] == single["before"] and replicated["after"] == single["after"]
    keys = ("train/reward_mean", "train/cost_mean", "lambda/value")
    assert [[m.get(k) for k in keys] for m in _metrics(replica_dir)] == [
        [m.get(k) for k in keys] for m in _metrics(single_dir)
    ]
    a, b = final_weights(single_dir, 3), final_weights(replica_dir, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _KillAt(TrainerCallback):
    """SIGKILLs the scorer at the end of optimiser step ``step``."""

    def __init__(self, proc, step: int) -> None:
        self.proc, self.step = proc, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.proc.kill()
        return control


def test_grpo_outage_saves_the_finished_steps_and_resumes_from_them(
    toy_models, scorer_factory, scorer, tmp_path
):
    proc = scorer_factory()
    out = tmp_path / "run"

    def recipe(url: str, steps: int):
        overrides = {"model_name": str(toy_models / "policy"), "scorer_url": url, "output_dir": str(out),
                     "max_steps": steps, "save_steps": 100, "eval_every": 0, "eval_max_prompts": 4,
                     "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
                     "scorer_retry_budget_s": 2.0, "lambda_adapt": True}  # fmt: skip
        return load_grpo_config(REPO / "alignment" / "grpo" / "grpo_toy.yaml", overrides)

    started = time.monotonic()
    with pytest.raises(ScorerStoppedError) as err:
        train_grpo(recipe(proc.url, 6), callbacks=[_KillAt(proc, 2)])
    assert time.monotonic() - started < 120
    checkpoint = out / "checkpoint-2"
    message = str(err.value)
    assert proc.url in message and "GRPO stopped in step 3" in message
    assert f"--resume {checkpoint}" in message
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    saved_lambda = state["stateful_callbacks"]["LagrangeCallback"]["attributes"]["lagrange_state"]
    assert saved_lambda["steps"] == 2  # λ as it was after the second step, not touched by the third

    result = train_grpo(recipe(scorer.url, 3), resume=str(checkpoint))  # the scorer is back (another one)
    logged = {h["step"]: h["lambda/value"] for h in result["log_history"] if "lambda/value" in h}
    assert sorted(logged) == [1, 2, 3] and result["lambda"]["steps"] == 3  # steps 1-2 from the checkpoint
    assert logged[3] == pytest.approx(math.exp(saved_lambda["log_lambda"]), rel=1e-6)  # resumed with its λ


def test_a_scorer_failure_on_one_rank_stops_every_rank(tmp_path):
    """GRPO's reward shares a rank's scorer failure with the others (a real 2-process gloo group),
    so no rank is left waiting in TRL's reward gather while the failed one saves and exits."""
    import multiprocessing

    from tests.agree_worker import agree_worker

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=agree_worker, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[1] for r in results] == [None, None]  # no failure anywhere: nobody stops
    assert [r[2] for r in results] == ["ScorerError", "ScorerError"]
    assert results[0][3] == "the scorer failed on rank 1: scorer at http://node7:8000 unavailable"
    assert results[1][3] == "scorer at http://node7:8000 unavailable"
