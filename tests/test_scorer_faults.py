"""Failures stay with the request that caused them, are answered (never raised into the server),
and a dead scheduling loop is reported at once: the real service over HTTP on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from alignment.scoring.client import ScorerClient, ScorerUnavailableError
from alignment.scoring.launch import ScorerProcess, start_scorer
from alignment.scoring.wait import wait_for_scorer
from alignment.toy.objective import sample_scoring_examples
from tests.conftest import REPO
from tests.raw_http import connect, exchange
from tests.test_scorer_service import metric

ROWS = sample_scoring_examples(8, seed=3)
INNOCENT = {"prompts": [r[0] for r in ROWS], "responses": [r[1] for r in ROWS]}
PY310 = Path("/root/.pyenv/versions/3.10.13/bin/python")


def until(condition, what: str, limit: float = 60.0) -> None:
    """Wait for ``condition()`` (a synchronisation point, not a timing claim)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def faulty(toy_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerProcess]:
    """The real service with a poisoned-text fault and a loop fault armed by a trigger file.

    A 50 ms merge window makes concurrent requests share batches reliably. The loop-fault test
    kills the scheduling loop, so it is the last test of this module that uses this scorer.
    """
    logs = tmp_path_factory.mktemp("faulty-scorer")
    env = {"SCORER_TEST_FAULT": "poison,loop", "SCORER_TEST_TRIGGER": str(logs / "kill-the-loop")}
    with start_scorer(
        toy_models / "reward",
        toy_models / "cost",
        logs / "address.json",
        extra_args=["--max-wait-ms", "50"],
        log_file=logs / "scorer.log",
        env=env,
        module="tests.faulty_scorer",
    ) as proc:
        proc.trigger = logs / "kill-the-loop"  # type: ignore[attr-defined]
        yield proc


def _storm(url: str, bad_route: str, bad_body: bytes) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """24 concurrent requests, every third one bad: (innocent answers, bad answers)."""

    def job(k: int) -> tuple[bool, httpx.Response]:
        if k % 3 == 0:
            r = httpx.post(
                f"{url}{bad_route}", content=bad_body, headers={"content-type": "application/json"}
            )
            return True, r
        return False, httpx.post(f"{url}/score", json=INNOCENT, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(job, range(24)))
    return [r for bad, r in answers if not bad], [r for bad, r in answers if bad]


def _assert_innocents_scored(alone: dict, innocents: list[httpx.Response]) -> None:
    for r in innocents:
        assert r.status_code == 200, r.text
        # other batch compositions change the last bits of an fp32 score (GEMM blocking)
        assert r.json()["rewards"] == pytest.approx(alone["rewards"], abs=1e-4)
        assert r.json()["costs"] == pytest.approx(alone["costs"], abs=1e-4)


def test_lone_surrogate_is_a_422_for_its_sender_only(scorer):
    alone = httpx.post(f"{scorer.url}/score", json=INNOCENT).json()
    innocents, bad = _storm(scorer.url, "/score_texts", b'{"texts": ["fine", "a \\ud800 b"]}')
    _assert_innocents_scored(alone, innocents)
    for r in bad:
        assert r.status_code == 422
        assert "texts[1]" in r.json()["error"] and "surrogate" in r.json()["error"]


def test_a_failed_merged_batch_fails_only_the_request_that_caused_it(faulty):
    alone = httpx.post(f"{faulty.url}/score", json=INNOCENT).json()
    innocents, bad = _storm(faulty.url, "/score_texts", b'{"texts": ["fine", "a POISON b"]}')
    _assert_innocents_scored(alone, innocents)
    for r in bad:
        assert r.status_code == 500 and "injected fault" in r.json()["error"]
    log = faulty.log_file.read_text()
    assert "scoring each request on its own" in log  # merged batches did fail and were split


def test_an_error_answer_keeps_the_connection_alive(faulty):
    with connect(faulty.url) as sock:
        status, _, body = exchange(sock, "POST", "/score_texts", {"texts": ["x POISON"]})
        assert status == 500 and b"injected fault" in body
        status, _, body = exchange(sock, "POST", "/score_texts", {"texts": ["fine"]})
        assert status == 200, body  # the same connection still answers


