"""The CPU recipe's plumbing at toy size: prepare once, pretrain + judge + GRPO per seed, the
before/after table, reuse of finished stages, and its command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment import cli
from alignment.char_diffusion.checkpoint import read_checkpoint
from alignment.char_diffusion.config import GRPOConfig, JudgeConfig, PretrainConfig
from alignment.char_diffusion.recipe import CPU_RECIPE, RecipeConfig, main, run_recipe
from alignment.config import load_config

# every stage a few steps on a 1-layer model: the plumbing, not the learning
TOY = {
    "block_size": 32,
    "train": {"n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 8, "max_iters": 6, "warmup_iters": 1,
              "eval_interval": 6, "eval_iters": 1, "save_interval": 3, "log_interval": 3},
    "judge": {"batch_size": 4, "fills_per_block": 2, "max_iters": 4, "warmup_iters": 1, "eval_interval": 4,
              "eval_iters": 1, "save_interval": 4, "log_interval": 2},
    "grpo": {"batch_size": 2, "gradient_accumulation_steps": 1, "group_size": 4, "max_iters": 4, "lr_decay_iters": 4,
             "warmup_iters": 1, "eval_interval": 2, "eval_iters": 1, "eval_batch_size": 4, "save_interval": 2,
             "sample_interval": 0},
}  # fmt: skip


def test_cpu_recipe_files_load():
    recipe = load_config(RecipeConfig, CPU_RECIPE)
    assert recipe.out.startswith("models/") and recipe.block_size == 64  # git-ignored, never the working tree
    for name, cls in (("train", PretrainConfig), ("judge", JudgeConfig), ("grpo", GRPOConfig)):
        load_config(cls, CPU_RECIPE.parent / f"{name}.yaml")  # unknown keys or bad values would raise


def test_recipe_runs_every_stage_per_seed_and_tabulates(char_diffusion_models, tmp_path):
    out = tmp_path / "recipe"
    overrides = {**TOY, "text": char_diffusion_models["text"], "out": str(out), "seeds": [3, 4]}
    result = run_recipe(CPU_RECIPE, overrides)
    for seed in (3, 4):
        root = out / f"seed{seed}"
        gen = read_checkpoint(root / "generator" / "ckpt.pt", "generator")
        assert (
            gen["iteration"] == 6
            and gen["config"]["seed"] == seed
            and gen["config"]["dataset"] == str(out / "data")
        )
        judge = read_checkpoint(root / "judge" / "ckpt.pt", "judge")
        assert judge["config"]["generator_checkpoint"] == str(root / "generator" / "ckpt.pt")
        grpo = read_checkpoint(root / "grpo" / "ckpt.pt", "generator")
        assert grpo["iteration"] == 4 and grpo["extra"]["judge_checkpoint"] == str(root / "judge" / "ckpt.pt")
        assert (root / "grpo" / "best" / "ckpt.pt").is_file()
    runs = {r["seed"]: r for r in result["runs"]}
    assert [i for i, _ in runs[3]["evals"]] == [0, 2, 4]
    # eval_seed of the recipe: the seeds' pretrained generators are scored on the same held-out blocks
    assert {r["seed"] for r in result["runs"]} == {3, 4} and all(r["judge_val"] for r in result["runs"])
    table = (out / "results.md").read_text(encoding="utf-8").splitlines()
    assert table == result["table"] and table[0].startswith("| seed | judge reward before")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["3", "4", "mean ± std"]
    before = runs[3]["evals"][0][1]["fill_accuracy"]
    assert f"{before:.4f}" in table[2]
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["seed"] for r in saved["runs"]] == [3, 4]

    # a second run reuses every finished stage: no stage trains again, same table
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/ckpt.pt")}
    again = run_recipe(CPU_RECIPE, overrides)
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/ckpt.pt")} == stamps
    assert again["table"] == result["table"]


def test_recipe_command_line_errors_are_one_line(tmp_path, capsys):
    for argv, fragment in (
        (["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "text not found"),
        (["--set", "gpro.kl_beta=0.1"], "the stages are train, judge, grpo"),
        (["--set", "grpo.kl_betta=0.1", "--text", str(Path(__file__))], "unknown key 'kl_betta'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli.run(main, argv, prog="recipe")
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and fragment in err[0], err
