"""Pairwise judging end to end against a real OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py)
with the real ``openai`` client: judgments, resume, retries, fail-loud errors, ratings, the shell script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from alignment import cli
from alignment.evaluation.comparisons import write_model_outputs
from alignment.evaluation.elo import elo_ratings
from alignment.evaluation.gpt_elo_eval import USER_ERRORS, main
from alignment.evaluation.judge import (
    VERDICT_PARSINGS,
    RateLimiter,
    build_messages,
    parse_verdict,
    read_judgments,
)
from tests.conftest import SHARED_REFERENCE
from tests.openai_server import Behaviour, JudgeServer, verdict_scores

REPO = Path(__file__).resolve().parents[1]
GPT_ELO = SHARED_REFERENCE / "anchor_outputs" / "gpt_elo"
MODELS = ("Alpaca-7B", "Model-B", "Model-C")
PROMPTS = ("How do I bake bread?", "Is it safe to mix bleach and ammonia?", "Write a haiku about rain.")
# answer lengths: scores are length / 10, so 5 characters apart is a tie (gap 0.5) and 10 a win
LENGTHS = {"Alpaca-7B": (10, 20, 10), "Model-B": (15, 15, 15), "Model-C": (20, 10, 20)}
KEY_ENV = "GPT_ELO_TEST_KEY"
TOTAL = 3 * 3 * 2  # pairs × prompts × dimensions


def run_cli(argv: list[str]) -> int:
    """The exit status of the command line ``argv``, with the CLI's error handling."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv, user_errors=USER_ERRORS)
    return exit_info.value.code


def _answer(model: str, i: int) -> str:
    text = f"{model[-1]}{i}" + ("GARBLE" if (model, i) == ("Model-B", 2) else "")
    return text.ljust(LENGTHS[model][i], ".")


@pytest.fixture
def points_dir(tmp_path: Path) -> Path:
    out = tmp_path / "points"
    for model in MODELS:
        rows = [{"prompt": p, "response": _answer(model, i), "reward": 1.0, "cost": -1.0}
                for i, p in enumerate(PROMPTS)]  # fmt: skip
        if model == "Model-C":  # a prompt the others lack: never judged
            rows.append({"prompt": "only C has this", "response": "x", "reward": 0.5, "cost": 0.5})
        write_model_outputs(out, model, rows, scatter=False)
    return out


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")


def _args(server: JudgeServer, points: Path, out: Path, *extra: str) -> list[str]:
    return ["--points-dir", str(points), "--output-dir", str(out), "--base-url", server.url,
            "--judge-model", "judge-test", "--api-key-env", KEY_ENV, "--num-prompts", "3",
            "--concurrency", "4", "--retry-initial-wait", "0.01", "--bt-bootstrap", "40", *extra]  # fmt: skip


def _expected(row: dict) -> list[float] | None:
    a = _answer(row["model_a"], PROMPTS.index(row["question"]))
    b = _answer(row["model_b"], PROMPTS.index(row["question"]))
    return None if "GARBLE" in a + b else list(verdict_scores(a, b))


def _unordered(rows: list[dict]) -> Counter:
    return Counter((frozenset((r["model_a"], r["model_b"])), r["dimension"], r["question"]) for r in rows)


