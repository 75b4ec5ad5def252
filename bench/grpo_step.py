"""Share of a GRPO step spent in the reward path: HTTP scoring versus the same models in-process.

    python bench/grpo_step.py                 # toy policy and toy scorer on CPU (about a minute)
    python bench/grpo_step.py --steps 20 --rounds 3 --json bench/results/grpo_step.json

Builds (or reuses) the toy models, starts the real scorer service on the toy reward/cost models,
then trains the toy policy with ``train_grpo`` and the ``grpo_toy.yaml`` hyper-parameters
(``--steps`` steps per run, no mid-run evaluation or checkpoints) in two modes, alternating for
``--rounds`` rounds:

- http: exactly what users run; ``ScorerReward`` scores through the scorer service;
- inprocess: the same ``ScorerReward`` object (truncation, λ, metrics) with its client swapped for a
  ``RewardCostScorer`` over the same toy models loaded in this process, so the difference between
  the two reward times is the cost of the service (HTTP, JSON, queueing), not of the models.

Both runs start from the same seed, so they see the same completions and their logged rewards should
agree. The bench hands ``train_grpo`` a timed wrapper of what the reward scores with, and a callback
timing each optimiser step from on_step_begin to on_step_end (generation, reward, loss, backward,
optimiser step). The first ``--warmup`` steps of each run are dropped. Target: the HTTP reward path takes at
most 10 % of the step. For a fair comparison run with OMP_NUM_THREADS=1 (the scorer uses
``--scorer-threads`` torch threads). The last line printed is machine-readable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/grpo_step.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.grpo.config import load_grpo_config
from alignment.grpo.timing import StepClock, TimedScorer
from alignment.grpo.train_grpo_alignment import train_grpo
from alignment.scoring.batcher import RewardCostScorer
from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_scorer
from alignment.scoring.score_model import load_score_model

logger = logging.getLogger("bench.grpo_step")

REPO = Path(__file__).resolve().parents[1]
MODES = ("http", "inprocess")


def run_once(args: argparse.Namespace, mode: str, tag: str, url: str, scorer: RewardCostScorer) -> dict:
    out = args.out_dir / tag
    cfg = load_grpo_config(
        args.config,
        {
            "model_name": str(args.models_dir / "policy"), "scorer_url": url, "output_dir": str(out),
            "max_steps": args.steps, "eval_every": 0, "save_steps": 10**6, "seed": args.seed,
        },
    )  # fmt: skip
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "runs")  # train_grpo only sets it when unset
    clock = StepClock()
    # RewardCostScorer.score returns rewards and costs like ScorerClient.score: the reward function
    # is the same object either way, only what it scores with changes
    inner = scorer if mode == "inprocess" else ScorerClient(url)
    t0 = time.perf_counter()
    result = train_grpo(cfg, client=TimedScorer(inner, clock), callbacks=[clock])
    seconds = time.perf_counter() - t0
    kept = clock.steps[args.warmup :]
    if not kept:
        raise RuntimeError(f"{tag}: {len(clock.steps)} step(s) timed, none left after the warm-up")
    if any(s["reward_calls"] != 1 for s in kept):
        logger.warning(
            "%s: steps with other than one reward call: %s", tag, [s["reward_calls"] for s in kept]
        )
    rewards = [h["reward"] for h in result["log_history"] if "reward" in h]
    trl_step = [h["step_time"] for h in result["log_history"] if "step_time" in h][args.warmup :]
    logger.info(
        "%s: step %.1f ms, reward %.1f ms (%d steps kept), run %.1f s",
        tag, 1e3 * statistics.fmean(s["step_s"] for s in kept),
        1e3 * statistics.fmean(s["reward_s"] for s in kept), len(kept), seconds,
    )  # fmt: skip
    return {"mode": mode, "tag": tag, "steps": kept, "rewards": rewards, "trl_step_time": trl_step,
            "run_s": seconds}  # fmt: skip


def pooled(runs: list[dict], mode: str, key: str) -> float:
    """Mean of ``key`` over the kept steps of every run of ``mode`` (seconds)."""
    return statistics.fmean(s[key] for r in runs if r["mode"] == mode for s in r["steps"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=REPO / "bench/results/toy-models")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results/grpo-step")
    p.add_argument("--config", type=Path, default=REPO / "alignment/grpo/grpo_toy.yaml")
    p.add_argument("--steps", type=int, default=12, help="GRPO steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    p.add_argument("--rounds", type=int, default=2, help="http/inprocess pairs of runs; steps are pooled")
    p.add_argument("--scorer-threads", type=int, default=1, help="torch CPU threads of the scorer")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the scorer to load")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    started = time.perf_counter()
    from alignment.toy.build import build_toy_models

    build_toy_models(args.models_dir)
    logs = args.out_dir / "scorer"
    logs.mkdir(parents=True, exist_ok=True)
    # the in-process twin of the service: same checkpoints, same defaults (dtype/device auto, max length 512, 32 rows)
    scorer = RewardCostScorer(
        load_score_model(str(args.models_dir / "reward")), load_score_model(str(args.models_dir / "cost"))
    )
    runs: list[dict] = []
    with start_scorer(
        args.models_dir / "reward", args.models_dir / "cost", address_file=logs / "address.json",
        log_file=logs / "scorer.log", timeout=args.start_timeout, num_threads=args.scorer_threads,
    ) as proc:  # fmt: skip
        for i in range(args.rounds):
            for mode in MODES:
                runs.append(run_once(args, mode, f"{mode}-{i + 1}", proc.url, scorer))

    step_http, step_local = pooled(runs, "http", "step_s"), pooled(runs, "inprocess", "step_s")
    reward_http, reward_local = pooled(runs, "http", "reward_s"), pooled(runs, "inprocess", "reward_s")
    share = reward_http / step_http
    ratio = reward_http / reward_local
    trl_step = statistics.fmean(t for r in runs if r["mode"] == "http" for t in r["trl_step_time"])
    # same seed, same completions: the logged rewards of paired runs should match (up to float noise)
    agree = max(
        abs(a - b)
        for h, p in zip(runs[0::2], runs[1::2], strict=True)
        for a, b in zip(h["rewards"], p["rewards"], strict=True)
    )
    kept = sum(len(r["steps"]) for r in runs if r["mode"] == "http")

    print(f"\nGRPO step breakdown (toy policy, {args.config.name}, {args.steps} steps per run, warm-up "
          f"{args.warmup} dropped, {args.rounds} round(s): {kept} steps kept per mode)")  # fmt: skip
    print(f"  {'':<26}{'http':>10}{'in-process':>12}")
    print(f"  {'step (ms)':<26}{1e3 * step_http:10.1f}{1e3 * step_local:12.1f}")
    print(f"  {'reward function (ms)':<26}{1e3 * reward_http:10.2f}{1e3 * reward_local:12.2f}")
    print(f"  {'reward share of step':<26}{100 * share:9.1f}%{100 * reward_local / step_local:11.1f}%")
    print(f"  HTTP overhead per step: {1e3 * (reward_http - reward_local):.2f} ms ({ratio:.2f}x in-process)")
    print(
        f"  TRL step_time (generation+loss+backward, no optimiser step), http runs: {1e3 * trl_step:.1f} ms"
    )
    print(f"  max |reward(http) - reward(in-process)| over logged steps: {agree:.2e}")
    verdict = "ok" if share <= 0.10 else "ABOVE TARGET"
    print(f"  reward path share of the step: {100 * share:.1f} % (target <= 10 %: {verdict})")
    print(f"  total bench time {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "config": {k: str(v) for k, v in vars(args).items()},
            "step_ms": {"http": 1e3 * step_http, "inprocess": 1e3 * step_local},
            "reward_ms": {"http": 1e3 * reward_http, "inprocess": 1e3 * reward_local},
            "reward_path_share": share, "ratio": ratio, "reward_agreement": agree, "runs": runs,
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"grpo_step: reward_path_share={100 * share:.1f}% http_reward_ms={1e3 * reward_http:.2f} "
          f"inprocess_reward_ms={1e3 * reward_local:.2f} step_ms={1e3 * step_http:.1f} ratio={ratio:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
