"""The scorer against stalled, slow and garbled connections: header and body deadlines, a
connection cap below the file-descriptor limit, rate-limited logs. Real service on 127.0.0.1."""

from __future__ import annotations

import socket

import httpx
import pytest

from alignment.scoring.client import ScorerClient
from tests.raw_http import closed_by_peer, connect, read_response, send_request


def test_stalled_sockets_are_closed_and_normal_requests_are_served(guarded_scorer):
    url = guarded_scorer.url
    stalled = []
    for k in range(150):  # more sockets than the service has file descriptors (128)
        sock = connect(url, timeout=30)
        if k % 2:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: scorer\r\n")  # headers that never end
        stalled.append(sock)
    with ScorerClient(url, retries=6, backoff=0.2, max_backoff=2.0) as client:
        assert len(client.score(["how do I bake bread?"], [" first check the guide."])) == 1
    assert all(closed_by_peer(sock) for sock in stalled)  # each one closed by the server
    for sock in stalled:
        sock.close()
    assert httpx.get(f"{url}/health").status_code == 200
    log = guarded_scorer.log_file.read_text()
    assert len(log) < 200_000 and log.count("Too many open files") <= 6


def test_a_body_shorter_than_its_content_length_gets_408(guarded_scorer):
    with connect(guarded_scorer.url, timeout=30) as sock:
        send_request(sock, "POST", "/score_texts", b'{"texts": ["a', content_length=1000)
        status, headers, body = read_response(sock)
        assert status == 408 and b"did not arrive" in body
        assert closed_by_peer(sock)


def test_repeated_log_lines_are_rate_limited(guarded_scorer):
    for _ in range(40):
        with socket.create_connection(
            guarded_scorer.url.removeprefix("http://").split(":"), timeout=30
        ) as sock:
            sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            assert closed_by_peer(sock)  # answered 400 and closed
    log = guarded_scorer.log_file.read_text()
    assert 1 <= log.count("Invalid HTTP request received") <= 6
    assert (
        httpx.post(f"{guarded_scorer.url}/score", json={"prompts": ["a"], "responses": ["b"]}).status_code
        == 200
    )


def test_repeat_filter_holds_back_repeats_reports_them_and_spares_the_access_log():
    import io
    import logging
    import time

    from alignment.scoring.server import RepeatFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RepeatFilter(burst=3, window=0.05))
    loggers = [logging.getLogger("test.repeats"), logging.getLogger("uvicorn.access")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        for i in range(10):
            loggers[0].warning("connection %d refused", i)
            loggers[1].info("GET /score %d", i)  # --access-log: every request, though one format
        time.sleep(0.1)  # past the window: the next one says how many were held back
        loggers[0].warning("connection %d refused", 99)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            lg.propagate = True
    text = out.getvalue()
    assert text.count("connection") == 4 and text.count("GET /score") == 10
    assert "connection 99 refused [7 more like this" in text


def test_repeat_filter_is_taken_off_the_root_handlers_when_the_service_ends():
    """The service rate-limits the root logger's handlers while it runs. Embedded in a process that owns
    those handlers (pytest's log capture), a filter left behind would swallow that process's messages."""
    import logging

    from alignment.scoring.server import repeat_filter

    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        with repeat_filter(burst=1, window=60.0) as flt:
            assert flt in handler.filters
        assert flt not in handler.filters
        with pytest.raises(RuntimeError), repeat_filter() as flt:  # a failing service too
            raise RuntimeError("boom")
        assert flt not in handler.filters
    finally:
        root.removeHandler(handler)
