"""Ratings from pairwise judgments: the study's sequential Elo and Bradley–Terry with bootstrap CIs.

A judgment row is a mapping with ``model_a`` (shown first, as Assistant A), ``model_b``,
``dimension``, ``question`` and ``scores`` (``[score_a, score_b]`` or ``None`` when the verdict
could not be parsed). Its outcome for ``model_a`` is 1 (win), 0 (loss) or 0.5 (tie): a score gap of
``tie_threshold`` or less, or no scores, is a tie (:func:`outcome`).

Sequential Elo (:func:`sequential_elo`) is the study's recipe, which reproduces the published
``gpt_elo_ratings.json`` bit for bit from the published judgments: per dimension, the rows in
file order are shuffled by their own ``random.Random(seed)`` (one generator per dimension, not
one shared), then applied one by one with ``E_a = 1 / (1 + 10 ** ((R_b - R_a) / scale))``,
``E_b = 1 - E_a``, ``R_a += K (S_a - E_a)``, ``R_b += K ((1 - S_a) - E_b)``; finally every rating
is shifted so the baseline model has ``baseline_rating``. The result depends on the row order.

Bradley–Terry (:func:`bradley_terry`) is order-independent: the maximum-likelihood strengths
of ``P(i beats j) = p_i / (p_i + p_j)`` from the win counts, where a tie counts as half a win to
each side, reported on the Elo scale (``scale / ln 10 × ln p``) and shifted so the baseline is at
``baseline_rating``. Confidence intervals come from a percentile bootstrap that resamples whole
questions (a question's judgments are correlated: same answers, same judge reading).
"""

from __future__ import annotations

import logging
import math
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignment.cli import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EloConfig:
    """The study's sequential Elo settings (its defaults reproduce the published ratings)."""

    k: float = 32.0
    scale: float = 400.0
    start: float = 1000.0
    tie_threshold: float = 0.5
    seed: int = 123
    baseline: str = "Alpaca-7B"
    baseline_rating: float = 1000.0


@dataclass(frozen=True)
class BTConfig:
    """Bradley–Terry settings: Elo scale, baseline shift and the bootstrap."""

    scale: float = 400.0
    tie_threshold: float = 0.5
    baseline: str = "Alpaca-7B"
    baseline_rating: float = 1000.0
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    max_iter: int = 100
    tol: float = 1e-12


def outcome(scores: Sequence[float] | None, tie_threshold: float = 0.5) -> float:
    """Model A's result from ``[score_a, score_b]``: 1 win, 0 loss, 0.5 tie (gap ≤ threshold or None)."""
    if scores is None:
        return 0.5
    gap = float(scores[0]) - float(scores[1])
    if abs(gap) <= tie_threshold:
        return 0.5
    return 1.0 if gap > 0 else 0.0


def dimensions_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dimensions in order of first appearance."""
    return list(dict.fromkeys(str(r["dimension"]) for r in rows))


def models_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The models in order of first appearance (model_a before model_b within a row)."""
    return list(dict.fromkeys(m for r in rows for m in (str(r["model_a"]), str(r["model_b"]))))


def check_models(rows: Sequence[Mapping[str, Any]], models: Sequence[str], baseline: str) -> None:
    """Raise when the baseline is not among ``models`` or a row names a model outside them."""
    if baseline not in models:
        raise InputError(f"baseline model {baseline!r} is not among the models {sorted(models)}")
    unknown = sorted(set(models_of(rows)) - set(models))
    if unknown:
        raise InputError(f"judgments name model(s) {unknown} outside the rated models {sorted(models)}")


def sequential_elo(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], config: EloConfig = EloConfig()
) -> dict[str, float]:
    """Elo ratings ``{model: rating}`` from the rows of ONE dimension, in the study's order and update."""
    check_models(rows, models, config.baseline)
    order = list(rows)
    random.Random(config.seed).shuffle(order)
    ratings = {m: float(config.start) for m in models}
    for row in order:
        a, b = str(row["model_a"]), str(row["model_b"])
        s_a = outcome(row["scores"], config.tie_threshold)
        e_a = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / config.scale))
        e_b = 1 - e_a
        # both updates use the pre-game ratings (R_a is not read again before R_b changes)
        ratings[a] = ratings[a] + config.k * (s_a - e_a)
        ratings[b] = ratings[b] + config.k * ((1 - s_a) - e_b)
    base = ratings[config.baseline]
    return {m: r - base + config.baseline_rating for m, r in ratings.items()}


