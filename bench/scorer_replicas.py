"""Scorer throughput with 1 replica vs R replicas for the same concurrent load, side by side.

    python bench/scorer_replicas.py                      # toy models on CPU, 2 replicas, ~2 minutes
    python bench/scorer_replicas.py --replicas 4 --device cuda --reward-model M --cost-model M

R scorer replicas (``--scorer-threads`` torch threads each, default 1: on a CPU host one replica per
core) are started once and publish into one address directory. Each round drives the same load
(``--clients`` threads sharing one :class:`ScorerClient`, as the ES trainer's scoring threads do,
each sending ``--requests-per-client`` requests of ``--items-per-request`` pairs with answers of
about ``--words`` words) twice: through a client that knows only the first replica, then through a
client that finds all R in the directory and balances by outstanding requests. Rounds alternate
so that load from other processes hits both alike; the medians are compared. The client's spread
report shows each replica's share. The last line is machine-readable:
``scorer_replicas: ... replica_scaling=X`` (pairs/s of R replicas over pairs/s of one).

Target on 2 CPU cores with 2 replicas of one thread each: ``replica_scaling >= 1.6`` (the client
threads and HTTP share those cores; on GPUs, one replica per GPU, it should approach R).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/scorer_replicas.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_replicas
from alignment.toy.objective import random_response, sample_scoring_examples

logger = logging.getLogger("bench.scorer_replicas")

REPO = Path(__file__).resolve().parents[1]
Pairs = list[tuple[str, str]]


def make_load(args: argparse.Namespace) -> list[list[Pairs]]:
    """Per client, its requests: (prompt, answer of ``--words`` ± 50 % words) pairs."""
    n = args.clients * args.requests_per_client * args.items_per_request
    rows = sample_scoring_examples(n, seed=args.seed)
    rng = random.Random(args.seed + 1)
    pairs = []
    for prompt, *_ in rows:
        words = rng.randint(args.words // 2, args.words * 3 // 2)
        pairs.append((prompt, random_response(rng, max_words=words, min_words=words)))
    k, per = args.items_per_request, args.requests_per_client
    return [
        [pairs[(c * per + i) * k : (c * per + i + 1) * k] for i in range(per)] for c in range(args.clients)
    ]


def drive(client: ScorerClient, jobs: list[list[Pairs]]) -> float:
    """One thread per client sends its requests one after another; wall seconds from a common start."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def run(requests: list[Pairs]) -> None:
        barrier.wait()
        try:
            for pairs in requests:
                scores = client.score([p for p, _ in pairs], [r for _, r in pairs])
                if len(scores) != len(pairs):
                    raise RuntimeError(f"{len(scores)} scores for {len(pairs)} pairs")
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client thread(s) failed; first: {errors[0]!r}") from errors[0]
    return elapsed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--replicas", type=int, default=2, help="replicas compared with one")
    p.add_argument("--reward-model", default=None, help="default: the toy reward model (built if missing)")
    p.add_argument("--cost-model", default=None, help="default: the toy cost model")
    p.add_argument("--models-dir", type=Path, default=REPO / "bench/results/toy-models")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results/scorer-replicas", help="scorer logs")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (one shared client)")
    p.add_argument("--requests-per-client", type=int, default=12)
    p.add_argument("--items-per-request", type=int, default=8, help="(prompt, response) pairs per request")
    p.add_argument("--words", type=int, default=300, help="mean answer length in words")
    p.add_argument("--rounds", type=int, default=3, help="alternating 1-vs-R rounds; the median is reported")
    p.add_argument("--scorer-threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the replicas to load")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.replicas < 2:
        raise SystemExit("--replicas must be at least 2 (it is compared with one)")
    started = time.perf_counter()
    if args.reward_model and args.cost_model:
        models = (args.reward_model, args.cost_model)
    else:
        from alignment.toy.build import build_toy_models

        build_toy_models(args.models_dir)
        models = (args.models_dir / "reward", args.models_dir / "cost")
    directory = args.out_dir / "scorers"
    for stale in directory.glob("*.json"):
        stale.unlink()
    flags = ["--device", args.device, "--dtype", args.dtype, "--max-length", "2048"]
    procs = start_replicas(*models, directory, args.replicas, extra_args=flags, log_dir=args.out_dir,
                           timeout=args.start_timeout, num_threads=args.scorer_threads)  # fmt: skip
    jobs = make_load(args)
    pairs = sum(len(r) for job in jobs for r in job)
    results: dict[str, list[float]] = {"one": [], "all": []}
    spread: dict[str, dict[str, int]] = {}
    try:
        with ScorerClient(procs[0].url) as warm:  # first-request costs (allocations) untimed
            drive(warm, [job[:1] for job in jobs])
        for i in range(args.rounds):
            for mode in ("one", "all"):
                target = procs[0].url if mode == "one" else "auto"
                with ScorerClient(target, address_dir=directory, max_concurrency=args.clients) as client:
                    seconds = drive(client, jobs)
                    if mode == "all":
                        spread = client.spread()
                results[mode].append(pairs / seconds)
                logger.info("round %d, %s: %d pairs in %.2f s = %.1f pairs/s", i + 1,
                            "1 replica" if mode == "one" else f"{args.replicas} replicas", pairs, seconds,
                            pairs / seconds)  # fmt: skip
    finally:
        for proc in procs:
            proc.stop()
    # where the CPU went: if the client side took a large share, more replicas cannot help here
    client_cpu = sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
    scorer_cpu = sum(
        getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime")
    )
    one, many = statistics.median(results["one"]), statistics.median(results["all"])
    print(f"\nScorer replicas ({'given models' if args.reward_model else 'toy models'}, device={args.device}, "
          f"{args.scorer_threads} torch thread(s) per replica)")  # fmt: skip
    print(f"  load: {args.clients} client threads x {args.requests_per_client} requests x "
          f"{args.items_per_request} pairs, ~{args.words} words per answer; {args.rounds} round(s), median")  # fmt: skip
    print(f"  1 replica:  {', '.join(f'{x:.1f}' for x in results['one'])} pairs/s")
    print(f"  {args.replicas} replicas: {', '.join(f'{x:.1f}' for x in results['all'])} pairs/s")
    print(
        "  last round's spread: " + "; ".join(f"{url} {s['requests']} requests" for url, s in spread.items())
    )
    print(
        f"  CPU seconds: client process {client_cpu:.0f} (load threads, HTTP, JSON), replicas {scorer_cpu:.0f}"
    )
    print(f"  total bench time {time.perf_counter() - started:.0f} s")
    print(f"scorer_replicas: replicas={args.replicas} one={one:.1f} pairs/s all={many:.1f} pairs/s "
          f"replica_scaling={many / one:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
