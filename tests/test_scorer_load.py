"""The scorer under heavy and mixed load: token-budget forward passes, fair interleaving of big and
small requests, abandoned work dropped, a bounded queue. Real service over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest

from alignment.scoring.batcher import PAD_SLACK, plan_forwards
from alignment.scoring.client import ScorerClient
from tests.raw_http import connect, send_request
from tests.test_scorer_service import metric


def until(condition, what: str, limit: float = 60.0) -> None:
    """Wait for ``condition()`` (a synchronisation point, not a timing claim)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def test_plan_forwards_covers_every_row_within_the_bounds():
    rng = random.Random(0)
    lengths = [int(2 ** rng.uniform(3, 11)) for _ in range(300)]
    passes = plan_forwards(lengths, max_rows=32, max_tokens=8192, max_padding=0.25)
    assert sorted(i for p in passes for i in p) == list(range(300))
    for p in passes:
        width, rows = max(lengths[i] for i in p), len(p)
        assert rows <= 32
        assert rows == 1 or rows * width <= 8192
        padding = rows * width - sum(lengths[i] for i in p)
        assert padding <= max(0.25 * rows * width, PAD_SLACK * rows)
    assert plan_forwards([5000, 3], max_rows=4, max_tokens=100) == [[1], [0]]  # too long: alone
    assert plan_forwards([], 4, 100) == []


def test_mixed_lengths_are_scored_in_passes_of_bounded_padding(scorer):
    rng = random.Random(1)
    texts = [" then check the guide" * int(2 ** rng.uniform(0, 5.5)) for _ in range(40)]
    before = httpx.get(f"{scorer.url}/metrics").text
    together = httpx.post(f"{scorer.url}/score_texts", json={"texts": texts}, timeout=60).json()
    after = httpx.get(f"{scorer.url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    real, padding = (
        delta("scorer_forward_tokens_total", kind="real"),
        delta("scorer_forward_tokens_total", kind="padding"),
    )
    rows = delta("scorer_forward_batch_rows_sum")
    assert rows == 2 * len(texts) and real > 0  # both models, every text once
    # the per-pass bound, summed over the passes
    assert padding <= 0.25 * (real + padding) + PAD_SLACK * rows
    alone = [httpx.post(f"{scorer.url}/score_texts", json={"texts": [t]}).json() for t in texts[:6]]
    for i, one in enumerate(alone):  # rows regrouped by length still map back to their text
        assert together["rewards"][i] == pytest.approx(one["rewards"][0], abs=1e-4)
        assert together["costs"][i] == pytest.approx(one["costs"][0], abs=1e-4)


def test_a_small_request_overtakes_a_big_one_and_abandoned_work_is_dropped(scorer):
    n = 4096
    big = {"texts": [f"request {i}: " + "first check the guide, then bake. " * 4 for i in range(n)]}
    before = httpx.get(f"{scorer.url}/metrics").text
    sock = connect(scorer.url)
    send_request(sock, "POST", "/score_texts", json.dumps(big).encode())
    steps = lambda: metric(httpx.get(f"{scorer.url}/metrics").text, "scorer_merged_batch_items_count")  # noqa: E731
    until(lambda: steps() > metric(before, "scorer_merged_batch_items_count"), "the big request started")
    small = httpx.post(f"{scorer.url}/score_texts", json={"texts": ["just one"]}, timeout=60)
    assert small.status_code == 200
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # the big request is still being scored: no answer yet
        sock.recv(1)
    sock.close()  # the big request's client hangs up

    def counts() -> tuple[float, float]:
        text = httpx.get(f"{scorer.url}/metrics").text
        rows = metric(text, "scorer_forward_batch_rows_sum") - metric(before, "scorer_forward_batch_rows_sum")
        dropped = metric(text, "scorer_dropped_items_total") - metric(before, "scorer_dropped_items_total")
        return rows, dropped

    # every item is either scored (a row in each model) or dropped, once its last step is over
    until(lambda: counts()[0] + 2 * counts()[1] == 2 * (n + 1), "every item scored or dropped")
    rows, dropped = counts()
    assert dropped > 0 and rows < 2 * (n + 1)  # some of the big request never reached a forward pass


def test_a_full_queue_answers_503_with_retry_after_and_the_client_waits(guarded_scorer):
    url = guarded_scorer.url
    big = {"texts": [f"text {i} " + "then check the guide " * 6 for i in range(1500)]}
    answer: dict[str, httpx.Response] = {}
    before = metric(httpx.get(f"{url}/metrics").text, "scorer_merged_batch_items_count")
    thread = threading.Thread(
        target=lambda: answer.setdefault("big", httpx.post(f"{url}/score_texts", json=big, timeout=120))
    )
    thread.start()
    until(
        lambda: metric(httpx.get(f"{url}/metrics").text, "scorer_merged_batch_items_count") > before,
        "big started",
    )
    full = httpx.post(f"{url}/score_texts", json={"texts": ["x"] * 10})
    assert full.status_code == 503 and "queue is full" in full.json()["error"]
    assert int(full.headers["retry-after"]) >= 1
    with ScorerClient(url, retries=12, backoff=0.05, max_backoff=2.0) as client:
        assert len(client.score_texts(["x"] * 10)) == 10  # retried until there was room
    thread.join(120)
    assert answer["big"].status_code == 200 and len(answer["big"].json()["rewards"]) == 1500
