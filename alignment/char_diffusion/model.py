"""The bidirectional character transformer (rotary positions) with its two heads.

* :class:`Generator`: logits over the vocabulary at **every** position, ``[B, T, V]`` (the masked
  positions are read from it; nothing is cut to the last position).
* :class:`Judge`: the same body, with ``[CLS]`` prepended inside :meth:`Judge.forward` and a linear
  head; :meth:`Judge.corrupted_fraction` is the predicted fraction of the block's characters that
  are not the original text. With ``judge_head="cls"`` (the seed's sequence scorer) the head is read
  at ``[CLS]`` and the fraction is the sigmoid of that one logit; with ``"tokens"`` (ELECTRA's
  replaced-token detection) it is read at every character, each logit says whether that character
  was replaced, and the fraction is the mean of their sigmoids. With ``"denoise"`` the judge is a
  masked denoiser (the generator's architecture, head tied to the embedding): it reads the *masked*
  block, and a filled character counts as corrupted with probability 1 − p_judge(character), so the
  predicted fraction is Σ_masked (1 − p_judge(fill_i)) / T, an estimate of the share of the block the
  fill got wrong. The body is built for ``block_size + 1`` positions, so a full-length block keeps its
  ``[CLS]`` (which the denoiser does not use): the judge sees the same layout in training and when it
  scores.

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
JudgeHead = Literal["cls", "tokens", "denoise"]


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
    judge_head: JudgeHead = "cls"  # a judge's head (see the module docstring); unused by a generator

    def __post_init__(self) -> None:
        if self.kind not in ("generator", "judge"):
            raise ValueError(f"kind must be 'generator' or 'judge', got {self.kind!r}")
        if self.judge_head not in ("cls", "tokens", "denoise"):
            raise ValueError(f"judge_head must be 'cls', 'tokens' or 'denoise', got {self.judge_head!r}")
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
    """Corruption scorer of blocks long[B, T] (T <= block_size, no [CLS]).

    :meth:`forward` -> logits: float[B] (``judge_head="cls"``), float[B, T] (``"tokens"``: one per
    character, "was it replaced?") or float[B, T, V] (``"denoise"``: the original character at every
    position of a masked block); :meth:`corrupted_fraction` -> float[B] in [0, 1]."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        self.cls_id = a.vocab_size - 1
        self.body = Body(a)
        denoise = a.judge_head == "denoise"
        self.head = nn.Linear(a.n_embd, a.vocab_size if denoise else 1, bias=not denoise)
        _init_weights(self)
        if denoise:
            self.head.weight = self.body.tok.weight  # tied, as the generator's

    def layout(self, idx: torch.Tensor) -> torch.Tensor:
        """The judge's input: ``[CLS]`` then the block, long[B, T + 1]."""
        if idx.shape[1] > self.args.block_size:
            raise ValueError(f"judge input of {idx.shape[1]} > block_size {self.args.block_size}")
        cls = torch.full((idx.shape[0], 1), self.cls_id, dtype=idx.dtype, device=idx.device)
        return torch.cat([cls, idx], dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        layout = self.layout(idx)  # checks the length
        if self.args.judge_head == "denoise":  # the generator's computation: no [CLS]
            return self.head(self.body(idx))
        hidden = self.body(layout)
        if self.args.judge_head == "tokens":
            return self.head(hidden[:, 1:]).squeeze(-1)
        return self.head(hidden[:, 0]).squeeze(-1)

    def corrupted_fraction(
        self, filled: torch.Tensor, inp: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The predicted share of each filled block's characters that are not the original.

        filled: long[B, k, T] (k fills of each of B masked blocks); inp: long[B, T], the masked
        blocks, and mask: bool[B, T], where they were masked (used by ``"denoise"`` only) ->
        float[B, k].
        """
        b, k, t = filled.shape
        if self.args.judge_head != "denoise":
            probs = torch.sigmoid(self(filled.reshape(b * k, t)).float())
            return (probs.mean(-1) if self.args.judge_head == "tokens" else probs).view(b, k)
        if inp is None or mask is None:
            raise ValueError("a denoise judge scores fills of masked blocks: pass inp and mask")
        probs = torch.softmax(self(inp).float(), dim=-1)  # [B, T, V]: one forward for all k fills
        p_fill = probs.unsqueeze(1).expand(b, k, t, -1).gather(-1, filled.unsqueeze(-1)).squeeze(-1)
        wrong = (1.0 - p_fill) * mask.unsqueeze(1)  # visible characters are the original
        return wrong.sum(-1) / t


def build_model(args: ModelArgs) -> Generator | Judge:
    return Generator(args) if args.kind == "generator" else Judge(args)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
