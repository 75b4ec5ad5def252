"""A Contriever-style bi-encoder over any HF encoder: one encoder for queries and passages, mean
pooling over the attended tokens, relevance = inner product.

    retriever = Retriever.from_pretrained("facebook/contriever")   # or any AutoModel folder
    emb = retriever.embed(input_ids, attention_mask)                # [N, d]

:meth:`Retriever.forward` scores queries against their own candidate passages in one encoder
call (so DistributedDataParallel sees one forward per backward), scaled by 1/√d as LAPDOG scales
its retriever logits before the distillation softmax.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [N, L, H] over the positions where ``mask`` [N, L] is set -> [N, H]."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class Retriever(nn.Module):
    """Mean-pooled embeddings of an HF encoder (``AutoModel``: BERT, MiniLM, Contriever, ...)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Retriever:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(str(path)))

    def save_pretrained(self, path: str | Path) -> None:
        self.encoder.save_pretrained(str(path))

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [N, L] -> mean-pooled last hidden states [N, d]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_queries: int
    ) -> torch.Tensor:
        """Scores of each query against its own passages, from one encoder call.

        input_ids, attention_mask: [B + B·K, L]: the B queries first, then query b's K passages at
        rows B + b·K ... B + b·K + K − 1. Returns q_b · p_bk / √d as [B, K].
        """
        emb = self.embed(input_ids, attention_mask)
        queries, passages = emb[:num_queries], emb[num_queries:]
        if passages.shape[0] % num_queries:
            raise ValueError(f"{passages.shape[0]} passage rows do not split over {num_queries} queries")
        passages = passages.view(num_queries, -1, emb.shape[-1])
        return torch.einsum("bd,bkd->bk", queries, passages) / math.sqrt(emb.shape[-1])


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device | str = "cpu") -> dict:
    """Padded (to the longest) and truncated encodings of ``texts`` for the retriever."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


@torch.no_grad()
def encode_texts(
    retriever: Retriever,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Embeddings [N, d] (fp32, on the retriever's device) of ``texts``, in batches, in eval mode."""
    device = next(retriever.parameters()).device
    was_training = retriever.training
    retriever.eval()
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embedding passages", disable=not progress, leave=False):
        enc = tokenize(tokenizer, texts[start : start + batch_size], max_length, device)
        out.append(retriever.embed(**enc).float())
    retriever.train(was_training)
    if not out:
        return torch.zeros(0, retriever.dim, device=device)
    return torch.cat(out)
