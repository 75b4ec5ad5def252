"""Secure by default, the token checked before the body is read, and an OpenAPI document that is
true (checked by schemathesis against the running service). Real service over HTTP."""

from __future__ import annotations

import importlib.util
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import ScorerProcess, start_scorer
from tests.raw_http import closed_by_peer, connect, exchange, read_response, send_request

PAIR = {"prompts": ["how do I bake bread?"], "responses": [" first check the guide."]}
# Where the service's answers go beyond what JSON Schema can say, the expected statuses are widened:
# too many items or too long a text is 413 (the content is larger than this service accepts, as
# the document declares), and /score's prompts and responses must have equal lengths, which a
# schema cannot express (422).
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "405", "413", "422"]

[[operations]]
include-path = "/score"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422"]
"""


@pytest.fixture(scope="module")
def open_host(toy_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerProcess]:
    """A scorer listening on every interface with no token given (small limits for the fuzzing)."""
    logs = tmp_path_factory.mktemp("open-host-scorer")
    with start_scorer(
        toy_models / "reward",
        toy_models / "cost",
        logs / "address.json",
        host="0.0.0.0",
        extra_args=["--max-items", "8", "--max-text-chars", "300"],
        log_file=logs / "scorer.log",
        env={"SCORER_TOKEN": ""},
    ) as proc:
        proc.token = json.loads(proc.address_file.read_text())["token"]  # type: ignore[attr-defined]
        yield proc


def test_beyond_loopback_a_token_is_generated_and_kept_private(open_host):
    mode = stat.S_IMODE(open_host.address_file.stat().st_mode)
    assert mode == 0o600
    token = open_host.token
    assert isinstance(token, str) and len(token) >= 32
    assert httpx.get(f"{open_host.url}/health").json()["auth"] is True
    assert httpx.post(f"{open_host.url}/score", json=PAIR).status_code == 401
    with ScorerClient("auto", address_file=open_host.address_file, retries=0) as client:
        assert len(client.score(PAIR["prompts"], PAIR["responses"])) == 1
    log = open_host.log_file.read_text()
    assert "generated a bearer token" in log and token not in log


def test_the_token_is_checked_before_the_body_is_read(open_host):
    with connect(open_host.url) as sock:  # claims 50 MB, sends 13 bytes: must not be waited for
        send_request(sock, "POST", "/score_texts", b'{"texts": ["a', content_length=50_000_000)
        status, headers, body = read_response(sock)
        assert status == 401 and b"bearer token" in body and headers["www-authenticate"] == "Bearer"
        assert closed_by_peer(sock)  # the rest of the body is never read
    garbled = httpx.post(
        f"{open_host.url}/score", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbled.status_code == 401
    auth = {"Authorization": f"Bearer {open_host.token}", "content-type": "application/json"}
    assert httpx.post(f"{open_host.url}/score", content=b"{not json", headers=auth).status_code == 422


def test_insecure_no_token_is_an_explicit_choice(scorer_factory):
    proc = scorer_factory("--host", "0.0.0.0", "--insecure-no-token")
    assert "token" not in json.loads(proc.address_file.read_text())
    assert httpx.post(f"{proc.url}/score", json=PAIR).status_code == 200
    assert "--insecure-no-token" in proc.log_file.read_text()


def test_openapi_declares_every_answer(open_host, scorer):
    doc = httpx.get(f"{open_host.url}/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for route in ("/score", "/score_texts"):
        op = doc["paths"][route]["post"]
        assert {"200", "400", "401", "408", "413", "422", "500", "503"} <= set(op["responses"])
        assert op["security"] == [{"bearer": []}]
        error = op["responses"]["422"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}
        assert "Retry-After" in op["responses"]["503"]["headers"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "503" in doc["paths"]["/health"]["get"]["responses"]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert doc["components"]["schemas"]["ScoreTextsRequest"]["properties"]["texts"]["maxItems"] == 8
    # the 422 answer has the declared shape
    bad = httpx.post(
        f"{open_host.url}/score",
        json={"prompts": [1]},
        headers={"Authorization": f"Bearer {open_host.token}"},
    )
    assert bad.status_code == 422 and {"error", "detail"} == set(bad.json())
    assert {"field", "message"} == set(bad.json()["detail"][0])
    with connect(open_host.url) as sock:
        status, headers, _ = exchange(sock, "DELETE", "/score")
        assert status == 405 and headers["allow"] == "POST"
    assert "securitySchemes" not in httpx.get(f"{scorer.url}/openapi.json").json().get("components", {})


@pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None,
    reason="schemathesis is not installed (it needs Python >= 3.11; see the dev extra)",
)
@pytest.mark.parametrize("with_token", [True, False], ids=["with-token", "without-token"])
def test_schemathesis_finds_no_disagreement_with_the_schema(open_host, tmp_path, with_token):
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{open_host.url}/openapi.json", "--checks", "all", "--max-examples", "10", "--seed", "1",
        "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "30",
    ]  # fmt: skip
    if with_token:
        cmd += ["--header", f"Authorization: Bearer {open_host.token}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "4/4" in out.stdout  # every route was tested
