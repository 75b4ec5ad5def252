"""The bidirectional character transformer (rotary positions) with its two heads.

* :class:`Generator`: logits over the vocabulary at **every** position, ``[B, T, V]`` (the masked
  positions are read from it; nothing is cut to the last position).
* :class:`Judge`: the same body, with ``[CLS]`` prepended inside :meth:`Judge.forward` and a linear
  head read at that position; ``sigmoid`` of its output is the predicted fraction of corrupted
  characters. The body is built for ``block_size + 1`` positions, so a full-length block keeps its
  ``[CLS]``: the judge sees the same layout in training and when it scores.

Attention is not causal: every position sees the whole block. Special tokens take the last three
ids of the vocabulary (``[MASK]``, ``[PAD]``, ``[CLS]``; see :mod:`.data`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Kind = Literal["generator", "judge"]


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild a model; saved in every checkpoint as ``model_args``."""

    kind: Kind
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.kind not in ("generator", "judge"):
            raise ValueError(f"kind must be 'generator' or 'judge', got {self.kind!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into n_head {self.n_head} heads of even size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float[length, head_dim] for rotate-half rotary embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by position (cos, sin: [T, D])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_head = a.n_head
        self.qkv = nn.Linear(a.n_embd, 3 * a.n_embd, bias=a.bias)
        self.proj = nn.Linear(a.n_embd, a.n_embd, bias=a.bias)
        self.dropout = a.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=False)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(a.n_embd, bias=a.bias)
        self.attn = SelfAttention(a)
        self.ln2 = nn.LayerNorm(a.n_embd, bias=a.bias)
        self.mlp = nn.Sequential(
            nn.Linear(a.n_embd, 4 * a.n_embd, bias=a.bias), nn.GELU(),
            nn.Linear(4 * a.n_embd, a.n_embd, bias=a.bias), nn.Dropout(a.dropout),
        )  # fmt: skip
        self.drop = nn.Dropout(a.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cos, sin))
        return x + self.mlp(self.ln2(x))


class Body(nn.Module):
    """Token embedding, ``n_layer`` bidirectional blocks, final norm: long[B, T] -> float[B, T, C]."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.max_len = a.block_size + 1  # room for the judge's [CLS]
        self.tok = nn.Embedding(a.vocab_size, a.n_embd)
        self.drop = nn.Dropout(a.dropout)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layer))
        self.norm = nn.LayerNorm(a.n_embd, bias=a.bias)
        cos, sin = rope_tables(a.n_embd // a.n_head, self.max_len, a.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's {self.max_len} positions")
        x = self.drop(self.tok(idx))
        cos, sin = self.cos[:t], self.sin[:t]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Masked-character predictor: long[B, T] (T <= block_size) -> logits float[B, T, V]."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        self.body = Body(a)
        self.lm_head = nn.Linear(a.n_embd, a.vocab_size, bias=False)
        _init_weights(self)
        self.lm_head.weight = self.body.tok.weight  # tied, as in nanoGPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.args.block_size:
            raise ValueError(f"generator input of {idx.shape[1]} > block_size {self.args.block_size}")
        return self.lm_head(self.body(idx))


class Judge(nn.Module):
    """Corruption scorer: long[B, T] (T <= block_size, no [CLS]) -> logit float[B]; sigmoid of it is
    the predicted fraction of characters that are not the original text."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        self.cls_id = a.vocab_size - 1
        self.body = Body(a)
        self.head = nn.Linear(a.n_embd, 1, bias=True)
        _init_weights(self)

    def layout(self, idx: torch.Tensor) -> torch.Tensor:
        """The judge's input: ``[CLS]`` then the block, long[B, T + 1]."""
        if idx.shape[1] > self.args.block_size:
            raise ValueError(f"judge input of {idx.shape[1]} > block_size {self.args.block_size}")
        cls = torch.full((idx.shape[0], 1), self.cls_id, dtype=idx.dtype, device=idx.device)
        return torch.cat([cls, idx], dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.layout(idx))[:, 0]).squeeze(-1)


def build_model(args: ModelArgs) -> Generator | Judge:
    return Generator(args) if args.kind == "generator" else Judge(args)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
