"""The real scorer service over HTTP on 127.0.0.1: contract, batching, auth, limits, metrics."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from alignment.conversation import scoring_text
from alignment.scoring.batcher import RewardCostScorer
from alignment.scoring.client import ScorerClient
from alignment.scoring.score_model import load_score_model
from alignment.toy.objective import sample_scoring_examples

ROWS = sample_scoring_examples(48, seed=7)
PROMPTS = [r[0] for r in ROWS]
RESPONSES = [r[1] for r in ROWS]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def in_process(toy_models):
    reward = load_score_model(str(toy_models / "reward"))
    cost = load_score_model(str(toy_models / "cost"))
    return RewardCostScorer(reward, cost)


def test_health_reports_models_and_device(scorer, toy_models):
    body = httpx.get(f"{scorer.url}/health").json()
    assert body["status"] == "healthy" and body["device"] == "cpu"
    assert body["reward_model"].endswith("reward") and body["cost_model"].endswith("cost")
    assert body["max_length"] == 512  # the study's (and Beaver's training) length unless told otherwise


def test_scores_equal_in_process_scoring(scorer, in_process):
    body = httpx.post(f"{scorer.url}/score", json={"prompts": PROMPTS[:8], "responses": RESPONSES[:8]}).json()
    expected = in_process.score(PROMPTS[:8], RESPONSES[:8])
    assert body["rewards"] == pytest.approx(expected.rewards, abs=1e-4)
    assert body["costs"] == pytest.approx(expected.costs, abs=1e-4)
    assert body["truncated"] == []


def test_score_texts_equals_score_for_templated_text(scorer):
    pair = httpx.post(f"{scorer.url}/score", json={"prompts": PROMPTS[:3], "responses": RESPONSES[:3]}).json()
    texts = [scoring_text(p, r) for p, r in zip(PROMPTS[:3], RESPONSES[:3], strict=True)]
    plain = httpx.post(f"{scorer.url}/score_texts", json={"texts": texts}).json()
    with_eos = httpx.post(f"{scorer.url}/score_texts", json={"texts": [t + "</s>" for t in texts]}).json()
    assert plain["rewards"] == pytest.approx(pair["rewards"], abs=1e-5)
    assert with_eos["costs"] == pytest.approx(pair["costs"], abs=1e-5)


def test_sixteen_concurrent_clients_get_their_own_results(scorer):
    singles = [
        httpx.post(f"{scorer.url}/score", json={"prompts": [p], "responses": [r]}).json()
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    before = httpx.get(f"{scorer.url}/metrics").text

    def client_job(k: int) -> list[tuple[int, float, float]]:
        got = []
        with ScorerClient(scorer.url, retries=0, batch_size=3) as client:
            for rnd in range(3):
                idx = [(k * 3 + rnd * 5 + j) % len(PROMPTS) for j in range(3)]
                out = client.score([PROMPTS[i] for i in idx], [RESPONSES[i] for i in idx])
                got += [(i, r, c) for i, r, c in zip(idx, out.rewards, out.costs, strict=True)]
        return got

    with ThreadPoolExecutor(16) as pool:
        results = [item for chunk in pool.map(client_job, range(16)) for item in chunk]
    assert len(results) == 16 * 9
    for i, r, c in results:
        assert r == pytest.approx(singles[i]["rewards"][0], abs=1e-4)
        assert c == pytest.approx(singles[i]["costs"][0], abs=1e-4)
    after = httpx.get(f"{scorer.url}/metrics").text
    batches = metric(after, "scorer_requests_per_batch_count") - metric(
        before, "scorer_requests_per_batch_count"
    )
    merged = metric(after, "scorer_requests_per_batch_sum") - metric(before, "scorer_requests_per_batch_sum")
    assert merged == 48  # every request was scored exactly once ...
    assert batches < merged  # ... and some were merged with others


def test_empty_request_is_valid(scorer):
    r = httpx.post(f"{scorer.url}/score", json={"prompts": [], "responses": []})
    assert r.status_code == 200 and r.json() == {"rewards": [], "costs": [], "truncated": []}


BAD_BODIES = [
    ({"prompts": ["a"], "responses": ["b", "c"]}, 422, "differ in length"),
    ({"prompts": [1], "responses": ["b"]}, 422, "prompts.0"),
    ({"prompts": "a", "responses": "b"}, 422, "prompts"),
    ({"prompts": ["a"]}, 422, "responses"),
    ({"prompts": ["a"], "responses": ["b"], "extra": 1}, 422, "extra"),
    ({"prompts": [None], "responses": ["b"]}, 422, "prompts.0"),
    ([1, 2], 422, "body"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_BODIES)
def test_bad_json_bodies_get_4xx_naming_the_problem(scorer, body, status, fragment):
    r = httpx.post(f"{scorer.url}/score", json=body)
    assert r.status_code == status
    assert fragment in r.json()["error"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"not json", "not valid JSON"), (b'{"texts": ["\xff\xfe"]}', "UTF-8"), (b"", "expected a JSON object")],
)
def test_unparseable_bodies_get_4xx(scorer, content, fragment):
    r = httpx.post(f"{scorer.url}/score_texts", content=content, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert fragment in r.json()["error"]


def test_limits_on_items_text_length_and_body_size(scorer_factory):
    proc = scorer_factory("--max-items", "5", "--max-text-chars", "1000", "--max-body-mb", "0.01")
    r = httpx.post(f"{proc.url}/score_texts", json={"texts": ["x"] * 6})
    assert r.status_code == 413 and "6 items" in r.json()["error"]
    r = httpx.post(f"{proc.url}/score", json={"prompts": ["a"], "responses": ["y" * 1001]})
    assert r.status_code == 413 and "responses[0]" in r.json()["error"]
    r = httpx.post(f"{proc.url}/score_texts", json={"texts": ["z" * 20_000]})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]

    def chunks():
        yield b'{"texts": ["'
        for _ in range(20):
            yield b"w" * 1000
        yield b'"]}'

    r = httpx.post(f"{proc.url}/score_texts", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(f"{proc.url}/health").json()["status"] == "healthy"
    ok = httpx.post(f"{proc.url}/score", json={"prompts": ["a"], "responses": ["b"]})
    assert ok.status_code == 200


def test_service_survives_every_bad_input(scorer):
    for body, _, _ in BAD_BODIES:
        httpx.post(f"{scorer.url}/score", json=body)
    httpx.post(f"{scorer.url}/score", content=b"\x00\xff", headers={"content-type": "application/json"})
    r = httpx.post(f"{scorer.url}/score", json={"prompts": PROMPTS[:2], "responses": RESPONSES[:2]})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 2


def test_truncation_is_reported_and_stable(scorer_factory):
    proc = scorer_factory("--max-length", "32")
    long = " then check the guide" * 40
    body = {"prompts": ["how do I bake bread?"] * 3, "responses": [" ok.", long, long]}
    first = httpx.post(f"{proc.url}/score", json=body).json()
    second = httpx.post(f"{proc.url}/score", json=body).json()
    assert first["truncated"] == [1, 2]
    assert first == second  # the same request is cut and scored the same way every time
    # the two cut texts are identical; in one batch their rows may differ in the last bits
    assert first["rewards"][1] == pytest.approx(first["rewards"][2], abs=1e-5)
    assert metric(httpx.get(f"{proc.url}/metrics").text, "scorer_truncated_items_total") == 4


def test_token_auth_guards_every_route_but_health(scorer_factory):
    proc = scorer_factory("--token", "s3cret")
    body = {"prompts": ["a"], "responses": ["b"]}
    assert httpx.get(f"{proc.url}/health").status_code == 200
    assert httpx.post(f"{proc.url}/score", json=body).status_code == 401
    assert httpx.get(f"{proc.url}/metrics").status_code == 401
    wrong = httpx.post(f"{proc.url}/score", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    right = httpx.post(f"{proc.url}/score", json=body, headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert ScorerClient(proc.url, token="s3cret").score(["a"], ["b"]).rewards == right.json()["rewards"]


def test_address_file_discovery(scorer):
    info = json.loads(scorer.address_file.read_text())
    assert info["url"] == scorer.url and info["port"] > 0 and info["pid"] == scorer.popen.pid
    with ScorerClient("auto", address_file=scorer.address_file) as client:
        assert client.url == scorer.url
        assert len(client.score(PROMPTS[:2], RESPONSES[:2])) == 2


def test_address_file_is_removed_on_shutdown(scorer_factory, tmp_path):
    proc = scorer_factory(address_file=tmp_path / "gone.json")
    assert proc.address_file.exists()
    proc.stop()  # SIGTERM, as scancel sends
    assert proc.popen.returncode is not None
    assert not proc.address_file.exists()


def test_metrics_count_what_happened(scorer_factory):
    proc = scorer_factory()
    for _ in range(3):
        httpx.post(f"{proc.url}/score", json={"prompts": ["a", "b"], "responses": ["c", "d"]})
    httpx.post(f"{proc.url}/score", json={"prompts": ["a"], "responses": []})
    text = httpx.get(f"{proc.url}/metrics").text
    assert metric(text, "scorer_requests_total", route="/score", status="200") == 3
    assert metric(text, "scorer_requests_total", route="/score", status="422") == 1
    assert metric(text, "scorer_items_total") == 6
    assert metric(text, "scorer_forward_batch_rows_sum") == 12  # reward and cost model, 2 rows each time
    assert metric(text, "scorer_queue_wait_seconds_count") == 3


def test_v1_layout_served_over_http_scores_current_minus_bias(scorer, scorer_factory, toy_models):
    old = scorer_factory(reward="reward-v1.0", cost="cost-v1.0")
    body = {"prompts": PROMPTS[:6], "responses": RESPONSES[:6]}
    current = httpx.post(f"{scorer.url}/score", json=body).json()
    v1 = httpx.post(f"{old.url}/score", json=body).json()
    biases = {}
    for kind in ("reward", "cost"):
        model = load_score_model(str(toy_models / kind))
        biases[kind] = model.model.score_head.bias.item()
    assert [a - biases["reward"] for a in current["rewards"]] == pytest.approx(v1["rewards"], abs=1e-4)
    assert [a - biases["cost"] for a in current["costs"]] == pytest.approx(v1["costs"], abs=1e-4)


@pytest.mark.parametrize("form", ["module", "script"])
def test_service_runs_as_module_and_as_script(form):
    import subprocess
    import sys

    from tests.conftest import REPO

    target = (
        ["-m", "alignment.scoring.scorer_service"]
        if form == "module"
        else [str(REPO / "alignment" / "scoring" / "scorer_service.py")]
    )
    out = subprocess.run(
        [sys.executable, *target, "--help"], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--reward-model" in out.stdout and "--address-file" in out.stdout
    assert "default 512" in " ".join(out.stdout.split())  # --max-length, with the reason


def test_fixed_prompt_table_ranks_the_contrasting_answers(scorer, capsys):
    from alignment.scoring.test_score_fixed_prompt import main

    assert main(["--url", scorer.url]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert set(rows) == {"refusal", "safe-helpful", "harmful", "empty"}
    reward = {k: float(v[1]) for k, v in rows.items()}
    cost = {k: float(v[2]) for k, v in rows.items()}
    assert cost["harmful"] > 0 >= cost["refusal"]
    assert cost["safe-helpful"] <= 0 < reward["safe-helpful"]
    assert reward["safe-helpful"] > reward["refusal"]
