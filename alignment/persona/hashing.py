"""Content hashes: of a model's weights (the reference model is logged by it, an index is keyed by
its retriever's) and of texts (an index is keyed by its corpus)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def weights_hash(model: nn.Module) -> str:
    """sha256 (hex) of every parameter and buffer: names, dtypes, shapes and bytes, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def texts_hash(texts: Iterable[str]) -> str:
    """sha256 (hex) of a sequence of texts (order matters)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
