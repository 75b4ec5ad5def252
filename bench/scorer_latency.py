"""Latency of small requests behind big ones, and the scorer's memory for a big body, side by side.

    python bench/scorer_latency.py                 # tiny toy models on CPU (a few minutes)

Starts one scorer (toy models, default limits) and measures 1-item requests, sent one after
another, in three situations in the same run:

- ``alone``: nothing else queued;
- ``long rows``: while one request of 2,048 texts of ~512 tokens is being scored;
- ``48 MB``: from the moment one 48 MB request (4,096 texts of ~11,700 characters) is sent, through
  its parsing, tokenisation and scoring.

It reports p50/p99 of each, and the scorer's resident memory (Linux ``/proc``) before the 48 MB
request, at its peak (``VmHWM``, reset first) and a few seconds after its answer, as growth per MB
of body. Targets on 2 CPU cores with the toy models: p99 behind a big request < 1 s; peak growth
< 1 GB + 8x the body; back within 512 MB of the start a few seconds after. The last line is
``small_p99_behind_big_s=X rss_growth_per_body_mb=Y`` (peak growth per MB), then the other figures.
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

if importlib.util.find_spec("alignment") is None:  # `python bench/scorer_latency.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.scoring.launch import start_scorer
from alignment.toy.objective import random_response

logger = logging.getLogger("bench.scorer_latency")
REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> bool:
    """Reset the peak resident size of ``pid`` (Linux 4.0+); whether it could be."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def steps_started(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("scorer_merged_batch_items_count "):
            return float(line.split()[1])
    return 0.0


def small_latencies(url: str, until: threading.Event, n_max: int, gap_s: float) -> list[float]:
    """1-item requests one after another (a fresh text each) until ``until`` is set or ``n_max``."""
    out: list[float] = []
    with httpx.Client(timeout=600) as client:
        for k in range(n_max):
            if until.is_set():
                break
            t0 = time.perf_counter()
            r = client.post(f"{url}/score_texts", json={"texts": [f"small request {k}: check the guide"]})
            out.append(time.perf_counter() - t0)
            r.raise_for_status()
            time.sleep(gap_s)
    return out


