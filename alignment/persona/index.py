"""The passage index: corpus embeddings saved to disk, reused while retriever and corpus match.

    index = load_or_build_index(cache_dir, retriever, tokenizer, passages, retriever_format, 200)
    scores, rows = index.search(query_embeddings, k=5)      # exact inner-product top-k

An index is stored as ``cache_dir/<fingerprint>/`` (``embeddings.safetensors`` + ``meta.json``)
and written atomically. The fingerprint hashes the retriever's weights, its tokenizer, the
formatted passage texts and the maximum length, so a trained (or different) retriever or an edited
corpus gets a new index instead of a stale one; the same ones load the saved file.

Search is an exact inner product with ``torch.topk`` (``mode="flat"``); ``mode="faiss"`` uses a
FAISS ``IndexFlatIP`` (also exact) when ``faiss`` is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from alignment.atomic import replace_dir
from alignment.cli import UserError
from alignment.persona.data import Passage, format_passage
from alignment.persona.hashing import texts_hash, weights_hash
from alignment.persona.retriever import Retriever, encode_texts

logger = logging.getLogger(__name__)

IndexMode = Literal["flat", "faiss"]
EMBEDDINGS_FILE = "embeddings.safetensors"
META_FILE = "meta.json"


@dataclass
class PassageIndex:
    embeddings: torch.Tensor  # [N, d] fp32
    passages: list[Passage]
    fingerprint: str
    mode: IndexMode = "flat"
    _faiss: Any = field(default=None, repr=False)
    _on_device: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.passages):
            raise ValueError(
                f"embeddings {tuple(self.embeddings.shape)} do not match {len(self.passages)} passages"
            )
        if self.mode == "faiss":
            try:
                import faiss
            except ImportError as exc:
                raise UserError("index_mode 'faiss' needs the faiss package (pip install faiss-cpu)") from exc
            self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss.add(self.embeddings.cpu().numpy())
        elif self.mode != "flat":
            raise ValueError(f"index_mode must be 'flat' or 'faiss', got {self.mode!r}")

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` passages by inner product: queries [B, d] -> (scores [B, k], rows [B, k] long)."""
        if not 0 < k <= len(self):
            raise ValueError(f"k must be in 1..{len(self)} (the corpus size), got {k}")
        queries = queries.detach().float()
        if self._faiss is not None:
            scores, rows = self._faiss.search(queries.cpu().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(rows).long()
        if self._on_device is None or self._on_device.device != queries.device:
            self._on_device = self.embeddings.to(queries.device)  # once, not on every search
        scores, rows = torch.topk(queries @ self._on_device.T, k, dim=1)
        return scores, rows

    def lookup(self, rows: torch.Tensor) -> list[list[Passage]]:
        """Passages for a [B, k] tensor of rows."""
        return [[self.passages[int(r)] for r in row] for row in rows]


def index_fingerprint(retriever: Retriever, tokenizer, texts: Sequence[str], max_length: int) -> str:
    """sha256 of what determines the embeddings: weights, tokenizer, passage texts, max length."""
    vocab = tokenizer.get_vocab()
    parts = [
        weights_hash(retriever),
        texts_hash(f"{tok}\t{i}" for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])),
        texts_hash(texts),
        str(max_length),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def save_index(index: PassageIndex, cache_dir: str | Path) -> Path:
    """Write ``index`` to ``cache_dir/<fingerprint>/`` atomically; returns that folder."""
    final = Path(cache_dir) / index.fingerprint[:32]
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({"embeddings": index.embeddings.cpu().contiguous()}, str(tmp / EMBEDDINGS_FILE))
    meta = {
        "fingerprint": index.fingerprint,
        "num_passages": len(index),
        "dim": int(index.embeddings.shape[1]),
        "ids_hash": texts_hash(p.id for p in index.passages),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    replace_dir(tmp, final)
    return final


def load_index(
    cache_dir: str | Path, fingerprint: str, passages: list[Passage], mode: IndexMode = "flat"
) -> PassageIndex | None:
    """The saved index with this fingerprint, or None when there is none; a mismatch is an error."""
    folder = Path(cache_dir) / fingerprint[:32]
    if not (folder / META_FILE).is_file():
        return None
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    if meta.get("fingerprint") != fingerprint or meta.get("ids_hash") != texts_hash(p.id for p in passages):
        raise ValueError(f"{folder}: saved index does not belong to this retriever and corpus; delete it")
    embeddings = load_file(str(folder / EMBEDDINGS_FILE))["embeddings"]
    return PassageIndex(embeddings, passages, fingerprint, mode)


def load_or_build_index(
    cache_dir: str | Path | None,
    retriever: Retriever,
    tokenizer,
    passages: list[Passage],
    retriever_format: str,
    max_length: int,
    batch_size: int = 256,
    mode: IndexMode = "flat",
    build: bool = True,
) -> PassageIndex:
    """Load the index of (retriever, corpus) from ``cache_dir`` or embed the corpus and save it.

    ``build=False`` only loads (ranks other than 0 after rank 0 built it); a missing index is then
    an error. ``cache_dir=None`` always builds and saves nothing.
    """
    texts = [format_passage(p, retriever_format) for p in passages]
    fingerprint = index_fingerprint(retriever, tokenizer, texts, max_length)
    if cache_dir is not None:
        found = load_index(cache_dir, fingerprint, passages, mode)
        if found is not None:
            logger.info("reusing the passage index %s/%s", cache_dir, fingerprint[:32])
            return found
    if not build:
        raise FileNotFoundError(f"no saved index {fingerprint[:32]} in {cache_dir}")
    logger.info("embedding %d passages", len(passages))
    progress = len(texts) > 4 * batch_size
    embeddings = encode_texts(retriever, tokenizer, texts, max_length, batch_size, progress).cpu()
    index = PassageIndex(embeddings, passages, fingerprint, mode)
    if cache_dir is not None:
        logger.info("saved the passage index to %s", save_index(index, cache_dir))
    return index
