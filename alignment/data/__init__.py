"""Prompt data: the selection notebook writes ``custom_train_*.jsonl`` / ``custom_eval_*.jsonl`` here,
:func:`load_prompts` is how every trainer and evaluation reads a prompt file, and :func:`load_rows`
reads a dataset by hub name or from a local jsonl/parquet file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_prompts(
    path: str | Path | None, key: str = "prompt", default: Sequence[str] = (), limit: int | None = None
) -> list[str]:
    """The ``key`` column of a jsonl file (``default`` when ``path`` is None), at most ``limit`` rows."""
    if path is None:
        prompts = list(default)
    else:
        prompts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{n} has no string field {key!r} (set prompt_key)")
                prompts.append(row[key])
        if not prompts:
            raise ValueError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


def load_rows(source: str | Path, config: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a dataset: a local ``.jsonl``/``.json``/``.parquet`` file, else a hub dataset name.

    Hub names go through ``datasets.load_dataset(source, name=config, split=split)`` (cached, so
    ``HF_HUB_OFFLINE=1`` works once downloaded); ``config`` and ``split`` do not apply to files.
    """
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc
        else:
            raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")
        if not rows:
            raise ValueError(f"{path} holds no rows")
        return rows
    if path.suffix.lower() in (".jsonl", ".json", ".parquet") or path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    import datasets

    return datasets.load_dataset(str(source), name=config, split=split).to_list()
