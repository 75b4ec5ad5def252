"""The embedded end-to-end run behind the README's main command (``make demo``).

Builds the tiny local models (no hub), starts the scorer service on a free local port, scores a
fixed prompt with contrasting responses over HTTP, trains the toy policy with ES
(``alignment/es/es_toy.yaml``), with low-rank (EGGROLL) ES (``alignment/es/es_toy_lowrank.yaml``)
and with GRPO (``alignment/grpo/grpo_toy.yaml``), reporting reward, cost and safety on held-out toy
prompts before and after each, classifies the base, ES, low-rank ES and GRPO policies into
safety/helpfulness quadrants with the evaluation pipeline (the same code as the cluster sweep),
then stops the scorer and draws the figures: reward–cost grid, safety ratios and
training curves.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from alignment import cli
from alignment.char_diffusion.demo import run_char_diffusion_demo
from alignment.config import load_config
from alignment.es.config import ESConfig
from alignment.es.train_es_alignment import run_es
from alignment.evaluation.classify_reward_cost_unified import run_sweep
from alignment.evaluation.sweep import SweepConfig, SweepModel
from alignment.grpo.config import load_grpo_config
from alignment.grpo.train_grpo_alignment import train_grpo
from alignment.persona.demo import persona_demo
from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_scorer
from alignment.scoring.test_score_fixed_prompt import FIXED_PROMPT, format_table, score_fixed_prompt
from alignment.toy.build import build_toy_models
from alignment.toy.objective import TOY_EVAL_PROMPTS
from alignment.visualization.plot_reward_cost_grid import load_grid_scores, plot_reward_cost_grid
from alignment.visualization.plot_safety_ratios import load_shares, plot_safety_ratios
from alignment.visualization.plot_training_curves import load_run, plot_training_curves
from alignment.visualization.style import save_figure

logger = logging.getLogger("alignment.demo")


ES_RECIPE = Path(__file__).parent / "es" / "es_toy.yaml"
ES_LOWRANK_RECIPE = Path(__file__).parent / "es" / "es_toy_lowrank.yaml"
GRPO_RECIPE = Path(__file__).parent / "grpo" / "grpo_toy.yaml"


def format_before_after(title: str, results: dict) -> str:
    before, after = results["before"], results["after"]
    rows = [
        f"{title} on {before['num_points']} held-out toy prompts",
        f"{'':8} {'reward':>8} {'cost':>8} {'safe %':>7}",
    ]
    for name, s in (("before", before), ("after", after)):
        rows.append(f"{name:8} {s['R_mean']:8.3f} {s['C_mean']:8.3f} {s['safe_ratio']:7.1f}")
    return "\n".join(rows)


def format_quadrants(summaries: dict[str, dict]) -> str:
    rows = [f"Quadrants on {next(iter(summaries.values()))['num_points']} held-out toy prompts (percent)",
            f"{'model':10} {'SH':>6} {'SU':>6} {'UH':>6} {'UU':>6} {'safe':>6}"]  # fmt: skip
    for name, s in summaries.items():
        p = s["percents"]
        rows.append(
            f"{name:10} {p['SH']:6.1f} {p['SU']:6.1f} {p['UH']:6.1f} {p['UU']:6.1f} {s['safe_ratio']:6.1f}"
        )
    return "\n".join(rows)


def draw_figures(comparisons: Path, models: list[str], runs: dict[str, str], out_dir: Path) -> list[Path]:
    """The demo's figures: reward–cost grid and safety bars of ``models``, curves of ``runs``."""
    return [
        save_figure(plot_reward_cost_grid(load_grid_scores(comparisons, models)),
                    out_dir / "reward_cost_scatter_grid.png"),
        save_figure(plot_safety_ratios(load_shares(comparisons, models)), out_dir / "model_safety_ratios.png"),
        save_figure(plot_training_curves([load_run(d, label) for label, d in runs.items()]),
                    out_dir / "training_curves.png"),
    ]  # fmt: skip


