"""Scorer replicas: balancing, failover when one is SIGKILLed mid-run, discovery re-reading, outages.

Real scorer processes on 127.0.0.1 and real HTTP throughout. Replicas score one row per forward pass
(``--max-batch-size 1``, as ``exact_scorer``), so a text's score does not depend on which replica or
which batch it landed in: results are compared with a single scorer's by equality.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alignment.scoring.address import read_addresses
from alignment.scoring.client import ScorerClient, ScorerUnavailableError
from alignment.scoring.launch import start_replicas, start_scorer

EXACT = ["--max-batch-size", "1"]
PROMPTS = [f"how do I bake bread number {i}?" for i in range(48)]
RESPONSES = [f" first check the guide, then bake {'slowly ' * (i % 5)}loaf {i}." for i in range(48)]


@pytest.fixture
def replicas(toy_models: Path, tmp_path: Path):
    """Start ``count`` exact scorers publishing into ``tmp_path/scorers``; all stopped afterwards."""
    started = []

    def start(count: int, *extra: str):
        procs = start_replicas(toy_models / "reward", toy_models / "cost", tmp_path / "scorers", count,
                               extra_args=[*EXACT, *extra], log_dir=tmp_path)  # fmt: skip
        started.extend(procs)
        return procs

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def reference(exact_scorer):
    """What one exact scorer answers for PROMPTS/RESPONSES."""
    with ScorerClient(exact_scorer.url, batch_size=48) as client:
        return client.score(PROMPTS, RESPONSES)


def test_load_is_spread_and_a_replica_killed_mid_run_loses_nothing(replicas, reference, tmp_path, caplog):
    """3 replicas, discovered from their address directory; concurrent callers; one replica is
    SIGKILLed while requests are in flight. Every caller gets exactly its own scores, in order,
    equal to a single scorer's; the killed replica's requests were answered by the others."""
    procs = replicas(3)
    victim = procs[1]
    client = ScorerClient("auto", address_dir=tmp_path / "scorers", batch_size=2, max_concurrency=4)
    assert sorted(client.urls) == sorted(p.url for p in procs)
    calls = [(k, slice(k % 6, 48 - k % 5)) for k in range(24)]  # overlapping, differently sized calls
    killed = threading.Event()

    def call(job: tuple[int, slice]):
        k, part = job
        if k == 8:  # a third of the way in, with requests in flight on every replica
            while client.spread()[victim.url]["requests"] < 2:
                time.sleep(0.01)
            victim.kill()
            killed.set()
        return k, client.score(PROMPTS[part], RESPONSES[part])

    caplog.set_level(logging.INFO, logger="alignment.scoring")
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, calls))
    assert killed.is_set()
    for (k, part), (k2, scores) in zip(calls, results, strict=True):
        assert k == k2
        assert scores.rewards == reference.rewards[part] and scores.costs == reference.costs[part]
    spread = client.spread()
    client.close()
    assert all(spread[p.url]["requests"] > 0 for p in procs)  # fewest-outstanding reached all three
    assert spread[victim.url]["failures"] >= 1
    items = sum(s["items"] for s in spread.values())
    assert items == sum(len(PROMPTS[part]) for _, part in calls)  # each chunk answered exactly once
    failovers = [r for r in caplog.records if "its requests go to the other" in r.getMessage()]
    assert len(failovers) == 1 and victim.url in failovers[0].getMessage()
    assert "scorer requests by replica" in caplog.text  # the spread, logged on close


def test_discovery_rereads_the_directory(toy_models, replicas, reference, tmp_path, caplog, monkeypatch):
    """A stale file (its process is gone) is ignored, a replica with another token is skipped with a
    clear message, a replica restarted on a new port during an outage and an added replica are found
    and used; the outage is one warning when it starts and one when it ends."""
    caplog.set_level(logging.INFO, logger="alignment.scoring")
    monkeypatch.delenv("SCORER_URL", raising=False)
    directory = tmp_path / "scorers"
    ours, theirs = "ours-" + "x" * 24, "theirs-" + "y" * 24
    [first] = replicas(1, "--token", ours)
    [other] = replicas(1, "--token", theirs)
    stale = directory / "scorer-127.0.0.1-9.json"
    stale.write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": 999999999, "hostname": "gone"}))

    # 2 pairs per request: every call is several requests, so both replicas are tried from the first
    client = ScorerClient("auto", address_dir=directory, token=ours, refresh_interval=0.2, backoff=0.1,
                          max_backoff=0.5, batch_size=2)  # fmt: skip
    out = client.score(PROMPTS[:6], RESPONSES[:6])
    assert out.rewards == reference.rewards[:6]
    assert "http://127.0.0.1:9 does not answer" in caplog.text and str(stale) in caplog.text
    rejected = [r.getMessage() for r in caplog.records if "rejected the bearer token" in r.getMessage()]
    assert len(rejected) == 1 and other.url in rejected[0] and "401" in rejected[0]

    first.kill()  # its file stays behind, naming a port where nobody listens now
    with ThreadPoolExecutor(3) as pool:  # callers wait through the outage until the restart is found
        waiting = [pool.submit(client.score, PROMPTS[6:12], RESPONSES[6:12]) for _ in range(3)]
        time.sleep(0.5)
        [restarted] = replicas(1, "--token", ours)
        for future in waiting:
            out = future.result()
            assert out.rewards == reference.rewards[6:12] and out.costs == reference.costs[6:12]
    assert restarted.url != first.url and client.spread()[restarted.url]["requests"] >= 1
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scorer unavailable")]
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scorer available again")]
    assert len(starts) == 1 and first.url in starts[0] and other.url in starts[0]
    assert len(ends) == 1 and restarted.url in ends[0]

    [added] = replicas(1, "--token", ours)
    time.sleep(0.5)  # past refresh_interval: the next calls re-read the directory
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: client.score(PROMPTS[i : i + 12], RESPONSES[i : i + 12]), range(0, 48, 4)))
    spread = client.spread()
    assert spread[added.url]["requests"] >= 1 and spread[restarted.url]["requests"] >= 1
    assert spread[other.url]["requests"] == 0
    client.close()


def test_an_outage_is_one_warning_then_a_clear_error_within_the_budget(caplog):
    caplog.set_level(logging.DEBUG, logger="alignment.scoring")
    client = ScorerClient("http://127.0.0.1:9,http://127.0.0.1:10", retry_budget=1.5, backoff=0.05,
                          max_backoff=0.2, batch_size=2, max_concurrency=4, timeout=5)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ScorerUnavailableError) as err:
        client.score(PROMPTS[:16], RESPONSES[:16])  # 8 requests, 4 at a time, all waiting
    took = time.monotonic() - started
    assert 1.5 <= took < 5.0  # the budget is for the outage, not per request or per retry
    message = str(err.value)
    assert "retry budget" in message and "used up" in message
    assert "127.0.0.1:9" in message and "127.0.0.1:10" in message and "ConnectError" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    outage = [w for w in warnings if w.startswith("scorer unavailable: ")]
    assert len(outage) == 1 and "127.0.0.1:9" in outage[0] and "127.0.0.1:10" in outage[0]
    assert len(warnings) <= 1 + 2  # besides it, at most one failover line per replica
    assert sum("retrying in" in r.getMessage() for r in caplog.records) > 8  # the retries: DEBUG only


def test_read_addresses_keeps_the_newest_file_per_url_and_says_what_it_skipped(tmp_path):
    directory = tmp_path / "scorers"
    directory.mkdir()
    (directory / "a.json").write_text(json.dumps({"url": "http://h:1", "token": "old"}))
    time.sleep(0.01)
    (directory / "b.json").write_text(json.dumps({"url": "http://h:1/", "token": "new"}))
    (directory / "c.json").write_text("{not json")
    (directory / ".d.json.tmp").write_text("half")
    found, notes = read_addresses([directory, tmp_path / "missing.json"])
    assert [(a.url, a.token) for a in found] == [("http://h:1", "new")]
    assert any("c.json is not valid JSON" in n for n in notes)
    assert any("missing.json is missing" in n for n in notes)


def test_a_request_that_fails_on_every_replica_is_its_own_problem_not_an_outage(toy_models, tmp_path, caplog):
    """A 500 says this request's scoring failed: retried within the budget, then a clear error; the
    replica stays usable for everyone else, and no outage is declared."""
    caplog.set_level(logging.INFO, logger="alignment.scoring")
    poisoned = start_scorer(toy_models / "reward", toy_models / "cost", tmp_path / "address.json",
                            module="tests.faulty_scorer", env={"SCORER_TEST_FAULT": "poison"})  # fmt: skip
    try:
        client = ScorerClient(poisoned.url, retry_budget=1.0, backoff=0.05, max_backoff=0.2)
        with pytest.raises(ScorerUnavailableError, match="HTTP 500.*injected fault") as err:
            client.score(["a"], [" POISON"])
        assert poisoned.url in str(err.value) and "retry budget" in str(err.value)
        assert len(client.score(PROMPTS[:3], RESPONSES[:3])) == 3  # the replica served on
    finally:
        poisoned.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not score a request" in warnings[0]
