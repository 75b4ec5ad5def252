"""Balanced train/eval prompt sets from PKU-SafeRLHF, stratified by the two responses' safety labels.

    python -m alignment.evaluation.select_pku_balanced --source PKU-Alignment/PKU-SafeRLHF \
        --config alpaca-7b --split train --train-size 250 --eval-size 500 --seed 42 --out-dir alignment/data

The notebook ``select_pku_balanced.ipynb`` calls the same :func:`run_selection`.

Rows are bucketed by ``(is_response_0_safe, is_response_1_safe)``, e.g. ``"(True, False)"``. Each set
gets, per bucket, a quota in the data's own proportions (largest-remainder rounding, so the quotas sum
to the size exactly); rows are then drawn with ``random.Random(seed)``. Eval is drawn first, train from
what is left. By default no eval prompt appears in train (``disjoint_by="prompt"``: PKU-SafeRLHF has
several rows per prompt); ``"row"`` only keeps the rows distinct, which is what the published selection
did (one prompt is in both of its sets). Each set is written in a seeded random order, so any prefix
(``load_prompts(limit=n)``) stays mixed; the published files are grouped by bucket instead.

Outputs in ``out_dir`` (full PKU-SafeRLHF rows, the study's format): ``custom_train_N.jsonl``,
``custom_eval_M.jsonl``, ``custom_train_N_stats.json``, ``custom_eval_M_stats.json`` and the whole
data's statistics ``{config without punctuation}_stats.json`` (``alpaca7b_stats.json`` for alpaca-7b).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment import cli
from alignment.atomic import write_text
from alignment.cli import InputError
from alignment.data import is_local_source, load_rows

log = logging.getLogger(__name__)

HUB_DATASET = "PKU-Alignment/PKU-SafeRLHF"
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
REQUIRED_COLUMNS: dict[str, tuple[type, str]] = {  # column -> (type, what the error says it must be)
    "prompt": (str, "a string"),
    "is_response_0_safe": (bool, "true/false"),
    "is_response_1_safe": (bool, "true/false"),
    "response_0_harm_category": (Mapping, "an object of category -> true/false"),
    "response_1_harm_category": (Mapping, "an object of category -> true/false"),
}
SOURCE_COLUMNS = ("response_0_source", "response_1_source")
# The order the published stats list the buckets in; also the order quotas and draws go through.
BUCKETS = ("(True, True)", "(False, False)", "(False, True)", "(True, False)")
DISJOINT_MODES = ("prompt", "row")
NO_FILTER_CONFIGS = (None, "", "default")


class SelectionError(InputError):
    """The data cannot give the requested selection (sizes too large, overlap impossible)."""


@dataclass(frozen=True)
class PkuData:
    """Loaded PKU-SafeRLHF rows: ``rows`` are those of ``config``; ``total_rows`` counts before that filter."""

    rows: list[dict[str, Any]]
    origin: str
    config: str | None
    split: str
    total_rows: int


@dataclass(frozen=True)
class Selection:
    """Disjoint train and eval rows with the statistics of each and of the data they came from."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    train_stats: dict[str, Any]
    eval_stats: dict[str, Any]
    full_stats: dict[str, Any]
    config: str | None = None
    seed: int = 42
    quotas: dict[str, dict[str, int]] = field(default_factory=dict)


def bucket_key(row: Mapping[str, Any]) -> str:
    """``"(is_response_0_safe, is_response_1_safe)"``, the stats files' key, e.g. ``"(False, True)"``."""
    return str((row["is_response_0_safe"], row["is_response_1_safe"]))


def check_rows(rows: Sequence[Mapping[str, Any]], origin: str) -> None:
    """Raise a ValueError naming ``origin`` and the row (1-based) when a row lacks or mistypes a field."""
    if not rows:
        raise InputError(f"{origin}: no rows")
    for number, row in enumerate(rows, start=1):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise InputError(
                f"{origin}: row {number} is missing column(s) {missing} (needs {list(REQUIRED_COLUMNS)})"
            )
        for column, (kind, what) in REQUIRED_COLUMNS.items():
            if not isinstance(row[column], kind):
                raise InputError(f"{origin}: row {number}: {column} must be {what}, got {row[column]!r:.80}")


