"""The ConvAI2 offline recipe: prepare the rows, then for each seed SFT, and GRPO and REINFORCE from
that SFT checkpoint; held-out F1 / ROUGE-L / BLEU of all three over the seeds, with sample replies.

    python -m alignment.persona.recipe                      # ../shared/reference/convai2/valid.jsonl
    python -m alignment.persona.recipe --seeds 0 --sft_steps 50 --rl_steps 10      # a pilot
    python -m alignment.persona.recipe --set retriever_model_path=models/my-encoder

Runs ``alignment/persona/persona_convai2_offline.yaml`` (``--config``) with ``--set key=value``
overrides for every run; the data, the stand-in corpus and the reader come from
:mod:`alignment.persona.prepare` (made when ``--prepared`` has no PREPARED.json). Every run is an
ordinary run folder under ``--runs_dir`` (TensorBoard, metrics.jsonl, examples.log, checkpoints);
``REPORT.md`` there holds the tables (mean ± std over seeds, and per seed) and sample replies.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from alignment import cli
from alignment.atomic import write_text
from alignment.config import parse_overrides
from alignment.persona.config import load_persona_config

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).with_name("persona_convai2_offline.yaml")
REFERENCE_DATA = "../shared/reference/convai2/valid.jsonl"
METRICS = (("F1", "eval/f1"), ("ROUGE-L", "eval/rouge_l"), ("BLEU", "eval/bleu"), ("reward", "eval/reward"),
           ("sampled", "eval/sampled_reward"), ("dist-2", "eval/distinct_2"), ("KL ref", "eval/kl_to_reference"))  # fmt: skip
# RL settings: GRPO samples G responses per row, so REINFORCE gets G times the rows per step (the
# same number of sampled responses per step, as bench/persona_rl.py compares them)
GROUP = 4
RL = {
    "grpo": {"use_grpo": True, "grpo_group_size": GROUP, "grpo_kl_coeff": 0.1},
    "reinforce": {"reinforce_baseline": "leave_one_out"},
}


def _stat(values: list[float]) -> str:
    """mean ± sample std over seeds; one value as it is."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _table(rows: dict[str, list[dict]], keys) -> list[str]:
    out = ["| | " + " | ".join(k for k, _ in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, evals in rows.items():
        cells = [_stat([e[m] for e in evals]) if all(m in e for e in evals) else "" for _, m in keys]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _report(cfg, info: dict, results: dict[str, list[dict]], samples: dict[str, list[dict]],
            seconds: dict[str, list[float]], seeds: list[int], steps: tuple, wall: float) -> str:  # fmt: skip
    """REPORT.md: the set-up, mean ± std over ``seeds``, per seed, and sample replies."""
    sft_steps, rl_steps, rl_batch, rl_lr = steps
    lines = [
        f"ConvAI2 offline recipe: {info['rows']['train']} training rows of {info['personas']['train']} personas; "
        f"held-out evaluation on {cfg.eval_max_examples or info['rows']['valid']} rows of "
        f"{info['personas']['valid']} unseen personas (greedy replies). Corpus: {info['corpus']}.",
        f"Reader: {info['reader']['parameters'] / 1e6:.2f} M parameters, vocabulary {info['reader']['vocab']}; "
        f"retriever {cfg.retriever_model_path} (frozen), {cfg.n_context} passages read.",
        f"SFT {sft_steps} steps × {cfg.per_gpu_batch_size} rows; GRPO (G = {GROUP}) on {rl_batch} rows and "
        f"REINFORCE (leave-one-out baseline) on {GROUP * rl_batch} rows per step, {rl_steps} steps, lr {rl_lr}; "
        f"seeds {seeds}. Wall time {wall / 60:.1f} min "
        f"(SFT {_stat(seconds['SFT'])} s, GRPO {_stat(seconds['GRPO'])} s, "
        f"REINFORCE {_stat(seconds['REINFORCE'])} s per run).",
        "",
        "Mean ± std over seeds:",
        "",
        *_table(results, METRICS),
        "",
        "Per seed:",
        "",
        *_table(
            {
                f"{label} seed {seed}": [e]
                for label, evals in results.items()
                if label != "untrained"
                for seed, e in zip(seeds, evals, strict=True)
            },
            METRICS,
        ),  # fmt: skip
        "",
        f"Sample replies (seed {seeds[0]}, the first held-out rows):",
        "",
    ]
    for i, first in enumerate(samples["SFT"]):
        lines += [f"- context: {first['context'][-160:]}", f"  - gold: {first['gold']}"]
        lines += [f"  - {label}: {samples[label][i]['response']}" for label in ("SFT", "GRPO", "REINFORCE")]
    return "\n".join(lines) + "\n"


def run_recipe(
    runs: str | Path, prepared: str | Path, seeds: list[int], sft_steps: int, rl_steps: int,
    config: str | Path = RECIPE, overrides: dict | None = None, data: str | Path | None = None,
    rl_batch: int = 4, rl_lr: float = 3e-4,
) -> str:  # fmt: skip
    """Run everything; returns the report (also written to ``runs/REPORT.md``)."""
    from alignment.persona.prepare import prepare
    from alignment.persona.trainer import train

    runs, prepared = Path(runs), Path(prepared)
    t0 = time.monotonic()
    if not (prepared / "PREPARED.json").is_file():
        if data is None:
            raise cli.UserError(f"{prepared} is not prepared: pass --data (LAPDOG-format rows)")
        prepare(data, prepared)
    info = json.loads((prepared / "PREPARED.json").read_text(encoding="utf-8"))
    paths = {"reader_model_type": str(prepared / "reader"), "train_data": str(prepared / "data" / "train.jsonl"),
             "eval_data": str(prepared / "data" / "valid.jsonl"),
             "passages": str(prepared / "data" / Path(info["passages"]).name),  # wherever prepare ran
             "checkpoint_dir": str(runs), "save_index_path": str(runs / "index")}  # fmt: skip
    # (one index cache for all runs: keyed by the retriever's weights and the corpus, so shared safely)
    base = {**paths, **(overrides or {})}
    results: dict[str, list[dict]] = {"untrained": [], "SFT": [], "GRPO": [], "REINFORCE": []}
    samples: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {"SFT": [], "GRPO": [], "REINFORCE": []}
    for seed in seeds:
        for name in (f"sft-seed{seed}", f"grpo-seed{seed}", f"reinforce-seed{seed}"):
            shutil.rmtree(runs / name, ignore_errors=True)  # the recipe's own runs start afresh
        start = time.monotonic()
        sft = train(load_persona_config(config, {**base, "name": f"sft-seed{seed}", "seed": seed,
                                                 "total_steps": sft_steps, "eval_freq": sft_steps,
                                                 "save_freq": sft_steps}))  # fmt: skip
        seconds["SFT"].append(time.monotonic() - start)
        results["untrained"].append(sft["eval"][0])
        results["SFT"].append(sft["eval"][-1])
        samples.setdefault("SFT", sft["examples"])
        for label, opts in (("GRPO", RL["grpo"]), ("REINFORCE", RL["reinforce"])):
            batch = rl_batch if label == "GRPO" else GROUP * rl_batch
            start = time.monotonic()
            out = train(load_persona_config(config, {
                **base, **opts, "name": f"{label.lower()}-seed{seed}", "seed": seed, "model_path": sft["checkpoint"],
                "reader_rl_learning": True, "per_gpu_batch_size": batch, "lr": rl_lr, "scheduler": "fixed",
                "warmup_steps": 0, "total_steps": rl_steps, "eval_freq": rl_steps, "save_freq": rl_steps,
                "log_freq": min(rl_steps, 10), "eval_at_start": False,  # its start is the SFT's last evaluation
            }))  # fmt: skip
            seconds[label].append(time.monotonic() - start)
            results[label].append(out["eval"][-1])
            samples.setdefault(label, out["examples"])
        done = seeds[: seeds.index(seed) + 1]  # the report so far: an interrupted recipe keeps its seeds
        report = _report(load_persona_config(config, base), info, results, samples, seconds, done,
                         (sft_steps, rl_steps, rl_batch, rl_lr), time.monotonic() - t0)  # fmt: skip
        write_text(runs / "REPORT.md", report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument(
        "--data", default=REFERENCE_DATA, help="LAPDOG-format rows, prepared when --prepared is not"
    )
    p.add_argument("--prepared", default="models/persona-convai2", help="alignment.persona.prepare's output")
    p.add_argument("--runs_dir", default="logs/persona-convai2-offline", help="run folders and REPORT.md")
    p.add_argument("--config", default=str(RECIPE), help="the recipe YAML every run starts from")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one SFT → GRPO, REINFORCE per seed"
    )
    p.add_argument("--sft_steps", type=int, default=300, help="SFT steps per seed")
    p.add_argument("--rl_steps", type=int, default=50, help="GRPO and REINFORCE steps per seed")
    p.add_argument("--rl_batch", type=int, default=4, help="GRPO rows per step (REINFORCE: 4x)")
    p.add_argument("--rl_lr", type=float, default=3e-4, help="RL learning rate")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run_recipe(a.runs_dir, a.prepared, a.seeds, a.sft_steps, a.rl_steps, a.config, parse_overrides(a.set),
                     a.data, a.rl_batch, a.rl_lr), end="")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(main)
