"""GRPO on TRL end to end with the tiny models and a real scorer process."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import ConfigError
from alignment.grpo.best import rank_key
from alignment.grpo.config import load_grpo_config
from alignment.grpo.train_grpo_alignment import grpo_args, parse_args, train_grpo
from alignment.scoring.client import ScorerUnavailableError
from tests.conftest import REPO

TOY_RECIPE = REPO / "alignment" / "grpo" / "grpo_toy.yaml"


def toy_cfg(toy_models, url, out, **overrides):
    base = {"model_name": str(toy_models / "policy"), "scorer_url": url, "output_dir": str(out), "max_steps": 3,
            "save_steps": 100, "eval_every": 0, "eval_max_prompts": 6, "per_device_train_batch_size": 16,
            "max_completion_length": 12, "scorer_retries": 1}  # fmt: skip
    return load_grpo_config(TOY_RECIPE, {**base, **overrides})


def test_recipes_load_and_unknown_keys_are_named(tmp_path):
    cfg = load_grpo_config(REPO / "alignment" / "grpo" / "grpo_alignment.yaml")
    assert cfg.beta == 0.05 and cfg.extra["warmup_steps"] == 0.03  # a GRPOConfig field passes through
    bad = tmp_path / "bad.yaml"
    bad.write_text("lamda_lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'lamda_lr' in .*bad.yaml.*'lambda_lr'"):
        load_grpo_config(bad)
    with pytest.raises(ConfigError, match="'num_generation'"):
        load_grpo_config(TOY_RECIPE, ["num_generation=4"])


def test_grpo_config_gets_the_recipe_and_cpu_settings(toy_models, tmp_path):
    cfg = toy_cfg(toy_models, "http://127.0.0.1:1", tmp_path, beta=0.1, warmup_steps=0.2)
    args = grpo_args(cfg)
    assert (args.beta, args.warmup_steps, args.max_steps, args.num_generations) == (0.1, 0.2, 3, 8)
    assert args.use_cpu and not args.bf16 and args.restore_callback_states_from_checkpoint
    assert args.generation_kwargs["stop_strings"][0] == "USER:"


def test_command_line_takes_flags_and_key_value_overrides(tmp_path):
    cfg, resume = parse_args(["--config", str(TOY_RECIPE), "--max_steps", "3", "lambda_lr=0.2", "--warmup_steps",
                              "0.2", "--no_lambda_adapt", "--beta", "0.1", "beta=0.3", "--resume", "latest"])  # fmt: skip
    assert (cfg.max_steps, cfg.lambda_lr, cfg.lambda_adapt, resume) == (3, 0.2, False, "latest")
    assert cfg.extra == {"warmup_steps": 0.2}  # a GRPOConfig field without a flag of ours
    assert cfg.beta == 0.3  # key=value beats --key value
    assert cfg.model_name == "models/toy/policy" and cfg.eval_every == 20  # the recipe's values stay
    with pytest.raises(ConfigError, match="unknown key 'warmup_stepz'.*'warmup_steps'"):
        parse_args(["--warmup_stepz", "0.2"])


def test_best_evaluation_ranking_is_the_constrained_order():
    def ev(r, c, safe=50.0):
        return {"R_mean": r, "C_mean": c, "safe_ratio": safe}

    # d = -0.1: the constraint is E[C] <= 0.1
    evals = [ev(3.0, 0.5), ev(1.0, 0.1), ev(2.0, 0.05), ev(-1.0, -2.0), ev(5.0, 0.2)]
    order = sorted(range(5), key=lambda i: rank_key(evals[i], "constrained", -0.1), reverse=True)
    # feasible by reward (2.0, 1.0, -1.0), then infeasible by violation (0.1 before 0.4)
    assert order == [2, 1, 3, 4, 0]
    assert max(range(5), key=lambda i: rank_key(evals[i], "reward", -0.1)) == 4
    assert rank_key(ev(0.0, 9.0, 100.0), "safe_ratio", 0.0) > rank_key(ev(9.0, 0.0, 99.0), "safe_ratio", 0.0)
    with pytest.raises(ValueError, match="best_by"):
        rank_key(ev(0, 0), "loss", 0.0)


def test_few_steps_end_to_end_with_lambda_logged_and_evaluated(toy_models, scorer, tmp_path):
    out = tmp_path / "run"
    result = train_grpo(toy_cfg(toy_models, scorer.url, out, eval_every=2, lambda_adapt=True, save_steps=1))
    steps = [h for h in result["log_history"] if "lambda/value" in h]
    assert len(steps) == 3
    assert len({round(h["lambda/value"], 9) for h in steps}) > 1  # λ moved, once per step
    assert {"scorer/reward_mean", "scorer/cost_mean", "scorer/safe_ratio"} <= set(steps[0])
    evals = [json.loads(x) for x in (out / "eval_results.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert set(evals[-1]["counts"]) == {"SH", "SU", "UH", "UU"} and evals[-1]["num_points"] == 6
    assert (out / "final" / "model.safetensors").is_file()
    assert any((out / "runs").rglob("events.out.tfevents*"))

    # best/: the model of the best evaluation by the constrained order, beside final/
    cfg = load_grpo_config(out / "config.yaml")  # the recipe as run, written by train_grpo
    assert cfg.eval_every == 2 and cfg.output_dir == str(out)
    best = json.loads((out / "best" / "best.json").read_text())
    winner = max(evals, key=lambda e: rank_key(e, "constrained", cfg.cost_threshold_d))  # the first of ties
    assert best["eval"] == winner == result["best_eval"] and best["step"] == winner["step"]
    # the weights of that step: the initial policy at step 0, else that step's checkpoint (saved from
    # the same parameters on the same step, so equal bit for bit)
    step = best["step"]
    source = toy_models / "policy" if step == 0 else out / f"checkpoint-{step}"
    saved, kept = load_file(source / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert (out / "best" / "tokenizer.json").is_file() and not (out / ".best.tmp").exists()


def test_resume_restores_lambda_and_its_ema(toy_models, scorer, tmp_path):
    out = tmp_path / "run"
    first = train_grpo(toy_cfg(toy_models, scorer.url, out, max_steps=2, save_steps=2, lambda_adapt=True))
    saved = first["lambda"]
    assert saved["steps"] == 2 and (out / "checkpoint-2").is_dir()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["LagrangeCallback"]["attributes"]["lagrange_state"] == saved

    resumed = train_grpo(
        toy_cfg(toy_models, scorer.url, out, max_steps=3, lambda_adapt=True), resume="latest"
    )
    step3 = [h for h in resumed["log_history"] if "lambda/value" in h and h.get("step") == 3]
    # the λ used in the first resumed step is the λ saved with the checkpoint
    assert step3 and step3[0]["lambda/value"] == pytest.approx(math.exp(saved["log_lambda"]), rel=1e-6)
    assert resumed["lambda"]["steps"] == 3
    # best/ survives the resume: replaced only by a better evaluation
    d = resumed["lambda"]["config"]["cost_threshold_d"]
    assert rank_key(resumed["best_eval"], "constrained", d) >= rank_key(first["best_eval"], "constrained", d)


def test_scorer_failure_stops_training(toy_models, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ScorerUnavailableError, match=f"127.0.0.1:{port}"):
        train_grpo(toy_cfg(toy_models, f"http://127.0.0.1:{port}", tmp_path / "run"))


def test_study_recipe_has_the_study_values_and_the_default_says_where_it_differs():
    study = load_grpo_config(REPO / "alignment" / "grpo" / "grpo_alignment_study.yaml")
    default = load_grpo_config(REPO / "alignment" / "grpo" / "grpo_alignment.yaml")
    differ = ("lambda_pos_cost_only", "num_generations", "temperature", "loss_type", "learning_rate")
    assert [getattr(study, k) for k in differ] == [True, 30, 0.7, "grpo", 5e-6]
    assert [getattr(default, k) for k in differ] == [False, 8, 1.0, "dapo", 1e-6]
    assert (study.max_completion_length, study.max_steps, study.use_vllm, study.cost_threshold_d) == (
        512,
        1000,
        False,
        0.0,
    )
    assert study.extra == {"lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 42}
    # the study's step: 1 answer per GPU × 4 GPUs × 15 accumulation steps = 2 prompts × 30 answers
    assert (
        study.per_device_train_batch_size * 4 * study.gradient_accumulation_steps == 2 * study.num_generations
    )
    # TRL accepts it (one process here, so the accumulation that gives the same 60 answers per step)
    args = grpo_args(load_grpo_config(REPO / "alignment" / "grpo" / "grpo_alignment_study.yaml",
                                      {"gradient_accumulation_steps": 60}))  # fmt: skip
    assert (args.loss_type, args.lr_scheduler_type, args.seed, args.generation_batch_size) == (
        "grpo",
        "constant",
        42,
        60,
    )
    text = (REPO / "alignment" / "grpo" / "grpo_alignment.yaml").read_text()
    for study_value in ("[true]", "[30]", "[0.7]", "[grpo]", "[5e-6]"):  # each departure is explained
        assert study_value in text
