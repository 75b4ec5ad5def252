"""GRPO versus REINFORCE (with and without a baseline) for the persona reader, same sample budget.

    python bench/persona_rl.py                       # synthetic task, CPU, ~3 minutes on 2 cores
    python bench/persona_rl.py --seeds 0 1 2 3 4 --steps 200

Builds (or reuses) the toy task (alignment.persona.toy), trains one SFT checkpoint (the shared
start and the KL reference), then, for each seed, three RL runs from it that draw the same number
of sampled responses: GRPO with G = 4 on ``--batch`` rows per step, and REINFORCE on 4 × ``--batch``
rows per step (one response each) with the leave-one-out baseline and with none. Same reward
(F1 + ROUGE-L + BLEU), learning rate and steps. Reported on the held-out rows: the greedy reward,
the reward of one sampled response per row, and the KL of the final policy to the SFT reference
(exact, per token, on the greedy responses), mean ± std over seeds. The last line holds the three
methods side by side.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/persona_rl.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import cli
from alignment.persona.config import load_persona_config
from alignment.persona.demo import RECIPE, SFT_STEPS, _paths
from alignment.persona.toy import DEFAULT_OUT, build_persona_toy
from alignment.persona.trainer import train

logger = logging.getLogger("bench.persona_rl")

METHODS = {  # label -> options (besides batch size)
    "GRPO (G=4)": {"use_grpo": True, "grpo_group_size": 4},
    "REINFORCE+baseline": {"reinforce_baseline": "leave_one_out"},
    "REINFORCE": {"reinforce_baseline": "none"},
}


def _stat(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--models-dir", default=DEFAULT_OUT, help="the toy task (built there when missing)")
    p.add_argument("--runs-dir", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one RL run per method and seed")
    p.add_argument("--steps", type=int, default=100, help="RL steps per run")
    p.add_argument("--batch", type=int, default=2, help="GRPO rows per step (REINFORCE: 4x)")
    p.add_argument("--lr", type=float, default=3e-4, help="RL learning rate")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    toy = build_persona_toy(a.models_dir)
    runs = Path(a.runs_dir or tempfile.mkdtemp(prefix="persona-bench-"))
    shutil.rmtree(runs, ignore_errors=True)
    paths = _paths(toy, runs)
    sft = train(load_persona_config(RECIPE, {**paths, "name": "sft", "total_steps": SFT_STEPS,
                                             "eval_freq": SFT_STEPS, "save_freq": SFT_STEPS}))  # fmt: skip
    start = sft["eval"][-1]
    samples = a.steps * a.batch * 4
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in a.seeds:
        for label, opts in METHODS.items():
            batch = a.batch if opts.get("use_grpo") else 4 * a.batch
            cfg = load_persona_config(RECIPE, {
                **paths, **opts, "name": f"{''.join(c for c in label.lower() if c.isalnum())}-seed{seed}", "seed": seed,
                "model_path": sft["checkpoint"], "reader_rl_learning": True, "per_gpu_batch_size": batch,
                "lr": a.lr, "total_steps": a.steps, "eval_freq": a.steps, "save_freq": a.steps,
            })  # fmt: skip
            final = train(cfg)["eval"][-1]
            results[label].append(final)
            print(f"seed {seed} {label:20} reward {final['eval/reward']:.3f} sampled "
                  f"{final['eval/sampled_reward']:.3f} KL {final['eval/kl_to_reference']:.4f}", flush=True)  # fmt: skip
    if a.runs_dir is None:
        shutil.rmtree(runs, ignore_errors=True)
    print(
        f"\nheld-out rows: {load_count(paths['eval_data'])}; start (SFT, "
        f"{SFT_STEPS} steps): reward {start['eval/reward']:.3f}, sampled {start['eval/sampled_reward']:.3f}"
    )
    print(
        f"after {samples} sampled responses each ({a.steps} steps, lr {a.lr}, seeds {a.seeds}; GRPO makes "
        "2 clipped updates per batch):"
    )
    print(f"{'method':20} {'greedy reward':>16} {'sampled reward':>16} {'KL to SFT':>16}")
    for label, rows in results.items():
        print(f"{label:20} {_stat([r['eval/reward'] for r in rows]):>16} "
              f"{_stat([r['eval/sampled_reward'] for r in rows]):>16} "
              f"{_stat([r['eval/kl_to_reference'] for r in rows]):>16}")  # fmt: skip
    print(" | ".join(f"{label}: reward {_stat([r['eval/reward'] for r in rows])}, KL "
                     f"{_stat([r['eval/kl_to_reference'] for r in rows])}" for label, rows in results.items()))  # fmt: skip
    return 0


def load_count(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


if __name__ == "__main__":
    cli.run(main)
