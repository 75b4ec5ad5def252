"""Prompt data: the selection notebook writes ``custom_train_*.jsonl`` / ``custom_eval_*.jsonl`` here,
:func:`load_prompts` is how every trainer and evaluation reads a prompt file, and :func:`load_rows`
reads a dataset by hub name or from a local jsonl/parquet file."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from alignment import hub
from alignment.cli import InputError

logger = logging.getLogger(__name__)


def iter_jsonl(path: str | Path, drop_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a jsonl file; a bad line raises naming file:line.

    ``drop_torn_tail``: a last line that is not JSON and has no newline after it was cut short by a
    crash while appending; it is skipped with a warning instead (append-only logs).
    """
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if drop_torn_tail and number == len(lines):
                logger.warning("%s:%d: dropping a truncated last line (%d chars)", path, number, len(line))
                continue
            raise InputError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def repair_jsonl_tail(path: str | Path) -> None:
    """Before appending to a jsonl log: a last line cut short by a crash (no newline, not JSON) is
    removed, and one that is whole JSON but lost its newline gets it back, so the next row starts on
    a line of its own."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    tail_start = data.rfind(b"\n") + 1
    try:
        json.loads(data[tail_start:])
    except json.JSONDecodeError:
        logger.warning("%s: dropping a truncated last line before appending", path)
        with open(path, "r+b") as fh:
            fh.truncate(tail_start)
        return
    with open(path, "ab") as fh:
        fh.write(b"\n")


def load_prompts(
    path: str | Path | None, key: str = "prompt", default: Sequence[str] = (), limit: int | None = None
) -> list[str]:
    """The ``key`` column of a jsonl file (``default`` when ``path`` is None), at most ``limit`` rows."""
    if path is None:
        prompts = list(default)
    else:
        prompts = []
        for n, row in iter_jsonl(path):
            if not isinstance(row.get(key), str):
                raise InputError(f"{path}:{n} has no string field {key!r} (set prompt_key)")
            prompts.append(row[key])
        if not prompts:
            raise InputError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_rows_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl (one object per line), .json (an array of objects) or .parquet file."""
    path = Path(path)
    if path.suffix not in LOCAL_SUFFIXES:
        raise InputError(f"{path}: unsupported file type (use one of {LOCAL_SUFFIXES})")
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{path}: a .json source must hold an array of row objects")
        return data
    return [row for _, row in iter_jsonl(path)]


def is_local_source(source: str | Path) -> bool:
    """A path to a data file (existing, or named like one), as opposed to a hub dataset name."""
    path = Path(source)
    return path.suffix in LOCAL_SUFFIXES or path.exists()


def load_rows(
    source: str | Path, config: str | None = None, split: str = "train", given_by: str = "the data source"
) -> list[dict[str, Any]]:
    """Rows of a dataset: a local ``.jsonl``/``.json``/``.parquet`` file, else a hub dataset name.

    Hub names go through ``datasets.load_dataset(source, name=config, split=split)`` (cached, so
    ``HF_HUB_OFFLINE=1`` works once downloaded); ``config`` and ``split`` do not apply to files. A
    hub name that cannot be loaded is an :class:`alignment.hub.HubError` naming it and ``given_by``
    (the flag or key that names a local file instead).
    """
    if is_local_source(source):
        rows = read_rows_file(source)
        if not rows:
            raise InputError(f"{source}: no rows")
        return rows
    return hub.load_dataset(str(source), given_by, name=config or None, split=split).to_list()
