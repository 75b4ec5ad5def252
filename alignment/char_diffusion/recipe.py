"""The whole character-diffusion pipeline on one text, for one or more seeds, and its before/after table.

    python -m alignment.char_diffusion.recipe                       # the CPU recipe on Tiny Shakespeare
    python -m alignment.char_diffusion.recipe --seeds 1 2 3 --text input.txt
    python -m alignment.char_diffusion.recipe --set train.max_iters=20 judge.max_iters=5 grpo.max_iters=4

A recipe is a folder holding ``recipe.yaml`` (:class:`RecipeConfig`: the text, block size, seeds,
output folder) and one YAML per stage: ``train.yaml`` (pretraining), ``judge.yaml``, ``grpo.yaml``.
The text is prepared once into ``<out>/data``; then, for each seed, the generator
(``<out>/seed<N>/generator``), the judge (``.../judge``) and GRPO (``.../grpo``) are trained with that
seed, each stage resuming its own ``ckpt.pt`` when it was interrupted and skipped when it is
complete. GRPO's held-out evaluations use ``eval_seed`` (the same blocks and draws for every
seed), so the seeds' before/after figures are paired. The table (per seed, then mean ± standard
deviation over the seeds) is printed and written to ``<out>/results.md`` and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment import cli
from alignment.atomic import write_text
from alignment.char_diffusion.checkpoint import CKPT_NAME, read_checkpoint
from alignment.char_diffusion.config import GRPOConfig, JudgeConfig, PretrainConfig
from alignment.char_diffusion.data import META_FILE
from alignment.char_diffusion.prepare import prepare
from alignment.char_diffusion.train import pretrain
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.char_diffusion.train_judge import train_judge
from alignment.cli import UserError
from alignment.config import field_help, load_config, parse_overrides
from alignment.tracking import read_jsonl_metrics

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
CPU_RECIPE = HERE / "cpu" / "recipe.yaml"
STAGES = {"train": PretrainConfig, "judge": JudgeConfig, "grpo": GRPOConfig}


@dataclass
class RecipeConfig:
    """``recipe.yaml``: what the pipeline runs on and where it writes; the stages' YAMLs sit beside it."""

    text: str = field(
        default="../shared/reference/tiny_shakespeare/input.txt", metadata=field_help("UTF-8 text")
    )
    out: str = field(default="models/char_diffusion/cpu", metadata=field_help("data, seeds' models, results"))
    block_size: int = 64
    val_fraction: float = 0.1
    seeds: list[int] = field(default_factory=lambda: [1])


def _done(out_dir: Path, max_iters: int) -> bool:
    path = out_dir / CKPT_NAME
    return path.is_file() and read_checkpoint(path)["iteration"] >= max_iters


def _prepared(data: Path, text: Path, block_size: int) -> bool:
    meta_path = data / META_FILE
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta.get("source") == str(text) and meta.get("block_size") == block_size


