"""The persona stage of ``make demo``: the synthetic task, SFT, then GRPO, on held-out rows.

    lines = persona_demo("models/toy", "logs/demo")      # also: python -m alignment.persona.demo

Builds the tiny reader, retriever and task (:mod:`alignment.persona.toy`), trains the reader by
teacher forcing (the SFT checkpoint) and then by GRPO from it, with the recipe
``alignment/persona/persona_toy.yaml``, and returns a table of the held-out evaluation before
training, after SFT and after GRPO, plus one example dialogue. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from alignment import cli
from alignment.persona.config import load_persona_config
from alignment.persona.data import load_examples
from alignment.persona.evaluate import format_records
from alignment.persona.toy import build_persona_toy
from alignment.persona.trainer import train

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).with_name("persona_toy.yaml")
SFT_STEPS, GRPO_STEPS = 250, 80


def _paths(toy: Path, runs: Path) -> dict[str, str]:
    return {
        "reader_model_type": str(toy / "reader"), "retriever_model_path": str(toy / "retriever"),
        "train_data": str(toy / "data" / "train.jsonl"), "eval_data": str(toy / "data" / "valid.jsonl"),
        "passages": str(toy / "data" / "passages.jsonl"), "checkpoint_dir": str(runs),
    }  # fmt: skip


def _row(name: str, m: dict) -> str:
    kl = m.get("eval/kl_to_reference")
    return (f"{name:22} {m['eval/reward']:7.3f} {m['eval/sampled_reward']:8.3f} {m['eval/f1']:6.3f} "
            f"{m['eval/rouge_l']:7.3f} {m['eval/bleu']:6.3f} {m['eval/em']:6.3f} {m['eval/distinct_2']:6.3f} "
            f"{'' if kl is None else f'{kl:7.3f}':>7}")  # fmt: skip


def persona_demo(models_dir: str | Path = "models/toy", logs_dir: str | Path = "logs/demo") -> list[str]:
    """Run the stage; returns the lines of its report."""
    toy = build_persona_toy(Path(models_dir) / "persona")
    runs = Path(logs_dir) / "persona"
    for name in ("sft", "grpo"):  # the demo's own runs: start them afresh
        shutil.rmtree(runs / name, ignore_errors=True)
    paths = _paths(toy, runs)
    logger.info("persona: SFT of the FiD reader (%d steps)", SFT_STEPS)
    sft = train(load_persona_config(RECIPE, {**paths, "name": "sft", "total_steps": SFT_STEPS,
                                             "eval_freq": SFT_STEPS, "save_freq": SFT_STEPS}))  # fmt: skip
    logger.info("persona: GRPO from the SFT checkpoint (%d steps)", GRPO_STEPS)
    grpo_cfg = load_persona_config(RECIPE, {
        **paths, "name": "grpo", "model_path": sft["checkpoint"], "reader_rl_learning": True, "use_grpo": True,
        "grpo_group_size": 4, "grpo_kl_coeff": 0.1, "per_gpu_batch_size": 8, "lr": 3e-4,
        "total_steps": GRPO_STEPS, "eval_freq": GRPO_STEPS, "save_freq": GRPO_STEPS,
    })  # fmt: skip
    grpo = train(grpo_cfg)
    example = format_records(grpo["step"], grpo["examples"][:1]).splitlines()[2:]
    n = len(load_examples(paths["eval_data"]))
    return [
        f"Persona dialogue (LAPDOG-style FiD reader) on {n} held-out rows of the synthetic task",
        f"{'':22} {'reward':>7} {'sampled':>8} {'F1':>6} {'ROUGE-L':>7} {'BLEU':>6} {'EM':>6} {'dist-2':>6} "
        f"{'KL ref':>7}",
        _row("untrained", sft["eval"][0]),
        _row(f"after SFT ({SFT_STEPS} steps)", sft["eval"][-1]),
        _row(f"after GRPO ({GRPO_STEPS} steps)", grpo["eval"][-1]),
        "(reward: greedy responses, F1 + ROUGE-L + BLEU in [0, 3]; sampled: one sampled response per row)",
        "A held-out dialogue after GRPO:",
        *(f"  {line}" for line in example),
        f"Runs (TensorBoard, metrics.jsonl, examples.log, checkpoints): {runs}/sft, {runs}/grpo",
    ]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--models-dir", default="models/toy", help="the toy is built in its persona/ folder")
    p.add_argument("--logs-dir", default="logs/demo", help="the runs go to its persona/ folder")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("\n".join(persona_demo(a.models_dir, a.logs_dir)))
    return 0


if __name__ == "__main__":
    cli.run(main)