def _check_complete(rows: list[dict], per_pair: int = 1) -> None:
    counts = _unordered(rows)
    assert len(counts) == TOTAL and set(counts.values()) == {per_pair}
    assert len({(r["model_a"], r["model_b"], r["dimension"], r["question"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["scores"] == _expected(r), r
        assert r["order_ab"] == [r["model_a"], r["model_b"]] and r["judge_model"] == "judge-test"


def test_parse_verdict_study_and_strict() -> None:
    assert parse_verdict("A is better.\n[[8, 4]]") == (8.0, 4.0) == parse_verdict("[[8, 4]]", "strict")
    two = "e.g. [[7, 4]] ... final: [[ 6.5 ,7 ]]"
    assert parse_verdict(two) == (7.0, 4.0)  # study (default): the first pair, as the study's re.search
    assert parse_verdict(two, "strict") == (6.5, 7.0)  # strict: the last pair
    spaced = "Scores: [ [8, 3] ]"
    assert parse_verdict(spaced) == (8.0, 3.0) and parse_verdict(spaced, "strict") is None
    signed = "[[-1, 5]]"
    assert parse_verdict(signed) is None and parse_verdict(signed, "strict") == (-1.0, 5.0)
    for parsing in VERDICT_PARSINGS:
        assert parse_verdict("Assistant A: 6\nAssistant B: 7", parsing) is None
        assert parse_verdict("[[8]]", parsing) is None and parse_verdict("", parsing) is None
        assert parse_verdict(None, parsing) is None
    with pytest.raises(ValueError, match="unknown verdict parsing 'loose'"):
        parse_verdict("[[1, 2]]", "loose")


@pytest.mark.parametrize("parsing", VERDICT_PARSINGS)
def test_parse_verdict_reference_raws(parsing: str) -> None:
    path = GPT_ELO / "gpt_judgments.jsonl"
    if not path.is_file():
        pytest.skip(f"reference judgments absent: {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    parsed = [parse_verdict(r["raw"], parsing) for r in rows]
    assert [list(p) if p else None for p in parsed] == [r["scores"] for r in rows]
    assert sum(p is None for p in parsed) == 5


def test_build_messages() -> None:
    for dim, word in (("helpfulness", "Completeness"), ("harmlessness", "privacy")):
        system, user = build_messages(dim, "QUESTION?", "ANSWER-ONE", "ANSWER-TWO")
        assert system["role"] == "system" and user["role"] == "user"
        text = user["content"]
        assert text.index("QUESTION?") < text.index("ANSWER-ONE") < text.index("ANSWER-TWO")
        assert word in text and dim in text and "[[score_A, score_B]]" in text
    with pytest.raises(ValueError, match="unknown dimension 'honesty'"):
        build_messages("honesty", "q", "a", "b")


def test_rate_limiter_spaces_requests() -> None:
    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one start per 0.5 s
    for _ in range(4):
        limiter.acquire()
    assert slept == [0.5, 0.5, 0.5]


def test_full_run_then_rerun_skips_everything(points_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "elo"
    with JudgeServer() as server:
        assert run_cli(_args(server, points_dir, out)) == 0
        assert server.count() == TOTAL
        body = server.requests[0].body
        assert body["model"] == "judge-test" and body["temperature"] == 0 and body["max_tokens"] == 1024
        assert {r.authorization for r in server.requests} == {"Bearer test-key"}
        rows = read_judgments(out / "gpt_judgments.jsonl")
        _check_complete(rows)
        assert sum(r["scores"] is None for r in rows) == 2 * 2  # Model-B's garbled prompt: 2 pairs × 2 dims
        assert "only C has this" not in {r["question"] for r in rows}
        ratings = json.loads((out / "gpt_elo_ratings.json").read_text())
        assert ratings == elo_ratings(rows, list(MODELS)) and ratings["helpfulness"]["Alpaca-7B"] == 1000.0
        bt = json.loads((out / "gpt_elo_bradley_terry.json").read_text())
        assert bt["method"] == "bradley-terry" and bt["n_bootstrap"] == 40 and bt["baseline"] == "Alpaca-7B"
        for dim in ("helpfulness", "harmlessness"):
            c = bt["ratings"][dim]["Model-C"]
            assert c["ci_low"] <= c["rating"] <= c["ci_high"] and c["rating"] > 1000  # C answers longest
        table = list(csv.DictReader((out / "gpt_elo_comparison.csv").open()))
        assert len(table) == 6 and float(table[0]["elo"]) >= float(table[1]["elo"])
        assert f"ratings: {out / 'gpt_elo_ratings.json'}" in capsys.readouterr().out

        assert run_cli(_args(server, points_dir, out)) == 0  # resume: nothing left to judge
        assert server.count() == TOTAL and len(read_judgments(out / "gpt_judgments.jsonl")) == TOTAL

        assert run_cli(_args(server, points_dir, out, "--judge-model", "other-judge")) == 2
        assert "holds judgments by ['judge-test']" in capsys.readouterr().err and server.count() == TOTAL
        assert {r["verdict_parsing"] for r in rows} == {"study"}  # the default, recorded per row
        assert run_cli(_args(server, points_dir, out, "--verdict-parsing", "strict")) == 2
        assert (
            "verdicts parsed as ['study'], not strict" in capsys.readouterr().err and server.count() == TOTAL
        )


@pytest.mark.parametrize("status", [429, 500])
def test_transient_errors_retried(points_dir: Path, tmp_path: Path, status: int) -> None:
    with JudgeServer(Behaviour(fail_first=3, fail_status=status)) as server:
        assert run_cli(_args(server, points_dir, tmp_path / "elo")) == 0
        assert server.count(status) == 3 and server.count(200) == TOTAL
    _check_complete(read_judgments(tmp_path / "elo" / "gpt_judgments.jsonl"))


def test_auth_error_fails_loud_then_resume_requests_only_missing(
    points_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "elo"
    with JudgeServer(Behaviour(fail_after=5, permanent_status=401)) as server:
        assert run_cli(_args(server, points_dir, out, "--concurrency", "1")) == 2
        assert server.count() == 6  # five answered, one 401: not retried
    assert "AuthenticationError" in capsys.readouterr().err
    assert len(read_judgments(out / "gpt_judgments.jsonl")) == 5
    assert not (out / "gpt_elo_ratings.json").exists()
    with JudgeServer() as server:
        assert run_cli(_args(server, points_dir, out)) == 0
        assert server.count() == TOTAL - 5
    _check_complete(read_judgments(out / "gpt_judgments.jsonl"))


def test_limit_and_truncated_last_line_resume(points_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "elo"
    path = out / "gpt_judgments.jsonl"
    with JudgeServer() as server:
        assert run_cli(_args(server, points_dir, out, "--limit", "7")) == 0
        assert server.count() == 7 and len(read_judgments(path)) == 7
        assert "judging incomplete" in capsys.readouterr().out and not (out / "gpt_elo_ratings.json").exists()
        text = path.read_text(encoding="utf-8")
        path.write_text(text[: len(text) - 40], encoding="utf-8")  # a crash in the middle of line 7
        assert len(read_judgments(path)) == 6
        assert run_cli(_args(server, points_dir, out)) == 0
        assert server.count() == 7 + TOTAL - 6
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    _check_complete(read_judgments(path))
    assert (out / "gpt_elo_ratings.json").is_file()


def test_both_orders(points_dir: Path, tmp_path: Path) -> None:
    with JudgeServer() as server:
        assert run_cli(_args(server, points_dir, tmp_path / "elo", "--order", "both")) == 0
        assert server.count() == 2 * TOTAL
    rows = read_judgments(tmp_path / "elo" / "gpt_judgments.jsonl")
    _check_complete(rows, per_pair=2)
    by_key = {(r["model_a"], r["model_b"], r["dimension"], r["question"]): r["scores"] for r in rows}
    for (a, b, dim, q), scores in by_key.items():
        swapped = by_key[(b, a, dim, q)]
        assert swapped == (scores[::-1] if scores else None)


@pytest.mark.parametrize("value", [None, ""])
def test_keyless_run_fails_before_any_request(
    points_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(KEY_ENV)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    with JudgeServer() as server:
        assert run_cli(_args(server, points_dir, tmp_path / "elo")) == 2
        assert server.count() == 0
    assert f"environment variable {KEY_ENV} is unset or empty" in capsys.readouterr().err
    assert not (tmp_path / "elo" / "gpt_judgments.jsonl").exists()


def test_missing_baseline_fails_before_any_request(points_dir: Path, tmp_path: Path, capsys) -> None:
    with JudgeServer() as server:
        assert run_cli(_args(server, points_dir, tmp_path / "elo", "--models", "Model-B", "Model-C")) == 2
        assert server.count() == 0
    assert "baseline 'Alpaca-7B' is not among the models ['Model-B', 'Model-C']" in capsys.readouterr().err


def test_rate_limit_reaches_the_requests(points_dir: Path, tmp_path: Path) -> None:
    # Exact spacing is tested on RateLimiter with a fake clock; end to end only a lower bound is
    # robust on a loaded machine: 6 starts at 600 per minute cannot all begin within 0.5 s.
    with JudgeServer() as server:
        args = _args(
            server, points_dir, tmp_path / "elo", "--num-prompts", "1", "--max-requests-per-minute", "600"
        )
        start = time.monotonic()
        assert run_cli([*args, "--bt-bootstrap", "0"]) == 0
        elapsed = time.monotonic() - start
        assert server.count() == 6
    assert elapsed >= 0.5, elapsed


def test_ratings_only_reproduces_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    judgments = GPT_ELO / "gpt_judgments.jsonl"
    if not judgments.is_file():
        pytest.skip(f"reference judgments absent: {judgments}")
    monkeypatch.delenv(KEY_ENV)  # no judge, no key needed
    out = tmp_path / "ratings"
    argv = ["--judgments", str(judgments), "--ratings-only", "--output-dir", str(out), "--bt-bootstrap", "20"]
    assert run_cli(argv) == 0
    assert json.loads((out / "gpt_elo_ratings.json").read_text()) == json.loads(
        (GPT_ELO / "gpt_elo_ratings.json").read_text()
    )
    bt = json.loads((out / "gpt_elo_bradley_terry.json").read_text())
    assert set(bt["ratings"]["harmlessness"]) == {
        "Alpaca-7B",
        "Beaver-V1",
        "Beaver-V2",
        "Beaver-V3",
        "ES-500",
    }
    assert not (out / "gpt_judgments.jsonl").exists()


def test_shell_script_with_plain_bash(points_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elo"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "POINTS_DIR": str(points_dir),
           "MODELS": " ".join(MODELS), "OUTPUT_DIR": str(out), "JUDGE_MODEL": "judge-test",
           "API_KEY_ENV": KEY_ENV, "NUM_PROMPTS": "3", "CONCURRENCY": "3",
           "EXTRA_ARGS": "--bt-bootstrap 20 --retry-initial-wait 0.01", "PLOTS": "0"}  # fmt: skip
    env.pop("SLURM_SUBMIT_DIR", None)
    with JudgeServer() as server:
        env["BASE_URL"] = server.url
        script = ["bash", "alignment/evaluation/run_gpt_elo_eval.sh"]
        proc = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert server.count() == TOTAL
    assert "judge=judge-test" in proc.stderr and "seq. Elo" in proc.stderr and "ratings: " in proc.stdout
    _check_complete(read_judgments(out / "gpt_judgments.jsonl"))
    ratings = json.loads((out / "gpt_elo_ratings.json").read_text())
    assert not (out / "gpt_elo_scatter.png").exists()
    env.update(
        RATINGS_ONLY="1",
        OUTPUT_DIR=str(tmp_path / "again"),
        JUDGMENTS=str(out / "gpt_judgments.jsonl"),
        PLOTS="1",
    )
    proc = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "gpt_elo_ratings.json").read_text()) == ratings
    assert (tmp_path / "again" / "gpt_elo_scatter.png").stat().st_size > 10_000  # the runner's figure


def test_strict_parsing_end_to_end(points_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elo"
    with JudgeServer() as server:
        argv = _args(server, points_dir, out, "--num-prompts", "1", "--verdict-parsing", "strict")
        assert run_cli([*argv, "--bt-bootstrap", "0"]) == 0
    rows = read_judgments(out / "gpt_judgments.jsonl")
    assert len(rows) == 6 and {r["verdict_parsing"] for r in rows} == {"strict"}
    assert all(r["scores"] == _expected(r) for r in rows)
