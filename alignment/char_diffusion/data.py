"""The prepared character data: vocabulary (``meta.json``), token files and line-aligned blocks.

A prepared folder (written by :mod:`alignment.char_diffusion.prepare`) holds, nanoGPT-style::

    train.bin, val.bin   uint16 token ids of the two splits (numpy ``tofile``)
    meta.json            vocab_size, itos (id -> character), stoi, the special ids, block_size,
                         and where the text came from

The vocabulary is the text's own characters in sorted order followed by ``[MASK]``, ``[PAD]`` and
``[CLS]``. A block is ``block_size`` consecutive characters starting at the beginning of a line, so
every block is full length (no padding inside the text; ``[PAD]`` exists for callers that batch
shorter texts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment.cli import UserError

MASK, PAD, CLS = "[MASK]", "[PAD]", "[CLS]"
SPECIALS = (MASK, PAD, CLS)
META_FILE = "meta.json"
META_FORMAT = "alignment.char_diffusion.meta/1"
SPLITS = ("train", "val")
MASK_GLYPH = "\u25af"  # how [MASK] is shown in readable samples
NEWLINE_GLYPH = "\u23ce"


@dataclass(frozen=True)
class Vocab:
    """Characters plus the three special tokens, which always take the last three ids."""

    itos: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))) + SPECIALS)

    def __post_init__(self) -> None:
        if self.itos[-3:] != SPECIALS:
            raise UserError(f"a vocabulary must end with {SPECIALS}, got {self.itos[-3:]}")

    @property
    def size(self) -> int:
        return len(self.itos)

    @property
    def mask_id(self) -> int:
        return self.size - 3

    @property
    def pad_id(self) -> int:
        return self.size - 2

    @property
    def cls_id(self) -> int:
        return self.size - 1

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.mask_id, self.pad_id, self.cls_id)

    @property
    def newline_id(self) -> int | None:
        return self.itos.index("\n") if "\n" in self.itos else None

    def encode(self, text: str) -> list[int]:
        stoi = {c: i for i, c in enumerate(self.itos[:-3])}
        try:
            return [stoi[c] for c in text]
        except KeyError as exc:
            raise UserError(f"character {exc.args[0]!r} is not in the vocabulary") from exc

    def decode(self, ids: Any, readable: bool = False) -> str:
        """Text of ``ids``; ``readable`` shows [MASK] as a box and newlines as a return sign, one glyph
        per position so that rows line up."""
        out = []
        for i in ids.tolist() if hasattr(ids, "tolist") else ids:
            tok = self.itos[i]
            if readable:
                tok = MASK_GLYPH if i == self.mask_id else NEWLINE_GLYPH if tok == "\n" else tok
                tok = "?" if len(tok) > 1 else tok  # [PAD]/[CLS] never appear inside text
            out.append(tok)
        return "".join(out)

    def meta(self) -> dict[str, Any]:
        return {
            "vocab_size": self.size,
            "itos": list(self.itos),
            "stoi": {c: i for i, c in enumerate(self.itos)},
            "mask_token_id": self.mask_id,
            "pad_token_id": self.pad_id,
            "cls_token_id": self.cls_id,
        }


def check_same_vocab(a: Vocab, a_name: str, b: Vocab, b_name: str) -> None:
    """Raise naming both sources when two vocabularies differ (ids would mean other characters)."""
    if a.itos == b.itos:
        return
    only_a = sorted(set(a.itos) - set(b.itos))
    only_b = sorted(set(b.itos) - set(a.itos))
    detail = (
        f"only in the first: {only_a!r}; only in the second: {only_b!r}"
        if only_a or only_b
        else ("same characters in another order")
    )
    raise UserError(
        f"vocabulary mismatch between {a_name} ({a.size} tokens) and {b_name} ({b.size} tokens): {detail}"
    )


def line_starts(tokens: np.ndarray, newline_id: int | None, block_size: int) -> np.ndarray:
    """Offsets where a line begins and a whole block of ``block_size`` tokens fits: int64[N]."""
    starts = np.array([0], dtype=np.int64)
    if newline_id is not None:
        after = np.flatnonzero(tokens[:-1] == newline_id).astype(np.int64) + 1
        starts = np.concatenate([starts, after])
    return starts[starts + block_size <= len(tokens)]


class CharData:
    """A prepared folder: its vocabulary, block size and line-aligned blocks of each split."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta_path = self.dir / META_FILE
        if not self.meta_path.is_file():
            raise FileNotFoundError(
                f"{self.meta_path} not found: prepare the data first "
                f"(python -m alignment.char_diffusion.prepare --input FILE --out {self.dir})"
            )
        meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != META_FORMAT:
            raise UserError(f"{self.meta_path}: format {meta.get('format')!r} is not {META_FORMAT!r}")
        self.vocab = Vocab(tuple(meta["itos"]))
        self.block_size = int(meta["block_size"])
        self.tokens: dict[str, np.ndarray] = {}
        self.starts: dict[str, np.ndarray] = {}
        for split in SPLITS:
            path = self.dir / f"{split}.bin"
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            if len(tokens) and int(tokens.max()) >= self.vocab.size:
                raise UserError(f"{path} holds ids >= vocab_size {self.vocab.size} of {self.meta_path}")
            self.tokens[split] = tokens
            self.starts[split] = line_starts(tokens, self.vocab.newline_id, self.block_size)
            if len(self.starts[split]) == 0:
                raise UserError(f"{path}: no line-aligned block of block_size {self.block_size} fits")

    def check_block_size(self, block_size: int, source: str) -> None:
        """Raise naming ``source`` and the meta file when a model was built for another block size."""
        if block_size != self.block_size:
            raise UserError(
                f"block size mismatch: {source} has block_size {block_size} but {self.meta_path} has "
                f"{self.block_size}"
            )

    def blocks(self, split: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` random line-aligned blocks of ``split``: long[B, block_size]."""
        starts = self.starts[split]
        pick = torch.randint(len(starts), (batch_size,), generator=generator).numpy()
        tokens = self.tokens[split]
        rows = np.stack([tokens[s : s + self.block_size] for s in starts[pick]]).astype(np.int64)
        return torch.from_numpy(rows)
