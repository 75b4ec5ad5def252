"""ScorerClient: splitting, retries, restarts, and never a made-up score."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from alignment.scoring.client import ScorerClient, ScorerError, ScorerRequestError, ScorerUnavailableError
from tests.test_scorer_service import metric

PROMPTS = [f"how do I bake bread {i}?" for i in range(10)]
RESPONSES = [" first check the guide, then bake."] * 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_large_calls_are_split_into_batches(scorer_factory):
    proc = scorer_factory()
    with ScorerClient(proc.url, batch_size=3) as client:
        out = client.score(PROMPTS, RESPONSES)
    assert len(out.rewards) == len(out.costs) == 10
    assert metric(httpx.get(f"{proc.url}/metrics").text, "scorer_requests_total", route="/score") == 4


def test_rejected_request_is_not_retried(scorer_factory):
    proc = scorer_factory("--max-items", "2")
    with (
        ScorerClient(proc.url, batch_size=5, retries=4, backoff=0.01) as client,
        pytest.raises(ScorerRequestError) as err,
    ):
        client.score(PROMPTS[:5], RESPONSES[:5])
    assert err.value.status == 413 and "at most 2" in str(err.value)
    assert metric(httpx.get(f"{proc.url}/metrics").text, "scorer_requests_total", route="/score") == 1


def test_unreachable_scorer_raises_instead_of_returning_scores():
    port = free_port()
    client = ScorerClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, max_backoff=0.05, timeout=2)
    started = time.monotonic()
    with pytest.raises(ScorerUnavailableError, match=f"2 retries used up.*127.0.0.1:{port}: ConnectError"):
        client.score(PROMPTS, RESPONSES)
    assert time.monotonic() - started < 10


def test_missing_address_file_is_a_clear_error(tmp_path):
    client = ScorerClient("auto", address_file=tmp_path / "none.json", retries=1, backoff=0.01)
    with pytest.raises(ScorerUnavailableError, match="start the scorer first"):
        client.score(["a"], ["b"])


def test_bad_arguments_fail_before_any_request():
    client = ScorerClient("http://127.0.0.1:9", retries=0)
    with pytest.raises(ValueError, match="differ in length"):
        client.score(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be a string"):
        client.score(["a", "b"], ["c", 3])
    with pytest.raises(TypeError, match="list of strings"):
        client.score_texts("just one string")
    assert client.score([], []).rewards == []


def test_client_survives_a_scorer_restart_mid_sequence(scorer_factory, tmp_path):
    address = tmp_path / "shared-address.json"
    first = scorer_factory(address_file=address)
    client = ScorerClient("auto", address_file=address, retry_budget=120, backoff=0.2, max_backoff=1.0)
    before = client.score(PROMPTS[:4], RESPONSES[:4])
    first.kill()  # SIGKILL: the old address file (old port) stays behind

    restarted = {}

    def restart() -> None:
        time.sleep(1.0)
        restarted["proc"] = scorer_factory(address_file=address)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        after = client.score(PROMPTS[:4], RESPONSES[:4])  # retries until the new scorer is published
    finally:
        thread.join()  # also when the retries ran out: the fixture must know the new scorer to stop it
    assert restarted["proc"].url != first.url or restarted["proc"].popen.pid != first.popen.pid
    assert after.rewards == pytest.approx(before.rewards, abs=1e-5)
    assert after.costs == pytest.approx(before.costs, abs=1e-5)


class _Stub:
    """A real HTTP server on 127.0.0.1 answering every request with one fixed raw JSON body, and
    recording the Authorization header of each request (None when absent)."""

    def __init__(self) -> None:
        import http.server

        stub = self
        self.body = b"{}"
        self.auth: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                stub.auth.append(self.headers.get("authorization"))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(stub.body)))
                self.end_headers()
                self.wfile.write(stub.body)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = _Stub()
    yield server
    server.close()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"rewards": [NaN, 1.0], "costs": [0.1, 0.2], "truncated": []}', r"rewards\[0\] = nan"),
        (b'{"rewards": [1.0, 2.0], "costs": [Infinity, 0.2], "truncated": []}', r"costs\[0\] = inf"),
        (b'{"rewards": [1.0, -Infinity], "costs": [0.1, 0.2], "truncated": []}', r"rewards\[1\] = -inf"),
        (b'{"rewards": ["1.0", 2.0], "costs": [0.1, 0.2], "truncated": []}', r"rewards\[0\] = '1.0'"),
        (b'{"rewards": [true, 2.0], "costs": [0.1, 0.2], "truncated": []}', r"rewards\[0\] = True"),
        (b'{"rewards": [1.0, 2.0], "costs": [0.1, null], "truncated": []}', r"costs\[1\] = None"),
        (b'{"rewards": [1.0], "costs": [0.1, 0.2], "truncated": []}', "not a list of 2 numbers"),
        (b'{"rewards": [1.0, 2.0], "costs": [0.1, 0.2], "truncated": [2]}', "truncated index 2"),
        (b'{"rewards": [1.0, 2.0], "costs": [0.1, 0.2], "truncated": [-1]}', "truncated index -1"),
        (b'{"rewards": [1.0, 2.0], "costs": [0.1, 0.2], "truncated": [false]}', "truncated index False"),
        (b'{"rewards": [1.0, 2.0], "costs": [0.1, 0.2], "truncated": [1, 1]}', "repeated"),
        (b"[1.0, 2.0]", "instead of a JSON object"),
    ],
)
def test_malformed_scores_from_a_server_are_an_error_never_a_score(stub, body, fragment):
    stub.body = body
    with (
        ScorerClient(stub.url, retries=3, backoff=0.01) as client,
        pytest.raises(ScorerError, match=fragment),
    ):
        client.score(["a", "b"], ["c", "d"])
    assert len(stub.auth) == 1  # a malformed answer is not retried


def test_a_well_formed_answer_passes_the_checks(stub):
    stub.body = b'{"rewards": [1, -2.5], "costs": [0.25, 0], "truncated": [1]}'
    with ScorerClient(stub.url, retries=0) as client:
        out = client.score(["a", "b"], ["c", "d"])
    assert out.rewards == [1.0, -2.5] and out.costs == [0.25, 0.0] and out.truncated == [1]


def test_the_address_files_token_goes_only_to_the_address_in_that_file(scorer_factory, stub, monkeypatch):
    proc = scorer_factory("--token", "file-secret-" + "x" * 20)
    monkeypatch.delenv("SCORER_TOKEN", raising=False)
    monkeypatch.delenv("SCORER_URL", raising=False)
    assert json.loads(proc.address_file.read_text())["token"].startswith("file-secret-")
    with ScorerClient("auto", address_file=proc.address_file, retries=0) as client:
        assert len(client.score(["a"], ["b"])) == 1  # the token was read along with the URL
    stub.body = b'{"rewards": [1.0], "costs": [0.5], "truncated": []}'
    with ScorerClient(stub.url, address_file=proc.address_file, retries=0) as client:
        client.score(["a"], ["b"])  # an explicit URL: the file's token is not for it
    monkeypatch.setenv("SCORER_URL", stub.url)
    with ScorerClient("auto", address_file=proc.address_file, retries=0) as client:
        client.score(["a"], ["b"])  # $SCORER_URL wins over the file: still not the file's address
    assert stub.auth == [None, None]
    monkeypatch.delenv("SCORER_URL")
    client = ScorerClient("auto", address_file=proc.address_file, token="given", retries=0)
    with client, pytest.raises(ScorerRequestError) as err:  # an explicit token is used as given
        client.score(["a"], ["b"])
    assert err.value.status == 401