def compute_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The study's per-set statistics: bucket counts and proportions, harm-category counts, ``num_rows``.

    ``harm_counts_per_response`` counts each flagged category of each response (two per row at most per
    category); ``harm_counts_per_pair`` counts a row once per category flagged on either response. Buckets
    are listed in :data:`BUCKETS` order, categories in the order first seen, as in the published files.
    """
    check_rows(rows, "compute_stats")
    buckets: Counter[str] = Counter()
    per_response: Counter[str] = Counter()
    per_pair: Counter[str] = Counter()
    for row in rows:
        buckets[bucket_key(row)] += 1
        flagged = [[c for c, on in row[f"response_{i}_harm_category"].items() if on] for i in (0, 1)]
        per_response.update(flagged[0] + flagged[1])
        per_pair.update(dict.fromkeys(flagged[0] + flagged[1], 1))
    n, counts = len(rows), {k: buckets[k] for k in BUCKETS if k in buckets}
    return {
        "bucket_counts": counts,
        "bucket_proportions": {k: c / n for k, c in counts.items()},
        "harm_counts_per_response": dict(per_response),
        "harm_counts_per_pair": dict(per_pair),
        "num_rows": n,
    }


def full_data_stats(rows: Sequence[Mapping[str, Any]], total_rows: int | None = None) -> dict[str, Any]:
    """The whole data's statistics as in ``alpaca7b_stats.json``: ``total_rows`` (before the config
    filter), ``alpaca_rows`` (rows of the chosen config, those selected from), then the set statistics."""
    stats = compute_stats(rows)
    del stats["num_rows"]
    return {"total_rows": len(rows) if total_rows is None else total_rows, "alpaca_rows": len(rows), **stats}


def bucket_quotas(counts: Mapping[str, int], size: int) -> dict[str, int]:
    """Per-bucket quotas summing to ``size``, proportional to ``counts`` (largest remainder; ties go to
    the bigger bucket, then the :data:`BUCKETS` order). Buckets with no rows get no quota."""
    total = sum(counts.values())
    if total <= 0:
        raise SelectionError("no rows to take quotas from")
    keys = sorted(counts, key=lambda k: BUCKETS.index(k) if k in BUCKETS else len(BUCKETS))
    quotas = {k: size * counts[k] // total for k in keys}
    by_remainder = sorted(keys, key=lambda k: (-(size * counts[k] % total), -counts[k]))
    for k in by_remainder[: size - sum(quotas.values())]:
        quotas[k] += 1
    return quotas


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SelectionError(f"{name} must be a positive integer, got {value!r}")


def select_balanced(
    rows: Sequence[Mapping[str, Any]],
    train_size: int,
    eval_size: int,
    seed: int = 42,
    disjoint_by: str = "prompt",
    config: str | None = "alpaca-7b",
    total_rows: int | None = None,
    origin: str = "rows",
) -> Selection:
    """Stratified, seeded, disjoint train and eval sets from PKU-SafeRLHF-schema ``rows`` (see module doc).

    Raises :class:`SelectionError` when the sizes exceed the data or a bucket cannot fill both quotas
    disjointly (naming the bucket and the numbers), ValueError on malformed rows.
    """
    _check_size("train_size", train_size)
    _check_size("eval_size", eval_size)
    if disjoint_by not in DISJOINT_MODES:
        raise SelectionError(f"disjoint_by must be one of {DISJOINT_MODES}, got {disjoint_by!r}")
    check_rows(rows, origin)
    if train_size + eval_size > len(rows):
        raise SelectionError(f"train_size {train_size} + eval_size {eval_size} = {train_size + eval_size} "
                             f"exceeds the {len(rows)} rows of {origin}")  # fmt: skip
    pools: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        pools.setdefault(bucket_key(row), []).append(index)
    counts = {k: len(v) for k, v in pools.items()}
    quotas = {"train": bucket_quotas(counts, train_size), "eval": bucket_quotas(counts, eval_size)}
    for k in quotas["eval"]:
        need = quotas["train"][k] + quotas["eval"][k]
        if need > counts[k]:
            raise SelectionError(f"overlap impossible: bucket {k} needs {quotas['train'][k]} train + "
                                 f"{quotas['eval'][k]} eval = {need} rows but {origin} has only {counts[k]}")  # fmt: skip
    log.info("quotas per bucket: train %s, eval %s", quotas["train"], quotas["eval"])

    rng = random.Random(seed)
    eval_idx: list[int] = []
    rest: dict[str, list[int]] = {}
    for k in quotas["eval"]:
        order = pools[k][:]
        rng.shuffle(order)
        eval_idx += order[: quotas["eval"][k]]
        rest[k] = order[quotas["eval"][k] :]
    eval_prompts = {rows[i]["prompt"] for i in eval_idx}
    train_idx: list[int] = []
    for k, candidates in rest.items():
        if disjoint_by == "prompt":
            candidates = [i for i in candidates if rows[i]["prompt"] not in eval_prompts]
        if len(candidates) < quotas["train"][k]:
            raise SelectionError(
                f"overlap impossible: bucket {k} needs {quotas['train'][k]} train rows whose prompt is not in "
                f"the eval set, but only {len(candidates)} of its {counts[k]} rows remain after eval took "
                f"{quotas['eval'][k]} (use disjoint_by='row' to allow shared prompts)"
            )
        train_idx += candidates[: quotas["train"][k]]
    # A seeded shuffle of each set keeps every prefix balanced rather than grouped by bucket.
    rng.shuffle(eval_idx)
    rng.shuffle(train_idx)
    train, evaluation = [dict(rows[i]) for i in train_idx], [dict(rows[i]) for i in eval_idx]
    return Selection(train, evaluation, compute_stats(train), compute_stats(evaluation),
                     full_data_stats(rows, total_rows), config, seed, quotas)  # fmt: skip


def filter_config(rows: list[dict[str, Any]], config: str | None, origin: str) -> list[dict[str, Any]]:
    """The rows of ``config`` (e.g. alpaca-7b): those whose two response sources equal it ignoring case
    (PKU-SafeRLHF writes ``"Alpaca-7B"``). ``None``/``"default"`` keeps every row, and so do rows without
    source columns (a warning says the config could not be checked)."""
    if config in NO_FILTER_CONFIGS:
        return rows
    if not any(c in row for row in rows for c in SOURCE_COLUMNS):
        log.warning("%s has no response sources: config %s not checked, all rows kept", origin, config)
        return rows
    kept = []
    for number, row in enumerate(rows, start=1):
        missing = [c for c in SOURCE_COLUMNS if c not in row]
        if missing:
            raise InputError(f"{origin}: row {number} is missing column(s) {missing} that other rows have")
        if all(str(row[c]).lower() == config.lower() for c in SOURCE_COLUMNS):
            kept.append(row)
    if not kept:
        found = Counter(str(row[c]) for row in rows for c in SOURCE_COLUMNS)
        raise InputError(f"{origin}: no rows of config {config!r}; response sources found: {dict(found)}")
    return kept


def load_pku(
    source: str | Path = HUB_DATASET, config: str | None = "alpaca-7b", split: str = "train"
) -> PkuData:
    """PKU-SafeRLHF rows of ``config``: from a local .jsonl/.json/.parquet path (``split`` does not apply:
    the file is one split), or else through ``datasets.load_dataset(source, name=config, split=split)``.
    Both then keep only rows whose response sources match ``config`` (see :func:`filter_config`)."""
    local = is_local_source(source)
    origin = str(source) if local else f"{source} (config {config}, split {split})"
    rows = load_rows(source, config, split, given_by="--source")
    check_rows(rows, origin)
    kept = filter_config(rows, config, origin)
    log.info("loaded %d rows from %s, %d of config %s", len(rows), origin, len(kept), config)
    return PkuData(rows=kept, origin=origin, config=config, split=split, total_rows=len(rows))


def full_stats_name(config: str | None) -> str:
    """The whole-data stats file name: ``alpaca7b_stats.json`` for alpaca-7b, ``default_stats.json`` for none."""
    return f"{''.join(ch for ch in (config or 'default') if ch.isalnum())}_stats.json"


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_selection(selection: Selection, out_dir: str | Path = DATA_DIR) -> dict[str, Path]:
    """Write the five files (atomically) and return their paths under the keys train, eval, train_stats,
    eval_stats, full_stats. jsonl rows keep every column; stats are indented JSON like the reference."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, m = len(selection.train), len(selection.eval)
    texts = {
        out / f"custom_train_{n}.jsonl": _jsonl(selection.train),
        out / f"custom_eval_{m}.jsonl": _jsonl(selection.eval),
        out / f"custom_train_{n}_stats.json": json.dumps(selection.train_stats, indent=2),
        out / f"custom_eval_{m}_stats.json": json.dumps(selection.eval_stats, indent=2),
        out / full_stats_name(selection.config): json.dumps(selection.full_stats, indent=2),
    }
    for path, text in texts.items():
        write_text(path, text)
    return dict(zip(("train", "eval", "train_stats", "eval_stats", "full_stats"), texts, strict=True))