def run_demo(
    models_dir: str | Path = "models/toy", logs_dir: str | Path = "logs/demo",
    outputs_dir: str | Path = "alignment/outputs/demo",
) -> str:  # fmt: skip
    """Run the demo; returns the report it printed."""
    models_dir, logs_dir, outputs_dir = Path(models_dir), Path(logs_dir), Path(outputs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    threads = None
    if not torch.cuda.is_available():  # the scorer and the engine share the job's cores: split them
        threads = cli.configure_threads(per_process=max(1, cli.allotted_cpus() // 2))
    logger.info("building tiny local models in %s", models_dir)
    build_toy_models(models_dir)
    address_file = logs_dir / "scorer_address.json"
    log_file = logs_dir / "scorer_service.log"
    logger.info("starting the scorer service (log: %s)", log_file)
    with (
        start_scorer(
            models_dir / "reward", models_dir / "cost", address_file, log_file=log_file, num_threads=threads
        ) as proc,
        ScorerClient("auto", address_file=address_file, retries=2) as client,
    ):
        logger.info("scorer at %s: %s", proc.url, client.health())
        rows, scores = score_fixed_prompt(client)
        table = format_table(FIXED_PROMPT, rows, scores)
        logger.info("fixed prompt scored over HTTP:\n\n%s\n", table)
        es_cfg = load_config(ESConfig, ES_RECIPE, {
            "policy_model_path": str(models_dir / "policy"), "scorer_url": proc.url,
            "experiment_dir": str(logs_dir / "es"),
        })  # fmt: skip
        logger.info("ES on the toy objective (%s)", ES_RECIPE)
        es = run_es(es_cfg)
        es_table = format_before_after("ES", es)
        logger.info("ES result:\n\n%s\n", es_table)
        lowrank_cfg = load_config(ESConfig, ES_LOWRANK_RECIPE, {
            "policy_model_path": str(models_dir / "policy"), "scorer_url": proc.url,
            "experiment_dir": str(logs_dir / "es-lowrank"),
        })  # fmt: skip
        logger.info("low-rank (EGGROLL) ES on the toy objective (%s)", ES_LOWRANK_RECIPE)
        es_lowrank = run_es(lowrank_cfg)
        es_table += "\n\n" + format_before_after("Low-rank ES", es_lowrank)
        logger.info("low-rank ES result:\n\n%s\n", es_table)
        grpo_dir = logs_dir / "grpo" / time.strftime("run_%Y%m%d_%H%M%S")
        grpo_cfg = load_grpo_config(GRPO_RECIPE, {
            "model_name": str(models_dir / "policy"), "scorer_url": proc.url, "output_dir": str(grpo_dir),
        })  # fmt: skip
        logger.info("GRPO on the toy objective (%s)", GRPO_RECIPE)
        grpo = train_grpo(grpo_cfg)
        grpo_table = format_before_after("GRPO", {"before": grpo["eval"][0], "after": grpo["eval"][-1]})
        logger.info("GRPO result:\n\n%s\n", grpo_table)

        prompts_file = outputs_dir / "toy_eval_prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TOY_EVAL_PROMPTS))
        es_weights, lowrank_weights = (
            Path(run["run_dir"])
            / "model_saves"
            / f"final_model_iteration_{run['iterations']}"
            / "pytorch_model.pth"
            for run in (es, es_lowrank)
        )
        policy = str(models_dir / "policy")
        sweep = SweepConfig(
            models=[SweepModel("Toy-base", policy), SweepModel("Toy-ES", policy, es_checkpoint=str(es_weights)),
                    SweepModel("Toy-ES-LR", policy, es_checkpoint=str(lowrank_weights)),
                    SweepModel("Toy-GRPO", grpo["final_model"])],
            prompts=str(prompts_file), backend="transformers", dtype="fp32",
            max_new_tokens=es_cfg.max_new_tokens, output_dir=str(outputs_dir / "model_comparisons"),
        )  # fmt: skip
        logger.info("quadrant classification of the base, ES, low-rank ES and GRPO policies")
        quadrants = format_quadrants(run_sweep(sweep, client, overwrite=True))
        logger.info("quadrants:\n\n%s\n", quadrants)
    logger.info("scorer stopped")
    figures = draw_figures(Path(sweep.output_dir), [m.name for m in sweep.models],
                           {"ES": es["run_dir"], "ES low-rank": es_lowrank["run_dir"], "GRPO": str(grpo_dir)},
                           outputs_dir)  # fmt: skip
    where = "\n".join([
        f"Per-model files (points, npy, summaries, scatters): {sweep.output_dir}/",
        *(f"Figure: {f}" for f in figures),
        f"TensorBoard: tensorboard --logdir {logs_dir}   (then open http://localhost:6006)",
    ])  # fmt: skip
    persona = "\n".join(persona_demo(models_dir, logs_dir))  # LAPDOG-style persona dialogue: SFT, then GRPO
    diffusion = run_char_diffusion_demo(models_dir.parent / "char_diffusion", logs_dir / "char_diffusion")
    return "\n\n".join([table, es_table, grpo_table, quadrants, persona, "\n".join(diffusion), where])


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument(
        "--models-dir", default="models/toy", help="where the tiny models are built (reused when current)"
    )
    p.add_argument("--logs-dir", default="logs/demo", help="training runs and TensorBoard logs")
    p.add_argument("--outputs-dir", default="alignment/outputs/demo", help="evaluation files and figures")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    report = run_demo(a.models_dir, a.logs_dir, a.outputs_dir)
    print("\n" + report + "\n")
    return 0


if __name__ == "__main__":
    cli.run(main)
