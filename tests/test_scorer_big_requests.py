"""The scorer with big requests, over HTTP on 127.0.0.1: a small request is not stuck behind long
rows, memory is bounded by the body (and given back), stalled half-bodies beyond the connection
cap do not crowd out normal clients, a hang-up is counted as 499, 413 is declared where it can
be answered. (Timings and memory figures: bench/scorer_latency.py.)"""

from __future__ import annotations

import json
import resource
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.raw_http import connect, read_response, send_request
from tests.test_scorer_service import metric

MB = 1024 * 1024


def until(condition, what: str, limit: float = 60.0) -> None:
    """Wait for ``condition()`` (a synchronisation point, not a timing claim)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=60).text


def test_a_small_request_is_not_stuck_behind_long_rows_and_a_hang_up_is_499(scorer):
    """2,048 texts of ~512 tokens used to fill every step until all were scored; a 1-text request
    sent meanwhile waited for all of them (14.6-29.6 s). It is now answered while the big one is
    still being scored; the big one's client then hangs up: counted as 499, not 500."""
    text = " first check the guide, then bake the bread slowly" * 60  # ~3,000 characters: > 512 tokens
    big = {"texts": [f"request {i}: {text}" for i in range(2048)]}
    before = _metrics(scorer.url)
    sock = connect(scorer.url)
    send_request(sock, "POST", "/score_texts", json.dumps(big).encode())
    steps = lambda: metric(_metrics(scorer.url), "scorer_merged_batch_items_count")  # noqa: E731
    until(lambda: steps() > metric(before, "scorer_merged_batch_items_count"), "the big request started")
    small = httpx.post(f"{scorer.url}/score_texts", json={"texts": ["just one"]}, timeout=120)
    assert small.status_code == 200
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # the big request is still being scored: no answer yet
        sock.recv(1)
    sock.close()  # its client hangs up

    def status_count(status: str) -> float:
        after = _metrics(scorer.url)
        return metric(after, "scorer_requests_total", route="/score_texts", status=status) - metric(
            before, "scorer_requests_total", route="/score_texts", status=status
        )

    until(lambda: status_count("499") == 1, "the hang-up counted as 499")
    assert status_count("500") == 0
    after = _metrics(scorer.url)
    dropped = metric(after, "scorer_dropped_items_total") - metric(before, "scorer_dropped_items_total")
    assert dropped > 1000  # most of the big request never reached a forward pass
    truncated = metric(after, "scorer_truncated_items_total") - metric(before, "scorer_truncated_items_total")
    assert truncated == 0  # counted only for answered requests; the small one was not cut


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the scorer's memory from /proc")
def test_memory_is_bounded_by_the_body_and_given_back(scorer_factory):
    """A 47.7 MB body took the scorer from 401 MB to 4,355 MB and left 3,651 MB held; poison
    bodies sent once each left it at 2,332 MB. Bounds here are the issue's targets (peak below
    1 GB + 8x the body, back within 512 MB of the start), far above what is measured (the bench:
    about 2x the body at the peak): generous, because a CI machine's allocator may differ."""
    proc = scorer_factory()
    pid, url = proc.popen.pid, proc.url
    # 240 texts of 200,000 characters: the most --max-text-chars allows, 48 MB, and each text is
    # tokenised only as far as its first 512 tokens (240 rows to score)
    text = ("then check the guide and bake slowly " * 5500)[:199_990]
    body = json.dumps({"texts": [f"{i} {text}" for i in range(240)]}).encode()
    body_mb = len(body) / MB
    start = _rss_mb(pid, "VmRSS")
    answer = httpx.post(
        f"{url}/score_texts", content=body, headers={"content-type": "application/json"}, timeout=600
    )
    assert answer.status_code == 200, answer.text[:500]
    scores = answer.json()
    assert scores["truncated"] == list(range(240)) and len(set(scores["rewards"])) > 1
    peak = _rss_mb(pid, "VmHWM")
    assert peak - start < 1024 + 8 * body_mb, (start, peak)
    poisons = [
        b'{"texts": [' + b",".join([b'"ab"'] * (12 * MB)) + b"]}",  # 12 million strings
        b'{"texts": [' + b",".join([b"0.5"] * (12 * MB)) + b"]}",  # 12 million validation errors
        b'{"texts": ' + b"[" * (24 * MB) + b"]" * (24 * MB) + b"}",  # nesting 24 million deep
    ]
    for poison in poisons:
        r = httpx.post(
            f"{url}/score_texts", content=poison, headers={"content-type": "application/json"}, timeout=600
        )
        assert r.status_code in (413, 422) and r.json()["error"], r.text[:300]
    del body, poisons
    assert _rss_mb(pid, "VmHWM") - start < 1024 + 8 * body_mb
    until(lambda: _rss_mb(pid, "VmRSS") - start < 512, "memory given back", limit=30)
    assert httpx.post(f"{url}/score", json={"prompts": ["a"], "responses": ["b"]}).status_code == 200


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors, the hard limit here is {hard}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def test_1100_stalled_half_bodies_do_not_crowd_out_normal_requests(scorer_factory):
    """1,100 connections that sent half a body and went silent, beyond a cap of 1,024: each new
    connection pushes out a stalled one, so normal clients (new connections and kept-alive ones)
    all get their answers. Before, stalled bodies counted as busy and new connections were refused
    (310 of 3,643 normal requests failed)."""
    _raise_fd_limit(4096)  # this process holds the 1,100 sockets, the scorer its 1,024 + models
    proc = scorer_factory("--max-connections", "1024")
    host, port = proc.url.removeprefix("http://").split(":")
    head = b"POST /score_texts HTTP/1.1\r\nHost: scorer\r\nContent-Type: application/json\r\n"
    stalled: list[socket.socket] = []
    try:
        for _ in range(1100):
            sock = socket.create_connection((host, int(port)), timeout=60)
            sock.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"texts": ["' + b"a" * 488)
            stalled.append(sock)
        time.sleep(1.2)  # silent for longer than STALL_S (alignment.scoring.server): stalled
        failures: list[str] = []
        answered = [0]

        def client(k: int) -> None:
            body = {"prompts": [f"question {k}"], "responses": [" first check the guide."]}
            try:
                with httpx.Client(timeout=120) as kept:  # one kept-alive connection
                    for _ in range(6):
                        fresh = httpx.post(f"{proc.url}/score", json=body, timeout=120)  # a new one each time
                        again = kept.post(f"{proc.url}/score", json=body)
                        for r in (fresh, again):
                            if r.status_code != 200:
                                failures.append(f"{r.status_code} {r.text[:200]}")
                            answered[0] += 1
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not failures and answered[0] == 8 * 6 * 2, failures[:5]
        closed = 0
        for sock in stalled:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass  # still open
            except ConnectionResetError:
                closed += 1
        assert closed >= 1100 - 1024  # the server closed stalled ones to stay at its cap
    finally:
        for sock in stalled:
            sock.close()
    assert httpx.get(f"{proc.url}/health").status_code == 200


def test_413_is_declared_wherever_it_can_be_answered(scorer):
    doc = httpx.get(f"{scorer.url}/openapi.json").json()
    for path, method in (
        ("/health", "get"),
        ("/metrics", "get"),
        ("/score", "post"),
        ("/score_texts", "post"),
    ):
        assert {"408", "413"} <= set(doc["paths"][path][method]["responses"]), path
    for path in ("/health", "/metrics"):
        with connect(scorer.url) as sock:  # a GET that announces a huge body
            send_request(sock, "GET", path, content_length=10**12)
            status, _, body = read_response(sock)
            assert status == 413 and b"exceeds the limit" in body
    schema = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ScoreRequest"}
    assert doc["components"]["schemas"]["ScoreRequest"]["additionalProperties"] is False