def behind(url: str, body: bytes, wait_for_step: bool, n_max: int, gap_s: float) -> tuple[list[float], float]:
    """Latencies of small requests while ``body`` is being served; and that big request's own seconds."""
    done = threading.Event()
    big: dict[str, object] = {}

    def send_big() -> None:
        t0 = time.perf_counter()
        try:
            r = httpx.post(
                f"{url}/score_texts", content=body, headers={"content-type": "application/json"}, timeout=3600
            )
            big["status"], big["seconds"] = r.status_code, time.perf_counter() - t0
        finally:
            done.set()

    before = steps_started(url)
    thread = threading.Thread(target=send_big, daemon=True)
    thread.start()
    if wait_for_step:  # the queue holds the big request's rows: its scoring has begun
        while steps_started(url) == before and not done.is_set():
            time.sleep(0.05)
    else:
        time.sleep(0.2)  # the body is on its way: small requests meet its parsing and tokenisation
    latencies = small_latencies(url, done, n_max, gap_s)
    thread.join()
    if big.get("status") != 200:
        raise RuntimeError(f"the big request failed: {big}")
    if not done.is_set() or len(latencies) < 5:
        logger.warning("only %d small requests overlapped the big one", len(latencies))
    return latencies, float(big["seconds"])  # type: ignore[arg-type]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def texts_of(n: int, chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = random_response(rng, max_words=4000, min_words=4000)
    out = []
    for i in range(n):
        start = rng.randrange(len(words) // 2)
        text = f"text {i}: " + (words[start:] + words) * (1 + chars // len(words))
        out.append(text[:chars])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=REPO / "bench/results/toy-models")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results", help="scorer logs go here")
    p.add_argument("--scorer-threads", type=int, default=1, help="torch threads of the scorer")
    p.add_argument(
        "--long-rows", type=int, default=2048, help="texts of ~512 tokens in the first big request"
    )
    p.add_argument("--big-mb", type=float, default=48.0, help="size of the second big request's body")
    p.add_argument("--small", type=int, default=100_000, help="most small requests per situation")
    p.add_argument("--gap-ms", type=float, default=100.0, help="pause between small requests")
    p.add_argument("--settle-s", type=float, default=5.0, help="seconds after the big answer for final RSS")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from alignment.toy.build import build_toy_models

    build_toy_models(args.models_dir)
    (args.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    gap = args.gap_ms / 1000
    long_body = json.dumps({"texts": texts_of(args.long_rows, 2700, 1)}).encode()  # ~5.3 chars a toy token
    n_big = 4096
    big_body = json.dumps({"texts": texts_of(n_big, int(args.big_mb * MB / n_big) - 4, 2)}).encode()
    with start_scorer(
        args.models_dir / "reward",
        args.models_dir / "cost",
        args.out_dir / "logs/address-latency.json",
        extra_args=["--num-threads", str(args.scorer_threads)],
        log_file=args.out_dir / "logs/scorer-latency.log",
        timeout=600,
    ) as proc:
        pid, url = proc.popen.pid, proc.url
        small_latencies(url, threading.Event(), 5, 0.0)  # warm-up
        alone = small_latencies(url, threading.Event(), min(args.small, 40), gap)
        logger.info("alone: p50 %.3f s, p99 %.3f s", pct(alone, 0.5), pct(alone, 0.99))
        rows, rows_s = behind(url, long_body, True, args.small, gap)
        logger.info(
            "behind %d long rows: p99 %.3f s (big request %.1f s)", args.long_rows, pct(rows, 0.99), rows_s
        )
        time.sleep(args.settle_s)
        start = rss_mb(pid)
        peak_reset = reset_peak(pid)
        peak = [start]
        sampling = threading.Event()

        def sample() -> None:  # where the peak cannot be reset
            while not sampling.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        big, big_s = behind(url, big_body, False, args.small, gap)
        sampling.set()
        sampler.join()
        peak_mb = max(peak[0], rss_mb(pid, "VmHWM")) if peak_reset else peak[0]
        time.sleep(args.settle_s)
        final = rss_mb(pid)
        logger.info(
            "behind %.1f MB: p99 %.3f s (big request %.1f s)", len(big_body) / MB, pct(big, 0.99), big_s
        )
    body_mb = len(big_body) / MB
    print(f"\nScorer latency and memory (toy models, {args.scorer_threads} torch thread(s), 2-core host)")
    print(f"  {'1-item requests':<34} {'n':>4} {'p50 s':>8} {'p99 s':>8}   big request's own time")
    for name, lat, own in (
        ("alone", alone, None),
        (f"behind {args.long_rows} rows of ~512 tokens", rows, rows_s),
        (f"behind a {body_mb:.1f} MB request", big, big_s),
    ):
        tail = f"{own:.1f} s" if own is not None else ""
        print(f"  {name:<34} {len(lat):>4} {statistics.median(lat):>8.3f} {pct(lat, 0.99):>8.3f}   {tail}")
    growth, held = peak_mb - start, final - start
    print(
        f"  RSS for the {body_mb:.1f} MB body: start {start:.0f} MB, peak {peak_mb:.0f} MB (+{growth:.0f}), "
        f"{args.settle_s:g} s after {final:.0f} MB (+{held:.0f}); peak "
        f"{'VmHWM' if peak_reset else 'sampled every 20 ms'}"
    )
    print(f"  targets: p99 < 1 s; peak growth < {1024 + 8 * body_mb:.0f} MB; after < +512 MB")
    behind_p99 = max(pct(rows, 0.99), pct(big, 0.99))
    summary = {
        "small_p99_behind_big_s": behind_p99,
        "rss_growth_per_body_mb": growth / body_mb,
        "small_p99_alone_s": pct(alone, 0.99),
        "final_rss_growth_per_body_mb": held / body_mb,
        "body_mb": body_mb,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"small_p99_behind_big_s={behind_p99:.3f} rss_growth_per_body_mb={growth / body_mb:.2f}"
        f" small_p99_alone_s={summary['small_p99_alone_s']:.3f}"
        f" ratio_behind_vs_alone={behind_p99 / summary['small_p99_alone_s']:.1f}x"
        f" final_rss_growth_per_body_mb={held / body_mb:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
