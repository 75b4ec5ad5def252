"""The scorer's throughput workloads, batching on vs off (``bench/scorer_throughput.py`` and the doctor).

Many clients (trainer ranks, generation engines) send a few (prompt, response) pairs at a time. The
service merges concurrent requests into length-sorted forward passes under a token budget;
:func:`measure_batching` starts the same scorer with batching on (its default flags) and with
``--no-batching``, drives each with ``clients`` concurrent client threads, and reports pairs/s per
mode (median over alternating rounds; each round's scorer serves every workload in turn) and the
requests merged per batch (from ``GET /metrics``), for two workloads:

- ``uniform``: short toy answers (up to 14 words), all of similar length;
- ``mixed``: answer lengths spread log-uniformly from a few to ~2,000 tokens, as RL generations are.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_scorer
from alignment.toy.objective import random_response, sample_scoring_examples

logger = logging.getLogger(__name__)
Pairs = list[tuple[str, str]]
WORKLOADS = ("uniform", "mixed")


@dataclass
class LoadSettings:
    clients: int = 16
    requests_per_client: int = 20  # uniform workload
    mixed_requests_per_client: int = 6
    items_per_request: int = 2
    warmup_requests: int = 2  # untimed requests per client first
    rounds: int = 3  # on/off rounds; the median is reported
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_length: int = 2048  # so that mixed answers are not cut
    max_batch_tokens: int | None = None  # the service's default
    device: str = "auto"
    dtype: str = "auto"
    scorer_threads: int = 1  # torch CPU threads of the scorer (0: torch's default)
    seed: int = 0
    start_timeout: float = 900.0


def workload_pairs(workload: str, n: int, seed: int) -> Pairs:
    """``n`` (prompt, response) pairs of the named workload."""
    rows = sample_scoring_examples(n, seed=seed)
    if workload == "uniform":
        return [(p, r) for p, r, _, _ in rows]
    if workload != "mixed":
        raise ValueError(f"unknown workload {workload!r}; use {' or '.join(WORKLOADS)}")
    rng = random.Random(seed + 1)
    pairs = []
    for prompt, *_ in rows:
        words = int(2 ** rng.uniform(2, 10.5))  # 4 to ~1,450 words: a few to ~2,000 tokens
        pairs.append((prompt, random_response(rng, max_words=words, min_words=words)))
    return pairs


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
                    if len(scores) != len(pairs):
                        raise RuntimeError(f"{len(pairs)} pairs sent, {len(scores)} scores back")
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


def scorer_flags(s: LoadSettings, batching: bool) -> list[str]:
    flags = ["--device", s.device, "--dtype", s.dtype, "--max-length", str(s.max_length)]
    flags += ["--max-batch-size", str(s.max_batch_size), "--max-wait-ms", str(s.max_wait_ms)]
    if s.max_batch_tokens:
        flags += ["--max-batch-tokens", str(s.max_batch_tokens)]
    if s.scorer_threads:
        flags += ["--num-threads", str(s.scorer_threads)]
    return flags if batching else [*flags, "--no-batching"]


def _jobs(s: LoadSettings, workload: str) -> tuple[int, list[list[Pairs]]]:
    """(pairs, requests per client) of ``workload``: every client's requests of ``items_per_request`` pairs."""
    n = s.requests_per_client if workload == "uniform" else s.mixed_requests_per_client
    k = s.items_per_request
    pairs = workload_pairs(workload, s.clients * n * k, s.seed)
    return len(pairs), [
        [pairs[(c * n + i) * k : (c * n + i + 1) * k] for i in range(n)] for c in range(s.clients)
    ]


def run_mode(
    s: LoadSettings,
    batching: bool,
    models: tuple[Path, Path],
    workloads: tuple[str, ...],
    logs: Path,
    tag: str,
) -> list[dict]:
    """One scorer started with batching on or off, driven by each workload in turn (its own warm-up
    first); pairs/s and requests merged per batch of each."""
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    with start_scorer(*models, address_file=logs / f"address-{tag}.json", extra_args=scorer_flags(s, batching),
                      log_file=logs / f"scorer-{tag}.log", timeout=s.start_timeout) as proc:  # fmt: skip
        for workload in workloads:
            pairs, jobs = _jobs(s, workload)
            drive(proc.url, [job[: s.warmup_requests] for job in jobs])  # warm-up, not timed
            before = batch_stats(proc.url)
            seconds = drive(proc.url, jobs)
            after = batch_stats(proc.url)
            batches = after[1] - before[1]
            result = {
                "workload": workload, "mode": "on" if batching else "off", "seconds": seconds, "pairs": pairs,
                "pairs_per_s": pairs / seconds,
                "requests_per_batch": (after[0] - before[0]) / batches if batches else float("nan"),
            }  # fmt: skip
            logger.info("%s, batching %-3s: %d pairs in %.2f s = %.2f pairs/s, %.2f requests per batch", workload,
                        result["mode"], pairs, seconds, result["pairs_per_s"], result["requests_per_batch"])  # fmt: skip
            results.append(result)
    return results


def measure_batching(
    s: LoadSettings, models: tuple[Path, Path], workloads: tuple[str, ...], logs: Path
) -> tuple[dict[str, float], list[dict]]:
    """Alternating on/off rounds (a scorer per mode and round, serving every workload); (summary, runs).
    The summary holds per workload the on/off ratio of the median pairs/s (``uniform`` is the
    bench's ``ratio``, ``mixed`` its ``mixed_ratio``), ``<workload>_on``/``_off`` (pairs/s) and
    ``<workload>_merged`` (requests per batch with batching on)."""
    runs: list[dict] = []
    for i in range(s.rounds):
        for batching in (True, False):
            runs += run_mode(s, batching, models, workloads, logs, f"{'on' if batching else 'off'}-{i + 1}")
    summary: dict[str, float] = {}
    for workload in workloads:
        mine = [r for r in runs if r["workload"] == workload]
        on = statistics.median(r["pairs_per_s"] for r in mine if r["mode"] == "on")
        off = statistics.median(r["pairs_per_s"] for r in mine if r["mode"] == "off")
        summary[workload], summary[f"{workload}_on"], summary[f"{workload}_off"] = on / off, on, off
        summary[f"{workload}_merged"] = statistics.median(
            r["requests_per_batch"] for r in mine if r["mode"] == "on"
        )
    return summary, runs
