"""Checkpoints of a persona run, LAPDOG's layout, written atomically::

    <checkpoint_dir>/<name>/checkpoint/step-N/
        reader/               T5 (HF from_pretrained format) + its tokenizer
        retriever/            the encoder (HF format) + its tokenizer
        training_state.pt     step, data position, optimizers, schedulers, every rank's RNG states
                              (alignment.rng), the reference model's source and hash, the index
                              fingerprint
        options.yaml          the run's options (alignment.config YAML)
    <checkpoint_dir>/<name>/checkpoint/latest -> step-N

A step folder is assembled beside its final name and swapped in whole (:func:`alignment.atomic.
replace_dir`), then ``latest`` is re-pointed in one rename: a crash leaves the previous
checkpoint and ``latest`` intact. ``--model_path …/checkpoint/latest`` starts a new run from it
(the SFT checkpoint an RL run starts from); ``--resume`` continues the run itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from alignment.atomic import replace_dir, replace_symlink
from alignment.config import save_config

CHECKPOINT = "checkpoint"
LATEST = "latest"
STATE_FILE = "training_state.pt"
OPTIONS_FILE = "options.yaml"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step folder ``latest`` points at, or None when the run has no checkpoint."""
    link = checkpoint_root(run_dir) / LATEST
    return link.resolve() if link.exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder (``…/step-N``, ``…/latest`` or a run folder holding ``checkpoint/latest``):
    ours (``reader/``) or LAPDOG's (``model.pth.tar``, see :mod:`alignment.persona.models`)."""
    path = Path(path)
    if (path / CHECKPOINT / LATEST).exists():
        path = path / CHECKPOINT / LATEST
    path = path.resolve()
    if not (path / "reader").is_dir() and not (path / "model.pth.tar").is_file():
        raise FileNotFoundError(
            f"{path} is not a persona checkpoint (no reader/ folder, no LAPDOG model.pth.tar)"
        )
    return path


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    reader,
    reader_tokenizer,
    retriever,
    retriever_tokenizer,
    options: Any,
    state: dict[str, Any],
) -> Path:
    """Write ``step-N`` atomically and point ``latest`` at it; returns the step folder."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reader.save_pretrained(tmp / "reader")
    reader_tokenizer.save_pretrained(tmp / "reader")
    retriever.save_pretrained(tmp / "retriever")
    retriever_tokenizer.save_pretrained(tmp / "retriever")
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    save_config(options, tmp / OPTIONS_FILE)
    replace_dir(tmp, final)
    replace_symlink(root / LATEST, final.name)
    return final


def load_state(step_dir: str | Path) -> dict[str, Any]:
    """The training state of a step folder (tensors, numbers, strings, containers only)."""
    return torch.load(Path(step_dir) / STATE_FILE, map_location="cpu", weights_only=True)


def load_options(step_dir: str | Path) -> dict[str, Any]:
    return yaml.safe_load((Path(step_dir) / OPTIONS_FILE).read_text(encoding="utf-8"))