def run_selection(
    source: str | Path = HUB_DATASET,
    config: str | None = "alpaca-7b",
    split: str = "train",
    train_size: int = 250,
    eval_size: int = 500,
    seed: int = 42,
    out_dir: str | Path = DATA_DIR,
    disjoint_by: str = "prompt",
) -> tuple[Selection, dict[str, Path]]:
    """Load, select and write: the one entry point of the CLI and the notebook."""
    data = load_pku(source, config, split)
    selection = select_balanced(data.rows, train_size, eval_size, seed=seed, disjoint_by=disjoint_by,
                                config=config, total_rows=data.total_rows, origin=data.origin)  # fmt: skip
    return selection, write_selection(selection, out_dir)


def plot_bucket_proportions(stats: Mapping[str, Mapping[str, Any]], ax: Any = None) -> Any:
    """Grouped bars of ``bucket_proportions`` per named stats dict (e.g. full, train, eval); returns the
    Axes (a new Figure's when ``ax`` is None; no pyplot state is touched then)."""
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(7, 4)).subplots()
    width = 0.8 / max(len(stats), 1)
    for i, (name, s) in enumerate(stats.items()):
        heights = [s["bucket_proportions"].get(k, 0.0) for k in BUCKETS]
        ax.bar(
            [b + (i - (len(stats) - 1) / 2) * width for b in range(len(BUCKETS))], heights, width, label=name
        )
    ax.set_xticks(range(len(BUCKETS)), [f"safe {k}" for k in BUCKETS])
    ax.set_ylabel("proportion of rows")
    ax.set_title("(is_response_0_safe, is_response_1_safe) buckets")
    ax.legend()
    return ax


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument(
        "--source", default=HUB_DATASET, help="hub dataset name or a local .jsonl/.json/.parquet file"
    )
    p.add_argument("--config", default="alpaca-7b", help="dataset config; 'default' = all")
    p.add_argument("--split", default="train", help="hub split (a local file is one split)")
    p.add_argument("--train-size", type=int, default=250, help="train rows")
    p.add_argument("--eval-size", type=int, default=500, help="eval rows")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    p.add_argument("--out-dir", type=Path, default=DATA_DIR, help="output folder")
    p.add_argument("--disjoint-by", choices=DISJOINT_MODES, default="prompt",
                   help="keep eval prompts out of train (prompt) or only distinct rows (row)")  # fmt: skip
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _, paths = run_selection(a.source, a.config, a.split, a.train_size, a.eval_size, a.seed, a.out_dir,
                             a.disjoint_by)  # fmt: skip
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
