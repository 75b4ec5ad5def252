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
(toy tokenizer; the same checkpoint serves as reward and cost model): scores are meaningless, the
cost of a forward pass is realistic. The last line printed is machine-readable and gives both
ratios (``ratio=`` uniform, ``mixed_ratio=`` mixed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

if importlib.util.find_spec("alignment") is None:  # `python bench/scorer_throughput.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_scorer
from alignment.toy.objective import random_response, sample_scoring_examples

logger = logging.getLogger("bench.scorer_throughput")

REPO = Path(__file__).resolve().parents[1]

BIG_SHAPES = {  # hidden, layers, heads, intermediate
    "1b": (2048, 16, 32, 5632),
    "7b": (4096, 32, 32, 11008),
}
Pairs = list[tuple[str, str]]


def build_models(shape: str, models_dir: Path) -> tuple[Path, Path]:
    """(reward, cost) checkpoint folders; builds what is missing, reuses what is there."""
    from alignment.toy.build import build_toy_models

    build_toy_models(models_dir)
    if shape == "toy":
        return models_dir / "reward", models_dir / "cost"
    out = models_dir / shape
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        logger.info("reusing the %s checkpoint in %s", shape, out)
        return out, out
    import shutil

    import torch
    from transformers import AutoTokenizer

    from alignment.scoring.score_model import LlamaForScore
    from alignment.toy.build import ToyShapes, llama_config
    from alignment.toy.writers import write_beaver_current

    hidden, layers, heads, inter = BIG_SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tokenizer")
    shapes = ToyShapes(hidden, heads, layers, inter, max_position_embeddings=4096)
    config = llama_config(
        shapes, tokenizer, architectures=["LlamaForScore"], score_dim=1, score_type="reward", score_bias=True
    )
    logger.info("building a random-initialised %s LlamaForScore (bf16) in %s", shape, out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise fp32 weights
    try:
        model = LlamaForScore(config).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_beaver_current(model, tokenizer, tmp)
    tmp.rename(out)
    logger.info("built %.2fB parameters in %.0f s", params / 1e9, time.perf_counter() - t0)
    return out, out


def drive(url: str, jobs: list[list[Pairs]]) -> float:
    """One thread per client sends its requests one after another; wall seconds from a common start."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def client(requests: list[Pairs]) -> None:
        with ScorerClient(url, retries=0) as c:
            barrier.wait()
            try:
                for pairs in requests:
                    scores = c.score([p for p, _ in pairs], [r for _, r in pairs])
                    assert len(scores) == len(pairs)
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(r,), daemon=True) for r in jobs]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}") from errors[0]
    return elapsed


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the ``scorer_requests_per_batch`` histogram."""
    wanted = ("scorer_requests_per_batch_sum", "scorer_requests_per_batch_count")
    values = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values[wanted[0]], values[wanted[1]]


def workload_pairs(workload: str, n: int, seed: int) -> Pairs:
    """``n`` (prompt, response) pairs of the named workload."""
    rows = sample_scoring_examples(n, seed=seed)
    if workload == "uniform":
        return [(p, r) for p, r, _, _ in rows]
    rng = random.Random(seed + 1)
    pairs = []
    for prompt, *_ in rows:
        words = int(2 ** rng.uniform(2, 10.5))  # 4 to ~1,450 words: a few to ~2,000 tokens
        pairs.append((prompt, random_response(rng, max_words=words, min_words=words)))
    return pairs


def run_mode(
    args: argparse.Namespace, batching: bool, models: tuple[Path, Path], tag: str, workload: str
) -> dict:
    mode = "on" if batching else "off"
    flags = ["--device", args.device, "--dtype", args.dtype, "--max-length", str(args.max_length)]
    flags += ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    if args.max_batch_tokens:
        flags += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.scorer_threads:
        flags += ["--num-threads", str(args.scorer_threads)]
    if not batching:
        flags.append("--no-batching")
    n = args.requests_per_client if workload == "uniform" else args.mixed_requests_per_client
    k = args.items_per_request
    pairs = workload_pairs(workload, args.clients * n * k, args.seed)
    jobs = [[pairs[(c * n + i) * k : (c * n + i + 1) * k] for i in range(n)] for c in range(args.clients)]
    logs = args.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with start_scorer(
        *models,
        address_file=logs / f"address-{tag}.json",
        extra_args=flags,
        log_file=logs / f"scorer-{tag}.log",
        timeout=args.start_timeout,
    ) as proc:
        drive(proc.url, [job[: args.warmup_requests] for job in jobs])  # warm-up, not timed
        before = batch_stats(proc.url)
        seconds = drive(proc.url, jobs)
        after = batch_stats(proc.url)
    batches = after[1] - before[1]
    per_batch = (after[0] - before[0]) / batches if batches else float("nan")
    result = {
        "workload": workload,
        "mode": mode,
        "seconds": seconds,
        "pairs": len(pairs),
        "pairs_per_s": len(pairs) / seconds,
        "requests_per_batch": per_batch,
    }
    logger.info(
        "%s, batching %-3s: %d pairs in %.2f s = %.2f pairs/s, %.2f requests per batch",
        workload,
        mode,
        len(pairs),
        seconds,
        result["pairs_per_s"],
        per_batch,
    )
    return result


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


def _summary(results: list[dict], workload: str) -> tuple[float, float, float]:
    on = [r["pairs_per_s"] for r in results if r["workload"] == workload and r["mode"] == "on"]
    off = [r["pairs_per_s"] for r in results if r["workload"] == workload and r["mode"] == "off"]
    merged = [r["requests_per_batch"] for r in results if r["workload"] == workload and r["mode"] == "on"]
    return statistics.median(on), statistics.median(off), statistics.median(merged)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - {"uniform", "mixed"}
    if unknown or not workloads:
        raise SystemExit(f"--workloads: unknown {sorted(unknown)}; use uniform and/or mixed")
    started = time.perf_counter()
    models = build_models(args.model_shape, args.models_dir)
    results: list[dict] = []
    for workload in workloads:
        for i in range(args.rounds):
            for batching in (True, False):
                tag = f"{workload}-{'on' if batching else 'off'}-{i + 1}"
                results.append(run_mode(args, batching, models, tag, workload))
    print(f"\nScorer throughput ({args.model_shape} models, device={args.device}, dtype={args.dtype})")
    print(
        f"  scorer threads: {args.scorer_threads or 'torch default'} (both modes); {args.rounds} round(s), median"
    )
    print(
        f"  batching on: --max-batch-size {args.max_batch_size} --max-batch-tokens {args.max_batch_tokens or 'default'}"
        f" --max-wait-ms {args.max_wait_ms:g}; off: --no-batching"
    )
    summary: dict[str, float] = {}
    for workload in workloads:
        n = args.requests_per_client if workload == "uniform" else args.mixed_requests_per_client
        on, off, merged = _summary(results, workload)
        print(
            f"  {workload}: {args.clients} clients x {n} requests x {args.items_per_request} pairs;"
            f" mean requests per batch with batching on: {merged:.2f}"
        )
        for r in results:
            if r["workload"] == workload:
                print(
                    f"    {r['mode']:<3} {r['pairs_per_s']:9.2f} pairs/s  {r['seconds']:7.2f} s"
                    f"  {r['requests_per_batch']:.2f} req/batch"
                )
        summary[workload] = on / off
        summary[f"{workload}_on"], summary[f"{workload}_off"] = on, off
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
