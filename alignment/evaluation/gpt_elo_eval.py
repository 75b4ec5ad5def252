"""Pairwise GPT judging of models' answers, then sequential Elo and Bradley–Terry ratings.

    python -m alignment.evaluation.gpt_elo_eval --models Alpaca-7B Beaver-V3 ES-500 --num-prompts 50
    python -m alignment.evaluation.gpt_elo_eval --judgments FILE --ratings-only --output-dir OUT

The answers come from ``{points_dir}/{Model}_points.jsonl`` (the classification outputs). A seeded
sample of ``--num-prompts`` questions answered by every model is judged for every unordered pair
of models and both dimensions; ``--order random`` shows the pair in a seeded random order,
``--order both`` judges A/B and B/A. The key comes from the environment variable named by
``--api-key-env`` (a local server without auth takes any non-empty value, e.g. ``EMPTY``).

Outputs in ``--output-dir``:

- ``gpt_judgments.jsonl``: one row per judgment, appended (and fsynced) as each finishes:
  ``model_a`` (shown first), ``model_b``, ``dimension``, ``question``, ``scores`` ([a, b] or null
  when the verdict had no ``[[s1, s2]]``), ``order_ab``, ``raw``, ``judge_model``, ``verdict_parsing``
  (``--verdict-parsing``: ``study``, the study's parser and the default, or ``strict``; see
  :mod:`.judge`; one file holds one judge and one parsing). Re-running skips
  judgments already there (in random order mode a pair counts as done in either order); a
  truncated last line left by a crash is dropped and judged again.
- ``gpt_elo_ratings.json``: ``{dimension: {model: rating}}``, the study's sequential Elo.
- ``gpt_elo_bradley_terry.json``: Bradley–Terry ratings with bootstrap CIs (see :mod:`.elo`).
- ``gpt_elo_comparison.csv``: both side by side, also printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from alignment import cli
from alignment.atomic import write_text
from alignment.cli import InputError
from alignment.data import repair_jsonl_tail
from alignment.evaluation.comparisons import (
    POINTS_SUFFIX,
    list_models,
    model_file,
    read_points,
)
from alignment.evaluation.elo import (
    BTConfig,
    EloConfig,
    bradley_terry_report,
    comparison_rows,
    elo_ratings,
    format_comparison,
    models_of,
)
from alignment.evaluation.judge import (
    DIMENSIONS,
    VERDICT_PARSINGS,
    Judge,
    JudgeConfig,
    read_judgments,
    run_concurrently,
)

logger = logging.getLogger(__name__)

JUDGMENTS_FILE = "gpt_judgments.jsonl"
RATINGS_FILE = "gpt_elo_ratings.json"
BT_FILE = "gpt_elo_bradley_terry.json"
COMPARISON_FILE = "gpt_elo_comparison.csv"


@dataclass(frozen=True)
class Task:
    """One judgment to make: ``model_a``'s answer is shown first, as Assistant A."""

    model_a: str
    model_b: str
    dimension: str
    question: str
    answer_a: str
    answer_b: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model_a, self.model_b, self.dimension, self.question)