def elo_ratings(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], config: EloConfig = EloConfig()
) -> dict[str, dict[str, float]]:
    """``{dimension: {model: rating}}``: :func:`sequential_elo` on each dimension's rows in file order."""
    return {
        dim: sequential_elo([r for r in rows if r["dimension"] == dim], models, config)
        for dim in dimensions_of(rows)
    }


def win_matrix(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], tie_threshold: float = 0.5
) -> np.ndarray:
    """``W[i, j]``: wins of ``models[i]`` over ``models[j]`` (a tie adds 0.5 to both), shape (n, n).

    The entries are sums of halves, exact in float64, so the matrix does not depend on row order.
    """
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    for row in rows:
        a, b = index[str(row["model_a"])], index[str(row["model_b"])]
        s_a = outcome(row["scores"], tie_threshold)
        wins[a, b] += s_a
        wins[b, a] += 1 - s_a
    return wins


def _strongly_connected(wins: np.ndarray) -> bool:
    """Whether every model reaches every other along "beat at least half a time" edges."""
    reach = (wins > 0) | np.eye(len(wins), dtype=bool)
    for _ in range(max(1, int(math.ceil(math.log2(max(len(wins), 2)))))):
        reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
    return bool(reach.all())


def fit_bradley_terry(wins: np.ndarray, models: Sequence[str], config: BTConfig = BTConfig()) -> np.ndarray:
    """Maximum-likelihood log-strengths θ (natural log, baseline at 0) from a win matrix, shape (n,).

    Maximises ``Σ_ij W_ij log σ(θ_i − θ_j)`` by Newton's method with step halving; the baseline's θ is
    fixed at 0 (the likelihood only sees differences). The maximum exists and is unique exactly when
    the "won against" graph is strongly connected (Zermelo/Ford); otherwise some model won (or lost)
    everything against a group of others and its rating would be infinite: that raises.
    """
    n = len(models)
    if not _strongly_connected(wins):
        games = wins.sum(axis=1) + wins.sum(axis=0)
        unplayed = [m for m, g in zip(models, games, strict=True) if g == 0]
        unbeaten = [m for i, m in enumerate(models) if wins[:, i].sum() == 0 and games[i] > 0]
        winless = [m for i, m in enumerate(models) if wins[i].sum() == 0 and games[i] > 0]
        raise InputError(
            "Bradley–Terry maximum likelihood does not exist (ratings would be infinite): the models "
            "do not all beat or tie one another in a cycle"
            f"; never judged: {unplayed}; never lost: {unbeaten}; never won: {winless}"
        )
    games = wins + wins.T
    free = [i for i, m in enumerate(models) if m != config.baseline]
    theta = np.zeros(n)

    def loglik(t: np.ndarray) -> float:
        diff = t[:, None] - t[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum())

    current = loglik(theta)
    for _ in range(config.max_iter):
        prob = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (wins - games * prob).sum(axis=1)
        weight = games * prob * prob.T
        hessian = weight - np.diag(weight.sum(axis=1))  # negative semi-definite
        step = np.zeros(n)
        step[free] = np.linalg.solve(hessian[np.ix_(free, free)], -grad[free])
        scale = 1.0
        while True:
            candidate = theta + scale * step
            value = loglik(candidate)
            if value >= current - 1e-12 or scale < 1e-8:
                break
            scale /= 2
        theta, current = candidate, value
        if np.max(np.abs(scale * step)) < config.tol:
            break
    return theta


