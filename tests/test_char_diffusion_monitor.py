"""Judge-hacking watch, best/ checkpoint by held-out fill accuracy, and the judge's ranking of fills:
exact expectations on small cases, then a real GRPO run that games its judge."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignment.char_diffusion.checkpoint import read_checkpoint
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.monitor import BestKeeper, HackingWatch, fill_accuracies, pair_agreement
from alignment.char_diffusion.train_grpo import summary_lines, train_grpo
from alignment.config import load_config
from alignment.tracking import read_jsonl_metrics, read_tensorboard_scalars
from tests.conftest import REPO


def test_fill_accuracies_per_fill_of_each_block():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])  # N = 5
    draws = torch.tensor([[1, 3, 6, 0, 8], [0, 0, 6, 7, 8]])  # k = 2 fills, truth [1, 3, 6, 7, 8]
    acc = fill_accuracies(draws, tokens, mask)
    assert torch.equal(acc, torch.tensor([[2 / 2, 0 / 2], [2 / 3, 3 / 3]]))  # [B, k]


def test_pair_agreement_counts_informative_pairs_and_halves_ties():
    truth = torch.tensor([[0.0, 1.0, 1.0, 0.5]])
    # pairs differing in truth: (0,1) (0,2) (0,3) (1,3) (2,3); (1,2) is tied in truth and skipped
    assert pair_agreement(torch.tensor([[0.1, 0.9, 0.8, 0.5]]), truth) == (1.0, 5)
    assert pair_agreement(-torch.tensor([[0.1, 0.9, 0.8, 0.5]]), truth) == (0.0, 5)
    # a judge scoring every fill alike cannot rank: each pair counts one half
    assert pair_agreement(torch.zeros(1, 4), truth) == (0.5, 5)
    # scores 0,1 agree on (0,1) (0,2) (0,3); (1,3): 1 vs 0 with truth 1 > .5 agrees; (2,3): tie -> 1/2
    assert pair_agreement(torch.tensor([[0.0, 1.0, 0.5, 0.5]]), truth) == (4.5 / 5, 5)
    share, pairs = pair_agreement(torch.rand(2, 3), torch.ones(2, 3))
    assert pairs == 0 and share != share  # nan: nothing to rank


def test_hacking_watch_compares_with_the_most_accurate_evaluation():
    watch = HackingWatch(patience=2, tolerance=0.005)
    assert watch.update(0, 0.50, 0.40) is None
    assert watch.update(10, 0.55, 0.38) is None  # once: could be noise
    message = watch.update(20, 0.56, 0.39)  # accuracy recovered a little, still well below 0.40: flagged
    assert message is not None and message.startswith("judge hacking")
    assert "0.5000 -> 0.5600" in message and "0.4000 -> 0.3900" in message and "iteration 0" in message
    assert watch.update(30, 0.57, 0.38) is not None  # still in the streak: still flagged
    assert watch.update(40, 0.49, 0.38) is None  # reward below the reference's: not the pattern
    assert watch.update(50, 0.60, 0.397) is None  # within the tolerance of the best accuracy: noise
    assert watch.update(60, 0.60, 0.41) is None  # a new most accurate evaluation: the new reference
    assert watch.update(70, 0.61, 0.40) is None
    assert watch.update(80, 0.62, 0.40) is not None  # reward above and accuracy below 0.41, twice
    assert watch.flagged == [20, 30, 80]
    never = HackingWatch(patience=0)
    assert all(never.update(i, 0.1 * i, -0.1 * i) is None for i in range(5))


def test_hacking_watch_and_best_resume_mid_streak():
    seq = [(0, 0.5, 0.40), (1, 0.6, 0.45), (2, 0.7, 0.43), (3, 0.8, 0.42), (4, 0.9, 0.41)]
    whole, best = HackingWatch(2), BestKeeper()
    out_whole = [(whole.update(*e), best.improves(e[0], e[2], e[1])) for e in seq]
    first, best_a = HackingWatch(2), BestKeeper()
    out = [(first.update(*e), best_a.improves(e[0], e[2], e[1])) for e in seq[:3]]
    second, best_b = HackingWatch(), BestKeeper()
    second.load_state_dict(first.state_dict())
    best_b.load_state_dict(best_a.state_dict())
    out += [(second.update(*e), best_b.improves(e[0], e[2], e[1])) for e in seq[3:]]
    assert out == out_whole and second.flagged == whole.flagged == [3, 4]
    assert (best_b.iteration, best_b.accuracy) == (1, 0.45)
    tie = BestKeeper()
    assert tie.improves(0, 0.5, 0.1) and not tie.improves(5, 0.5, 0.9) and tie.iteration == 0


def _hacking_cfg(models: dict[str, str], out: Path, **extra) -> GRPOConfig:
    # The tiny judge ranks fills of one block worse than chance (pair agreement < 0.5: it was trained
    # for 20 steps), and a high learning rate with no KL lets the policy follow it: a real run that
    # games its judge, fast.
    return load_config(GRPOConfig, REPO / "alignment/char_diffusion/grpo.yaml", {
        "dataset": models["data"], "generator_checkpoint": models["generator"], "judge_checkpoint": models["judge"],
        "out_dir": str(out), "batch_size": 4, "gradient_accumulation_steps": 1, "group_size": 8, "max_iters": 6,
        "lr_decay_iters": 6, "warmup_iters": 0, "learning_rate": 1e-3, "kl_beta": 0.0, "eval_interval": 2,
        "eval_iters": 2, "eval_batch_size": 8, "save_interval": 3, "sample_interval": 0, **extra})  # fmt: skip


def test_grpo_that_games_its_judge_warns_and_keeps_the_best_policy(char_diffusion_models, tmp_path, caplog):
    out_dir = tmp_path / "hack"
    with caplog.at_level(logging.WARNING, logger="alignment.char_diffusion.train_grpo"):
        out = train_grpo(_hacking_cfg(char_diffusion_models, out_dir))
    evals = dict(out["evals"])
    assert sorted(evals) == [0, 2, 4, 6]
    assert (
        evals[6]["fill_accuracy"] < evals[0]["fill_accuracy"]
        and evals[6]["mean_reward"] > evals[0]["mean_reward"]
    )
    assert out["judge_hacking"], "reward up and accuracy down on consecutive evaluations must be flagged"
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("judge hacking")]
    assert len(warned) == len(out["judge_hacking"])
    # the tiny judge ranks fills below chance, and the run said so before training
    agreement = evals[0]["judge_pair_agreement"]
    quality = [r.getMessage() for r in caplog.records if "judge orders two fills" in r.getMessage()]
    assert agreement < 0.55 and len(quality) == 1 and f"only {agreement:.3f}" in quality[0]
    # TensorBoard: a 0/1 scalar at every evaluation and the warning as text where it fired
    scalars = dict(read_tensorboard_scalars(out_dir)["eval/judge_hacking"])
    assert (
        sorted(scalars) == [0, 2, 4, 6]
        and [s for s, v in scalars.items() if v == 1.0] == out["judge_hacking"]
    )
    assert {"eval/judge_pair_agreement", "eval/argmax_accuracy", "eval/entropy"} <= set(
        read_tensorboard_scalars(out_dir)
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {e.step for e in acc.Tensors("judge_hacking/text_summary")}
    assert texts == set(out["judge_hacking"])
    # best/ holds the most accurate evaluated policy: here the starting generator itself
    best_acc = max(e["fill_accuracy"] for e in evals.values())
    best_it = min(i for i, e in evals.items() if e["fill_accuracy"] == best_acc)
    best = read_checkpoint(out_dir / "best" / "ckpt.pt", "generator")
    assert best["iteration"] == best_it == out["best"]["iteration"]
    assert best["extra"]["eval"]["fill_accuracy"] == best_acc
    if best_it == 0:
        start = read_checkpoint(char_diffusion_models["generator"])["model"]
        assert all(torch.equal(best["model"][k], v) for k, v in start.items())
    lines = summary_lines(out)
    assert lines[-1].startswith("WARNING judge hacking") and f"best/ holds iteration {best_it}" in lines[-1]
    rows = [r for r in read_jsonl_metrics(out_dir / "metrics.jsonl") if "judge_pair_agreement" in r]
    assert len(rows) == 6 and all(
        r["judge_pair_agreement"] is None or 0 <= r["judge_pair_agreement"] <= 1 for r in rows
    )


def test_resumed_run_keeps_the_watch_and_best(char_diffusion_models, tmp_path):
    whole = train_grpo(_hacking_cfg(char_diffusion_models, tmp_path / "whole"))
    train_grpo(_hacking_cfg(char_diffusion_models, tmp_path / "part", max_iters=4))  # evaluations at 0, 2, 4
    resumed = train_grpo(_hacking_cfg(char_diffusion_models, tmp_path / "part"), resume=True)
    assert resumed["judge_hacking"] == whole["judge_hacking"] and resumed["best"] == whole["best"]
    assert [i for i, _ in resumed["evals"]] == [0, 2, 4, 6]
    for (i, a), (j, b) in zip(resumed["evals"], whole["evals"], strict=True):
        assert i == j and a == b  # bit-identical: resume on CPU continues exactly (same thread count)


def test_evaluate_command_scores_checkpoints_at_several_temperatures(char_diffusion_models, tmp_path, capsys):
    from alignment.char_diffusion.evaluate import main as evaluate_main

    m = char_diffusion_models
    config = tmp_path / "eval.yaml"
    # top_p 1: the entropy of softmax(z / T) rises with T, strictly unless all logits tie
    config.write_text(f"dataset: {m['data']}\njudge_checkpoint: {m['judge']}\ntop_p: 1.0\neval_iters: 1\n"
                      "eval_batch_size: 4\ngroup_size: 4\n")  # fmt: skip
    assert (
        evaluate_main(["--config", str(config), "--policy", m["generator"], "--temperature", "0.8", "0.4"])
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[1] for r in rows] == ["0.80", "0.40"]
    entropy = {r[1]: float(r[5]) for r in rows}
    assert entropy["0.40"] < entropy["0.80"]


def test_importing_char_diffusion_makes_openmp_wait_passively_unless_told(tmp_path):
    import os
    import subprocess
    import sys

    code = "import os, alignment.char_diffusion; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "ACTIVE"