def stage_configs(
    recipe_dir: Path, data: Path, root: Path, seed: int, overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The three stages' configs of one seed, writing under ``root``."""
    paths = {s: root / s for s in ("generator", "judge", "grpo")}
    common = {"dataset": str(data), "seed": seed}
    cfgs = {
        "train": load_config(PretrainConfig, recipe_dir / "train.yaml",
                             {**common, "out_dir": str(paths["generator"]), **overrides.get("train", {})}),
        "judge": load_config(JudgeConfig, recipe_dir / "judge.yaml",
                             {**common, "out_dir": str(paths["judge"]), **overrides.get("judge", {}),
                              "generator_checkpoint": str(paths["generator"] / CKPT_NAME)}),
        "grpo": load_config(GRPOConfig, recipe_dir / "grpo.yaml",
                            {**common, "out_dir": str(paths["grpo"]), **overrides.get("grpo", {}),
                             "generator_checkpoint": str(paths["generator"] / CKPT_NAME),
                             "judge_checkpoint": str(paths["judge"] / CKPT_NAME)}),
    }  # fmt: skip
    return cfgs


def run_seed(cfgs: dict[str, Any], seed: int) -> dict[str, Any]:
    """Pretrain, judge and GRPO for one seed (each reused when complete, resumed when interrupted);
    returns GRPO's evaluations, the stages' validation figures and their wall times."""
    seconds: dict[str, float] = {}
    load: dict[
        str, list[float]
    ] = {}  # 1-minute load average before and after each stage: how busy the machine was
    results: dict[str, Any] = {}
    for stage, fn in (("train", pretrain), ("judge", train_judge), ("grpo", train_grpo)):
        cfg = cfgs[stage]
        out_dir = Path(cfg.out_dir)
        if stage != "grpo" and _done(out_dir, cfg.max_iters):
            logger.info("seed %d: %s is complete in %s, reused", seed, stage, out_dir)
            continue
        # an interrupted stage resumes; a complete GRPO run resumed at max_iters trains nothing and
        # returns its stored evaluations
        resume = (out_dir / CKPT_NAME).is_file()
        start, load_before = time.perf_counter(), os.getloadavg()[0]
        results[stage] = fn(cfg, resume=resume)
        seconds[stage] = time.perf_counter() - start
        load[stage] = [load_before, os.getloadavg()[0]]
    grpo = results["grpo"]
    return {"seed": seed, "evals": grpo["evals"], "best": grpo["best"], "judge_hacking": grpo["judge_hacking"],
            "generator_val": _last_val(Path(cfgs["train"].out_dir)), "judge_val": _last_val(Path(cfgs["judge"].out_dir)),
            "seconds": seconds, "load": load, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # fmt: skip


def _last_val(out_dir: Path) -> dict[str, float]:
    """The last ``val/*`` figures a supervised stage logged to its ``metrics.jsonl``."""
    rows = [r for r in read_jsonl_metrics(out_dir / "metrics.jsonl") if "val/loss" in r]
    return {k.removeprefix("val/"): v for k, v in rows[-1].items() if k.startswith("val/")} if rows else {}


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def results_table(runs: list[dict[str, Any]]) -> list[str]:
    """Held-out judge reward and fill accuracy before (the pretrained generator) and after GRPO, per
    seed and as mean ± std (sample standard deviation over the seeds)."""
    head = "| seed | judge reward before | after | fill accuracy before | after | change | best (iteration) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    cols: dict[str, list[float]] = {"rb": [], "ra": [], "ab": [], "aa": [], "d": []}
    for run in runs:
        before, after = run["evals"][0][1], run["evals"][-1][1]
        d = after["fill_accuracy"] - before["fill_accuracy"]
        for key, v in zip(cols, (before["mean_reward"], after["mean_reward"], before["fill_accuracy"],
                                 after["fill_accuracy"], d), strict=True):  # fmt: skip
            cols[key].append(v)
        flag = " judge hacking flagged" if run["judge_hacking"] else ""
        lines.append(f"| {run['seed']} | {before['mean_reward']:.4f} | {after['mean_reward']:.4f} | "
                     f"{before['fill_accuracy']:.4f} | {after['fill_accuracy']:.4f} | {d:+.4f} | "
                     f"{run['best']['accuracy']:.4f} ({run['best']['iteration']}){flag} |")  # fmt: skip
    if len(runs) > 1:
        lines.append("| mean ± std | " + " | ".join(_mean_std(cols[k]) for k in ("rb", "ra", "ab", "aa"))
                     + f" | {statistics.mean(cols['d']):+.4f} ± {statistics.stdev(cols['d']):.4f} | |")  # fmt: skip
    return lines


def run_recipe(recipe: str | Path = CPU_RECIPE, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the recipe at ``recipe`` (its ``recipe.yaml``) with ``overrides`` (``{"text": ...,
    "seeds": [...], "train": {...}, "judge": {...}, "grpo": {...}}``); returns the runs and the table."""
    recipe = Path(recipe)
    overrides = dict(overrides or {})
    stage_overrides = {s: overrides.pop(s) for s in list(overrides) if s in STAGES}
    for stage, values in stage_overrides.items():
        if not isinstance(values, dict):
            raise UserError(f"--set {stage}.KEY=VALUE: {stage} takes keys of its YAML, got {values!r}")
    cfg = load_config(RecipeConfig, recipe, overrides)
    text = Path(cfg.text)
    if not text.is_file():
        raise UserError(f"text not found: {text} (give --text FILE; Tiny Shakespeare is nanoGPT's "
                        f"data/shakespeare_char/input.txt)")  # fmt: skip
    out = Path(cfg.out)
    data = out / "data"
    # every config is checked before anything is written
    cfgs = {
        seed: stage_configs(recipe.parent, data, out / f"seed{seed}", seed, stage_overrides)
        for seed in cfg.seeds
    }
    if not _prepared(data, text, cfg.block_size):
        prepare(text, data, block_size=cfg.block_size, val_fraction=cfg.val_fraction)
    runs = [run_seed(cfgs[seed], seed) for seed in cfg.seeds]
    table = results_table(runs)
    write_text(out / "results.md", "\n".join(table) + "\n")
    write_text(out / "results.json", json.dumps({"recipe": str(recipe), "config": cfg.__dict__, "runs": runs},
                                                indent=1) + "\n")  # fmt: skip
    return {"runs": runs, "table": table, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--recipe", default="cpu",
                   help="a recipe folder of alignment/char_diffusion/ (cpu) or the path of a recipe.yaml")  # fmt: skip
    p.add_argument("--text", help="UTF-8 text to train on (default: the recipe's)")
    out = p.add_argument("--out", help="output folder (default: the recipe's)")
    out.config_default = RecipeConfig.out  # what applies unless the recipe or the flag says otherwise
    p.add_argument(
        "--seeds", type=int, nargs="+", help="seeds to run, each a whole pipeline (default: the recipe's)"
    )
    p.add_argument("--set", nargs="+", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage's YAML (train, judge, grpo), e.g. grpo.kl_beta=0.05")  # fmt: skip
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(a.set)
    unknown = sorted(set(overrides) - set(STAGES))
    if unknown:
        raise UserError(f"--set {unknown[0]}...: the stages are {', '.join(STAGES)}")
    for key in ("text", "out", "seeds"):
        if getattr(a, key) is not None:
            overrides[key] = getattr(a, key)
    start = time.perf_counter()
    recipe = (
        HERE / a.recipe / "recipe.yaml" if (HERE / a.recipe / "recipe.yaml").is_file() else Path(a.recipe)
    )
    result = run_recipe(recipe, overrides)
    print("\n".join(result["table"]))
    for run in result["runs"]:
        if run["judge_hacking"]:
            print(
                f"WARNING judge hacking flagged for seed {run['seed']} at iterations {run['judge_hacking']}"
            )
    print(f"results: {result['out']}/results.md  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    cli.run(main)
