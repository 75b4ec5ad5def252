"""Ratings from pairwise judgments: the study's sequential Elo (bit-exact on the published data) and
Bradley–Terry (order-independent, recovers known strengths, bootstrap CIs)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from alignment.evaluation.elo import (
    BTConfig,
    EloConfig,
    bradley_terry,
    bradley_terry_report,
    elo_ratings,
    models_of,
    outcome,
    sequential_elo,
)
from tests.conftest import SHARED_REFERENCE

GPT_ELO = SHARED_REFERENCE / "anchor_outputs" / "gpt_elo"


def _reference_rows() -> list[dict]:
    path = GPT_ELO / "gpt_judgments.jsonl"
    if not path.is_file():
        pytest.skip(f"reference judgments absent: {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _row(a: str, b: str, scores: list[float] | None, question: str = "q", dim: str = "helpfulness") -> dict:
    return {"model_a": a, "model_b": b, "dimension": dim, "question": question, "scores": scores}


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([8, 4], 1.0),
        ([4, 8], 0.0),
        ([7.5, 7], 0.5),
        ([7, 7.5], 0.5),
        ([7, 7], 0.5),
        ([8, 7], 1.0),
        (None, 0.5),
    ],
)
def test_outcome_tie_threshold(scores: list[float] | None, expected: float) -> None:
    assert outcome(scores, 0.5) == expected


def test_sequential_elo_reproduces_reference_exactly() -> None:
    rows = _reference_rows()
    reference = json.loads((GPT_ELO / "gpt_elo_ratings.json").read_text())
    ratings = elo_ratings(rows, models_of(rows), EloConfig())
    assert ratings == reference  # float equality, every dimension and model
    assert list(ratings) == ["helpfulness", "harmlessness"]


def test_elo_baseline_and_unknown_models_fail_loud() -> None:
    rows = [_row("A", "B", [8, 2])]
    with pytest.raises(ValueError, match=r"baseline model 'Alpaca-7B' is not among the models \['A', 'B'\]"):
        sequential_elo(rows, ["A", "B"])
    with pytest.raises(ValueError, match=r"model\(s\) \['B'\] outside"):
        sequential_elo(rows, ["A", "Alpaca-7B"])


def test_bt_order_independent_elo_order_dependent() -> None:
    rows = _reference_rows()
    models = models_of(rows)
    config = BTConfig(n_bootstrap=30, seed=3)
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    assert elo_ratings(shuffled, models) != elo_ratings(rows, models)
    first, second = bradley_terry_report(rows, models, config), bradley_terry_report(shuffled, models, config)
    for dim, ratings in first["ratings"].items():
        for model, entry in ratings.items():
            for key, value in entry.items():
                assert second["ratings"][dim][model][key] == pytest.approx(value, abs=1e-9)
    assert first["ratings"]["helpfulness"]["Alpaca-7B"] == {
        "rating": 1000.0,
        "ci_low": 1000.0,
        "ci_high": 1000.0,
    }


def _synthetic(true: dict[str, float], games_per_pair: int, seed: int, ties: float = 0.0) -> list[dict]:
    """Judgments drawn from a Bradley–Terry model with Elo-scale ratings ``true`` (plus random ties)."""
    rng = np.random.default_rng(seed)
    rows = []
    names = list(true)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p_a = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
            for g in range(games_per_pair):
                u = rng.random()
                scores = [5, 5] if u < ties else ([8, 3] if rng.random() < p_a else [3, 8])
                pair = (a, b) if g % 2 else (b, a)
                if pair[0] != a:
                    scores = scores[::-1]
                rows.append(_row(*pair, scores, question=f"q{g % 200}"))
    return rows


def test_bt_recovers_known_strengths() -> None:
    true = {"Alpaca-7B": 1000.0, "M1": 1150.0, "M2": 1300.0, "M3": 900.0}
    rows = _synthetic(true, games_per_pair=3000, seed=0)
    result = bradley_terry(rows, list(true), BTConfig(n_bootstrap=60, seed=1))
    for model, rating in true.items():
        entry = result[model]
        assert entry["rating"] == pytest.approx(rating, abs=20), model
        assert entry["ci_low"] <= entry["rating"] <= entry["ci_high"], model
        if model != "Alpaca-7B":
            assert 2 < entry["ci_high"] - entry["ci_low"] < 80, model  # a real interval, not a placeholder
    assert result["Alpaca-7B"]["rating"] == 1000.0


def test_bt_ties_count_half_a_win() -> None:
    """A wins 3, loses 1, ties 2 of 6 → 4 of 6 "wins": p = 2/3, rating gap = 400·log10(2)."""
    rows = [_row("A", "Alpaca-7B", s, question=f"q{i}")
            for i, s in enumerate([[9, 1]] * 3 + [[1, 9]] + [[5, 5.5]] * 2)]  # fmt: skip
    result = bradley_terry(rows, ["A", "Alpaca-7B"], BTConfig(n_bootstrap=0))
    assert result["A"]["rating"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-6)
    assert result["A"]["ci_low"] is None and result["A"]["ci_high"] is None  # no bootstrap: no interval


def test_bt_without_finite_maximum_fails_loud() -> None:
    rows = [_row("A", "Alpaca-7B", [9, 1], question=f"q{i}") for i in range(3)]
    with pytest.raises(ValueError, match=r"does not exist.*never lost: \['A'\].*never won: \['Alpaca-7B'\]"):
        bradley_terry(rows, ["A", "Alpaca-7B"], BTConfig(n_bootstrap=0))


def test_bt_report_format() -> None:
    true = {"Alpaca-7B": 1000.0, "M1": 1100.0}
    rows = _synthetic(true, games_per_pair=200, seed=2, ties=0.2)
    rows += [dict(r, dimension="harmlessness") for r in rows]
    report = bradley_terry_report(rows, list(true), BTConfig(n_bootstrap=20, seed=5))
    assert {k: report[k] for k in ("method", "scale", "baseline", "baseline_rating", "n_bootstrap", "ci", "seed")} == {
        "method": "bradley-terry", "scale": 400.0, "baseline": "Alpaca-7B", "baseline_rating": 1000.0,
        "n_bootstrap": 20, "ci": 0.95, "seed": 5,
    }  # fmt: skip
    assert set(report["ratings"]) == {"helpfulness", "harmlessness"}
    for ratings in report["ratings"].values():
        assert set(ratings) == set(true)
        assert set(ratings["M1"]) == {"rating", "ci_low", "ci_high"}
    json.dumps(report, allow_nan=False)  # plain JSON: no NaN or infinity anywhere
