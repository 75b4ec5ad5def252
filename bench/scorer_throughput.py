"""Throughput of the scorer service with cross-request batching on and off, side by side.

    python bench/scorer_throughput.py                    # tiny toy models on CPU (a few minutes)
    python bench/scorer_throughput.py --model-shape 1b --device cuda --dtype bf16   # on a GPU

Many clients (trainer ranks, generation engines) send a few (prompt, response) pairs at a time. The
published study's service scored every request as its own forward pass; ours merges concurrent
requests (``BatchScheduler``) into length-sorted forward passes under a token budget. This script
starts the same scorer with batching on (default flags) and with ``--no-batching``, drives each with
``--clients`` concurrent client threads, and reports pairs/s per mode (median over ``--rounds``
alternating on/off rounds) and the mean number of requests merged per batch (from ``GET /metrics``),
for two workloads:

- ``uniform``: short toy answers (up to 14 words), all of similar length;
- ``mixed``: answer lengths spread log-uniformly from a few to ~2,000 tokens, as RL generations
  are; here padding to the longest row made the earlier row-count batching slower than none.

Goal: batching is never slower than off, and at least 3x on the mixed workload (on a GPU, where a
forward pass of many rows costs little more than one; on CPU the work grows with the rows).

``--model-shape 1b|7b`` builds a randomly initialised ``LlamaForScore`` of Llama-1B/7B shape in bf16
(:mod:`alignment.toy.shapes`; toy tokenizer; the same checkpoint serves as reward and cost model): scores are meaningless, the
cost of a forward pass is realistic. The last line printed is machine-readable and gives both
ratios (``ratio=`` uniform, ``mixed_ratio=`` mixed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/scorer_throughput.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.doctor.scorer_load import WORKLOADS, LoadSettings, measure_batching

logger = logging.getLogger("bench.scorer_throughput")

REPO = Path(__file__).resolve().parents[1]


def build_models(shape: str, models_dir: Path, device: str = "auto") -> tuple[Path, Path]:
    """(reward, cost) checkpoint folders; builds what is missing (:mod:`alignment.toy.shapes`)."""
    from alignment.toy.build import build_toy_models
    from alignment.toy.shapes import build_random_score_model

    build_toy_models(models_dir)
    if shape == "toy":
        return models_dir / "reward", models_dir / "cost"
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    out = build_random_score_model(shape, models_dir, device="cuda" if on_gpu else "cpu")
    return out, out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=["toy", "1b", "7b"], default="toy")
    p.add_argument("--models-dir", type=Path, default=REPO / "bench/results/toy-models")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results", help="scorer logs go here")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (threads)")
    p.add_argument(
        "--client-processes", type=int, default=4, help="load processes the clients are spread over"
    )
    p.add_argument("--requests-per-client", type=int, default=20, help="uniform workload")
    p.add_argument("--mixed-requests-per-client", type=int, default=6, help="mixed workload")
    p.add_argument("--workloads", default="uniform,mixed", help="comma-separated: uniform, mixed")
    p.add_argument("--items-per-request", type=int, default=2, help="(prompt, response) pairs per request")
    p.add_argument("--warmup-requests", type=int, default=2, help="untimed requests per client first")
    p.add_argument("--rounds", type=int, default=3, help="on/off rounds; the median is reported")
    p.add_argument(
        "--scorer-threads",
        type=int,
        default=1,
        help="torch CPU threads of the scorer, the same in both modes (0: torch's default); the "
        "client threads run on the same cores, and idle OpenMP threads spinning beside them slow both",
    )
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-length", type=int, default=2048, help="so that mixed answers are not cut")
    p.add_argument(
        "--max-batch-tokens", type=int, default=None, help="default: the service's (GPU 16384, CPU 1024)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a scorer to load")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown or not workloads:
        raise SystemExit(f"--workloads: unknown {sorted(unknown)}; use uniform and/or mixed")
    started = time.perf_counter()
    models = build_models(args.model_shape, args.models_dir, args.device)
    settings = LoadSettings(**{f.name: getattr(args, f.name) for f in fields(LoadSettings)})
    summary, results = measure_batching(settings, models, tuple(workloads), args.out_dir / "logs")
    print(f"\nScorer throughput ({args.model_shape} models, device={args.device}, dtype={args.dtype})")
    print(
        f"  scorer threads: {args.scorer_threads or 'torch default'} (both modes); {args.rounds} round(s), median"
    )
    print(
        f"  batching on: --max-batch-size {args.max_batch_size} --max-batch-tokens {args.max_batch_tokens or 'default'}"
        f" --max-wait-ms {args.max_wait_ms:g}; off: --no-batching"
    )
    for workload in workloads:
        n = args.requests_per_client if workload == "uniform" else args.mixed_requests_per_client
        print(
            f"  {workload}: {args.clients} clients x {n} requests x {args.items_per_request} pairs;"
            f" mean requests per batch with batching on: {summary[f'{workload}_merged']:.2f}"
        )
        for r in results:
            if r["workload"] == workload:
                print(
                    f"    {r['mode']:<3} {r['pairs_per_s']:9.2f} pairs/s  {r['seconds']:7.2f} s"
                    f"  {r['requests_per_batch']:.2f} req/batch"
                )
    print(f"  total bench time {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"config": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    parts = []
    if "uniform" in summary:
        parts.append(
            f"batching_on={summary['uniform_on']:.2f} pairs/s batching_off={summary['uniform_off']:.2f} pairs/s"
            f" ratio={summary['uniform']:.2f}x"
        )
    if "mixed" in summary:
        parts.append(
            f"mixed_on={summary['mixed_on']:.2f} pairs/s mixed_off={summary['mixed_off']:.2f} pairs/s"
            f" mixed_ratio={summary['mixed']:.2f}x"
        )
    print("scorer_throughput: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