def test_a_dead_scheduling_loop_fails_pending_and_later_requests_at_once(faulty):
    many = {"texts": [f"text {i} " + "then check the guide " * 12 for i in range(3000)]}
    answer: dict[str, httpx.Response] = {}
    big = threading.Thread(
        target=lambda: answer.setdefault(
            "big", httpx.post(f"{faulty.url}/score_texts", json=many, timeout=60)
        )
    )
    batches = lambda: metric(httpx.get(f"{faulty.url}/metrics").text, "scorer_merged_batch_items_count")  # noqa: E731
    before = batches()
    big.start()
    until(lambda: batches() > before, "the big request's scoring started")
    faulty.trigger.touch()  # the next step's metrics hook raises, outside the per-step handling
    big.join(60)
    assert answer["big"].status_code == 503 and "batch scheduler stopped" in answer["big"].json()["error"]
    health = httpx.get(f"{faulty.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert "injected fault" in health.json()["error"]
    later = httpx.post(f"{faulty.url}/score", json=INNOCENT, timeout=30)
    assert later.status_code == 503
    with pytest.raises(ScorerUnavailableError, match="503"):
        ScorerClient(faulty.url, retries=1, backoff=0.01).score(["a"], ["b"])
    with pytest.raises(TimeoutError, match="HTTP 503"):
        wait_for_scorer(url=faulty.url, timeout=0.5, poll=0.1)


SCHEDULER_CHECK = """
import asyncio
from alignment.scoring.scheduler import BatchScheduler, SchedulerStopped

def lengths(items):
    return [len(x) for x in items]

def fail_on_bad(items):
    if "bad" in items:
        raise ValueError("bad item")
    return lengths(items)

def broken_hook(n_items, waits):
    raise RuntimeError("hook broke")

async def main():
    lone = BatchScheduler(lengths, max_rows=4, max_wait_s=0.02)
    await lone.start()
    assert await lone.submit(["abc"], [1]) == [3]  # alone: the merge window runs out
    assert await asyncio.gather(lone.submit(["a", "bb"], [1, 1]), lone.submit(["c"], [1])) == [[1, 2], [1]]
    assert lone.alive
    await lone.stop()

    mixed = BatchScheduler(fail_on_bad, max_rows=8, max_wait_s=0.05)
    await mixed.start()
    out = await asyncio.gather(
        mixed.submit(["aa"], [1]), mixed.submit(["bad"], [1]), mixed.submit(["b"], [1]), return_exceptions=True
    )
    assert out[0] == [2] and isinstance(out[1], ValueError) and out[2] == [1], out
    assert mixed.alive
    await mixed.stop()

    dead = BatchScheduler(lengths, on_step=broken_hook)
    await dead.start()
    for _ in range(2):
        try:
            await asyncio.wait_for(dead.submit(["x"], [1]), 10)
        except SchedulerStopped as exc:
            assert "hook broke" in str(exc)
        else:
            raise AssertionError("submit on a dead loop returned")
    assert not dead.alive and "hook broke" in dead.error
    await dead.stop()
    print("scheduler ok")

asyncio.run(main())
"""


@pytest.mark.parametrize("python", [sys.executable, str(PY310)], ids=["this-python", "python3.10"])
def test_scheduler_loop_on_every_supported_python(python):
    """On 3.10 ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, not the builtin: a lone
    request must still be answered, failures isolated, and a broken hook reported, not hung."""
    if not Path(python).exists():
        pytest.skip(f"{python} is not installed here (only needed to check the 3.10 behaviour)")
    out = subprocess.run(
        [python, "-c", SCHEDULER_CHECK], cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "scheduler ok" in out.stdout, out.stderr[-3000:]


def test_the_error_barrier_answers_unexpected_exceptions_on_a_kept_connection():
    """Any exception that escapes a route (a bug) is a JSON 500 on a connection that stays open,
    under the real uvicorn, not an exception that makes the server drop the connection."""
    import socket as socket_module

    import uvicorn

    from alignment.scoring.gate import ErrorBarrier

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": f"{message['type']}.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/bug":
            raise KeyError("a bug")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket_module.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(ErrorBarrier(app), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        until(lambda: server.started, "uvicorn started")
        with connect(f"http://127.0.0.1:{sock.getsockname()[1]}") as conn:
            status, headers, body = exchange(conn, "GET", "/bug")
            assert status == 500 and b"KeyError" in body and headers["content-type"] == "application/json"
            assert exchange(conn, "GET", "/fine")[0] == 200  # the same connection
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
