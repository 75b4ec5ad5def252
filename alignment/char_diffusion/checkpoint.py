"""``ckpt.pt`` files: written atomically, read back strictly, and checked for what they are.

A checkpoint is one ``torch.save`` dict::

    format        "alignment.char_diffusion.ckpt/1"
    kind          "generator" or "judge" (a GRPO run saves its policy as a generator)
    model_args    the :class:`~.model.ModelArgs` fields
    model         the state dict (every key must match the rebuilt model: missing or unexpected
                  keys are an error naming the file, never skipped)
    vocab         the vocabulary (id -> token), compared with the data's and the other models'
    iteration     optimiser steps taken
    config        the run's config as a plain dict
    optimizer, scheduler   their state dicts (None in a file made only for inference)
    rng           torch CPU (+ CUDA) and Python RNG states (:func:`alignment.rng.rng_state`)
    extra         anything the trainer adds (e.g. the reference fingerprint of a GRPO run)

It is serialised in memory and written with :func:`alignment.atomic.write_bytes`, so a crash
leaves the previous complete file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignment.atomic import write_bytes
from alignment.char_diffusion.data import Vocab
from alignment.char_diffusion.model import Generator, Judge, Kind, ModelArgs, build_model
from alignment.cli import UserError
from alignment.rng import rng_state

CKPT_NAME = "ckpt.pt"
FORMAT = "alignment.char_diffusion.ckpt/1"
REQUIRED = ("format", "kind", "model_args", "model", "vocab", "iteration", "config")


def save_checkpoint(path: str | Path, *, model: nn.Module, vocab: Vocab, iteration: int,
                    config: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write ``model`` (a :class:`Generator` or :class:`Judge`, unwrapped) and the run state."""
    args: ModelArgs = model.args
    payload = {
        "format": FORMAT,
        "kind": args.kind,
        "model_args": args.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": list(vocab.itos),
        "iteration": int(iteration),
        "config": config,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | Path, kind: Kind | None = None, role: str = "checkpoint") -> dict[str, Any]:
    """The checked dict of ``path``; ``kind`` given: a checkpoint of the other kind is an error
    naming the file and the ``role`` it was given for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path} ({role}) is not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path} ({role}) is not a char_diffusion checkpoint (format {got!r}, want {FORMAT!r})"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{path} ({role}) lacks {missing}")
    if kind is not None and ckpt["kind"] != kind:
        raise UserError(f"{path} is a {ckpt['kind']} checkpoint, but {role} must be a {kind} checkpoint")
    return ckpt


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key raises naming ``source``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or shapes:
        raise UserError(
            f"{source}: state dict does not match the model: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {shapes}"
        )
    module.load_state_dict(state, strict=True)


def model_from_checkpoint(ckpt: dict[str, Any], source: str | Path) -> Generator | Judge:
    """Rebuild the model of a checkpoint read by :func:`read_checkpoint` and load its weights strictly."""
    try:
        args = ModelArgs(**ckpt["model_args"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: bad model_args {ckpt['model_args']!r}: {exc}") from exc
    model = build_model(args)
    load_strict(model, ckpt["model"], source)
    return model


def load_model(path: str | Path, kind: Kind, role: str) -> tuple[Generator | Judge, Vocab, dict[str, Any]]:
    """(model on CPU, its vocabulary, the checkpoint) of a ``kind`` checkpoint given as ``role``."""
    ckpt = read_checkpoint(path, kind, role)
    return model_from_checkpoint(ckpt, path), Vocab(tuple(ckpt["vocab"])), ckpt


def fingerprint(module: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of a module's state (identifies a frozen model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