def to_elo_scale(theta: np.ndarray, models: Sequence[str], config: BTConfig) -> np.ndarray:
    """Log-strengths on the Elo scale with the baseline at ``baseline_rating``."""
    base = theta[list(models).index(config.baseline)]
    return config.baseline_rating + config.scale / math.log(10) * (theta - base)


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def bradley_terry(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], config: BTConfig = BTConfig()
) -> dict[str, dict[str, float]]:
    """``{model: {"rating", "ci_low", "ci_high"}}`` for the rows of ONE dimension.

    The bootstrap draws, ``n_bootstrap`` times, as many questions as there are, with replacement
    (questions sorted by text, generator seeded by ``seed`` and the dimension's name), refits on
    their judgments and takes the ``(1 ± ci) / 2`` percentiles (a warning, not an adjustment, when the
    point estimate falls outside them). Without a bootstrap the interval is None. Nothing depends on
    row order.
    """
    check_models(rows, models, config.baseline)
    models = list(models)
    point = to_elo_scale(fit_bradley_terry(win_matrix(rows, models, config.tie_threshold), models, config),
                         models, config)  # fmt: skip
    low, high = point.copy(), point.copy()
    if config.n_bootstrap > 0:
        questions = sorted({str(r["question"]) for r in rows})
        q_index = {q: i for i, q in enumerate(questions)}
        per_question = np.zeros((len(questions), len(models), len(models)))
        for row in rows:
            per_question[q_index[str(row["question"])]] += win_matrix([row], models, config.tie_threshold)
        dims = sorted({str(r["dimension"]) for r in rows})
        rng = np.random.default_rng([config.seed, *(zlib.crc32(d.encode()) for d in dims)])
        samples = np.empty((config.n_bootstrap, len(models)))
        for b in range(config.n_bootstrap):
            counts = np.bincount(rng.integers(0, len(questions), len(questions)), minlength=len(questions))
            wins = np.tensordot(counts.astype(float), per_question, axes=1)
            try:
                theta = fit_bradley_terry(wins, models, config)
            except ValueError as exc:
                raise InputError(
                    f"bootstrap resample {b} of {len(questions)} question(s): {exc}. "
                    "Too few questions for a bootstrap: judge more prompts or pass --bt-bootstrap 0"
                ) from exc
            samples[b] = to_elo_scale(theta, models, config)
        alpha = (1 - config.ci) / 2
        low, high = np.quantile(samples, alpha, axis=0), np.quantile(samples, 1 - alpha, axis=0)
        outside = [m for i, m in enumerate(models) if not low[i] <= point[i] <= high[i]]
        if outside:  # a skewed bootstrap on little data: reported as measured, not adjusted
            logger.warning("Bradley–Terry estimate outside its %d%% percentile interval for %s "
                           "(few questions?)", round(100 * config.ci), outside)  # fmt: skip
    else:  # no bootstrap, no interval (null in the JSON), rather than a zero-width one
        low = high = np.full(len(models), np.nan)
    return {
        m: {"rating": float(point[i]), "ci_low": _or_none(low[i]), "ci_high": _or_none(high[i])}
        for i, m in enumerate(models)
    }


def bradley_terry_report(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], config: BTConfig = BTConfig()
) -> dict[str, Any]:
    """The ``gpt_elo_bradley_terry.json`` document: settings plus ``ratings[dimension][model]``."""
    ratings = {}
    for dim in dimensions_of(rows):
        try:
            ratings[dim] = bradley_terry([r for r in rows if r["dimension"] == dim], models, config)
        except ValueError as exc:
            raise InputError(f"dimension {dim!r}: {exc}") from exc
    return {
        "method": "bradley-terry",
        "scale": config.scale,
        "baseline": config.baseline,
        "baseline_rating": config.baseline_rating,
        "n_bootstrap": config.n_bootstrap,
        "ci": config.ci,
        "seed": config.seed,
        "ties": "half a win to each side",
        "tie_threshold": config.tie_threshold,
        "bootstrap_unit": "question",
        "ratings": ratings,
    }


def comparison_rows(
    elo: Mapping[str, Mapping[str, float]], bt: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (dimension, model), best Elo first: elo, bt, bt_ci_low, bt_ci_high, judgments."""
    table = []
    for dim, ratings in elo.items():
        games = {m: sum(1 for r in rows if r["dimension"] == dim and m in (r["model_a"], r["model_b"]))
                 for m in ratings}  # fmt: skip
        for model in sorted(ratings, key=lambda m: -ratings[m]):
            entry = bt["ratings"][dim][model]
            table.append({"dimension": dim, "model": model, "elo": ratings[model], "bt": entry["rating"],
                          "bt_ci_low": entry["ci_low"], "bt_ci_high": entry["ci_high"],
                          "judgments": games[model]})  # fmt: skip
    return table


def format_comparison(table: Sequence[Mapping[str, Any]], ci: float) -> str:
    """A fixed-width text table of :func:`comparison_rows` for the log."""
    head = f"{'dimension':<14}{'model':<16}{'seq. Elo':>10}{'BT':>10}   {int(round(ci * 100))}% CI (BT)"
    lines = [head, "-" * len(head)]
    for r in table:
        lines.append(f"{r['dimension']:<14}{r['model']:<16}{r['elo']:>10.1f}{r['bt']:>10.1f}   "
                     + (f"[{r['bt_ci_low']:.1f}, {r['bt_ci_high']:.1f}]" if r["bt_ci_low"] is not None else "-"))  # fmt: skip
    return "\n".join(lines)