def load_answers(points_dir: str | Path, models: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{model: {prompt: response}}`` from the points files; a repeated prompt keeps its first answer."""
    answers: dict[str, dict[str, str]] = {}
    for model in models:
        path = model_file(points_dir, model, POINTS_SUFFIX)
        if not path.is_file():
            raise FileNotFoundError(f"{model}: no {path.name} in {points_dir}")
        by_prompt: dict[str, str] = {}
        for row in read_points(path):
            by_prompt.setdefault(str(row["prompt"]), str(row["response"]))
        answers[model] = by_prompt
    return answers


def sample_questions(answers: Mapping[str, Mapping[str, str]], num: int, seed: int) -> list[str]:
    """``num`` prompts answered by every model (all when ``num`` ≤ 0), seeded, in sample order."""
    models = list(answers)
    common = [q for q in answers[models[0]] if all(q in answers[m] for m in models[1:])]
    if num <= 0:
        return common
    if num > len(common):
        raise InputError(f"asked for {num} prompts but only {len(common)} are answered by all of {models}")
    return random.Random(seed).sample(common, num)


def build_tasks(
    models: Sequence[str],
    questions: Sequence[str],
    answers: Mapping[str, Mapping[str, str]],
    order: str,
    seed: int,
    dimensions: Sequence[str] = DIMENSIONS,
) -> list[Task]:
    """Every unordered pair × question × dimension; ``order`` "random" (seeded coin) or "both".

    The coin of a (pair, dimension, question) is seeded by its names, so it is the same in every run
    and for any order of ``models``.
    """
    if order not in ("random", "both"):
        raise InputError(f"order must be 'random' or 'both', got {order!r}")
    tasks = []
    for question in questions:
        for first, second in combinations(sorted(models), 2):
            for dim in dimensions:
                pairs = [(first, second), (second, first)]
                if order == "random":
                    swap = (
                        random.Random(f"{seed}\x1f{first}\x1f{second}\x1f{dim}\x1f{question}").random() < 0.5
                    )
                    pairs = [pairs[int(swap)]]
                tasks += [
                    Task(a, b, dim, question, answers[a][question], answers[b][question]) for a, b in pairs
                ]
    return tasks


def done_keys(rows: Sequence[Mapping[str, Any]], order: str) -> set[tuple[str, str, str, str]]:
    """Keys of judgments already made; in random mode each is also counted in the swapped order."""
    keys = set()
    for r in rows:
        keys.add((r["model_a"], r["model_b"], r["dimension"], r["question"]))
        if order == "random":
            keys.add((r["model_b"], r["model_a"], r["dimension"], r["question"]))
    return keys


def judge_tasks(tasks: Sequence[Task], judge: Judge, path: Path, concurrency: int) -> int:
    """Judge ``tasks`` concurrently, appending each row to ``path`` as it finishes; returns the count.

    Each line is flushed and fsynced, so a crash loses at most the calls in flight.
    """

    def call(task: Task) -> tuple[str, tuple[float, float] | None]:
        return judge.judge(task.dimension, task.question, task.answer_a, task.answer_b)

    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl_tail(path)
    written = unparsed = 0
    with open(path, "a", encoding="utf-8") as fh, tqdm(total=len(tasks), desc="judging", unit="pair") as bar:
        for task, (raw, scores) in run_concurrently(call, tasks, concurrency):
            if scores is None:
                unparsed += 1
                logger.warning("no [[s1, s2]] verdict for %s vs %s (%s); recorded as a tie",
                               task.model_a, task.model_b, task.dimension)  # fmt: skip
            row = {"model_a": task.model_a, "model_b": task.model_b, "dimension": task.dimension,
                   "question": task.question, "scores": list(scores) if scores else None,
                   "order_ab": [task.model_a, task.model_b], "raw": raw, "judge_model": judge.config.model,
                   "verdict_parsing": judge.config.verdict_parsing}  # fmt: skip
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            written += 1
            bar.update(1)
    logger.info("wrote %d judgment(s) to %s (%d without a parsable verdict)", written, path, unparsed)
    return written


def write_ratings(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], out_dir: Path, elo_config: EloConfig,
    bt_config: BTConfig,
) -> list[dict[str, Any]]:  # fmt: skip
    """Write the Elo, Bradley–Terry and comparison files; returns the comparison table rows.

    The Elo file is written first, so it survives a Bradley–Terry failure (which still raises).
    """
    if not rows:
        raise InputError("no judgments to rate")
    out_dir.mkdir(parents=True, exist_ok=True)
    elo = elo_ratings(rows, models, elo_config)
    write_text(out_dir / RATINGS_FILE, json.dumps(elo, indent=2) + "\n")
    bt = bradley_terry_report(rows, models, bt_config)
    write_text(out_dir / BT_FILE, json.dumps(bt, indent=2) + "\n")
    table = comparison_rows(elo, bt, rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    write_text(out_dir / COMPARISON_FILE, buffer.getvalue())
    logger.info("sequential Elo vs Bradley–Terry:\n%s", format_comparison(table, bt_config.ci))
    return table


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, prog="python -m alignment.evaluation.gpt_elo_eval")
    g = p.add_argument_group("what to judge")
    g.add_argument("--points-dir", default="alignment/outputs/model_comparisons",
                   help="folder of {Model}_points.jsonl")  # fmt: skip
    g.add_argument("--models", nargs="+", help="models to compare (default: every model in --points-dir; "
                   "with --ratings-only: every model in the judgments)")  # fmt: skip
    g.add_argument("--num-prompts", type=int, default=50, help="shared prompts to judge, ≤0: all")
    g.add_argument("--seed", type=int, default=0, help="prompt sample and A/B coin flips")
    g.add_argument("--order", choices=("random", "both"), default="random",
                   help="random: one seeded order per pair; both: A/B and B/A")  # fmt: skip
    g.add_argument(
        "--dimensions",
        nargs="+",
        choices=DIMENSIONS,
        default=list(DIMENSIONS),
        help="what the judge compares",
    )
    g.add_argument("--limit", type=int, default=0, help="judge at most this many pending pairs now (0: all)")
    j = p.add_argument_group("judge endpoint")
    j.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://host:8000/v1 "
                   "(default: OpenAI's)")  # fmt: skip
    j.add_argument("--judge-model", default="gpt-4.1-mini", help="the judge model's name at the endpoint")
    j.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the key")
    j.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    j.add_argument("--max-requests-per-minute", type=float, default=0.0, help="rate limit, 0: none")
    j.add_argument("--max-retries", type=int, default=6, help="retries on 429/5xx/connection errors")
    j.add_argument("--retry-initial-wait", type=float, default=1.0, help="first backoff in s, doubling")
    j.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    j.add_argument("--temperature", type=float, default=0.0, help="the judge's sampling temperature")
    j.add_argument("--max-tokens", type=int, default=1024, help="judge reply length cap")
    j.add_argument("--verdict-parsing", choices=VERDICT_PARSINGS, default="study",
                   help="study: first [[a, b]], spaced brackets allowed, as the published study parsed (comparable "
                   "with its judgments); strict: last [[a, b]]")  # fmt: skip
    r = p.add_argument_group("ratings")
    r.add_argument("--output-dir", default="alignment/outputs/gpt_elo", help="judgments and ratings")
    r.add_argument(
        "--judgments", default=None, help="judgments jsonl (default OUTPUT_DIR/gpt_judgments.jsonl)"
    )
    r.add_argument("--ratings-only", action="store_true", help="only recompute ratings from --judgments")
    r.add_argument("--baseline", default="Alpaca-7B", help="model pinned at --baseline-rating")
    r.add_argument("--baseline-rating", type=float, default=1000.0, help="the baseline's rating")
    r.add_argument("--elo-k", type=float, default=32.0, help="Elo K-factor")
    r.add_argument("--elo-scale", type=float, default=400.0, help="also Bradley–Terry's scale")
    r.add_argument(
        "--elo-start", type=float, default=1000.0, help="every model's Elo before the first judgment"
    )
    r.add_argument("--elo-seed", type=int, default=123, help="shuffle of each dimension's judgments")
    r.add_argument("--tie-threshold", type=float, default=0.5, help="score gap ≤ this is a tie")
    r.add_argument("--bt-bootstrap", type=int, default=1000, help="bootstrap resamples, 0: no CI")
    r.add_argument("--bt-ci", type=float, default=0.95, help="Bradley–Terry interval coverage")
    r.add_argument("--bt-seed", type=int, default=0, help="bootstrap seed")
    return p


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def run(a: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Judge what is missing (unless ``--ratings-only``), then rate; returns the comparison table, or
    None when ``--limit`` left judgments to do (no ratings then)."""
    out_dir = Path(a.output_dir)
    judgments = Path(a.judgments) if a.judgments else out_dir / JUDGMENTS_FILE
    elo_config = EloConfig(a.elo_k, a.elo_scale, a.elo_start, a.tie_threshold, a.elo_seed, a.baseline,
                           a.baseline_rating)  # fmt: skip
    bt_config = BTConfig(a.elo_scale, a.tie_threshold, a.baseline, a.baseline_rating, a.bt_bootstrap,
                         a.bt_ci, a.bt_seed)  # fmt: skip
    if a.ratings_only:
        _require(judgments.is_file(), f"--ratings-only: no judgments file {judgments}")
        rows = read_judgments(judgments)
        models = a.models or models_of(rows)
        _require(
            a.baseline in models, f"baseline {a.baseline!r} is not among the models {models}; pass --baseline"
        )
        rows = [r for r in rows if r["model_a"] in models and r["model_b"] in models]
        return write_ratings(rows, models, out_dir, elo_config, bt_config)

    # everything that can fail without a request fails here, before the first one
    api_key = os.environ.get(a.api_key_env, "").strip()
    _require(bool(api_key), f"no API key: environment variable {a.api_key_env} is unset or empty (a local "
             "server without auth accepts any value, e.g. EMPTY)")  # fmt: skip
    _require(a.concurrency >= 1, f"--concurrency must be ≥ 1, got {a.concurrency}")
    models = a.models or list_models(a.points_dir)
    _require(len(set(models)) == len(models) >= 2, f"need at least two distinct models, got {models}")
    _require(a.baseline in models, f"baseline {a.baseline!r} is not among the models {models}; pass --baseline "
             "or add it to --models")  # fmt: skip
    answers = load_answers(a.points_dir, models)
    questions = sample_questions(answers, a.num_prompts, a.seed)
    tasks = build_tasks(models, questions, answers, a.order, a.seed, a.dimensions)
    existing = read_judgments(judgments) if judgments.exists() else []
    judges = {r["judge_model"] for r in existing if "judge_model" in r} - {a.judge_model}
    _require(not judges, f"{judgments} holds judgments by {sorted(judges)}, not {a.judge_model}: "
             "use another --output-dir (or --judgments) per judge")  # fmt: skip
    parsings = {r["verdict_parsing"] for r in existing if "verdict_parsing" in r} - {a.verdict_parsing}
    _require(not parsings, f"{judgments} holds verdicts parsed as {sorted(parsings)}, not {a.verdict_parsing}: "
             "use another --output-dir (or --judgments) per parsing")  # fmt: skip
    done = done_keys(existing, a.order)
    missing = [t for t in tasks if t.key not in done]
    pending = missing[: a.limit] if a.limit > 0 else missing
    logger.info("%d models, %d prompts: %d judgments planned, %d already done, %d to judge now with %s",
                len(models), len(questions), len(tasks), len(tasks) - len(missing), len(pending),
                a.judge_model)  # fmt: skip
    if pending:
        config = JudgeConfig(model=a.judge_model, base_url=a.base_url, api_key=api_key,
                             temperature=a.temperature, max_tokens=a.max_tokens, concurrency=a.concurrency,
                             max_requests_per_minute=a.max_requests_per_minute, max_retries=a.max_retries,
                             retry_initial_wait=a.retry_initial_wait, timeout=a.timeout,
                             verdict_parsing=a.verdict_parsing)  # fmt: skip
        judge_tasks(pending, Judge(config), judgments, a.concurrency)
    if len(pending) < len(missing):  # ratings of a partial sample would mislead
        logger.info("%d judgment(s) still to do (--limit): rerun to finish; no ratings yet",
                    len(missing) - len(pending))  # fmt: skip
        return None
    wanted, dims = set(questions), set(a.dimensions)
    rows = [r for r in read_judgments(judgments)
            if r["model_a"] in models and r["model_b"] in models and r["question"] in wanted and r["dimension"] in dims]  # fmt: skip
    return write_ratings(rows, models, out_dir, elo_config, bt_config)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # not one line per request (openai 3 uses httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)
    table = run(a)
    if table is None:
        print("judging incomplete (--limit): rerun the same command to continue")
    else:
        out = Path(a.output_dir)
        print(f"ratings: {out / RATINGS_FILE}, {out / BT_FILE}, {out / COMPARISON_FILE}")
    return 0


# the judge endpoint's refusals (bad key, unknown model, unreachable) are the user's to fix
USER_ERRORS = (openai.OpenAIError,)

if __name__ == "__main__":
    cli.run(main, user_errors=USER_ERRORS)
