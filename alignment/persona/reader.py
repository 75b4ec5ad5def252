"""HF ``T5ForConditionalGeneration`` used as a Fusion-in-Decoder reader.

Each of an input's K (query, passage) texts is encoded separately by T5's encoder; the K encoder
outputs are concatenated along the sequence, and the decoder cross-attends to all of them at once
(Izacard & Grave, 2021; LAPDOG's reader). Shapes: B inputs, K passages, L tokens per passage text,
T target tokens, V vocabulary, H hidden size.

:class:`FiDReader` is an ``nn.Module`` whose ``forward`` does encoder and decoder in one call, so
it can be wrapped in DistributedDataParallel; ``repeats`` shares one encoding among the G sampled
responses of an input (GRPO) without encoding it G times.

``decoder_prefix`` (token ids, default none) is given to the decoder after its start token and
before every target, never predicted nor sampled: LAPDOG trains its targets as ``<extra_id_0>
reply``, so a model from its checkpoints answers after that sentinel (see
:mod:`alignment.persona.models`). Logits and responses are those of the target tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from alignment.persona.data import Passage, format_passage


@dataclass
class Encoded:
    hidden: torch.Tensor  # [B, K·L, H] the concatenated encoder outputs
    mask: torch.Tensor  # [B, K·L] attention mask over them


class FiDReader(nn.Module):
    def __init__(self, t5: nn.Module, decoder_prefix: Sequence[int] = ()) -> None:
        super().__init__()
        self.t5 = t5
        self.decoder_prefix = list(decoder_prefix)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FiDReader:
        from transformers import T5ForConditionalGeneration

        return cls(T5ForConditionalGeneration.from_pretrained(str(path)))

    def save_pretrained(self, path: str | Path) -> None:
        self.t5.save_pretrained(str(path))

    @property
    def config(self):
        return self.t5.config

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        """input_ids, attention_mask [B, K, L] -> the fused encoding (each passage text encoded alone)."""
        b, k, length = input_ids.shape
        out = self.t5.get_encoder()(
            input_ids=input_ids.reshape(b * k, length), attention_mask=attention_mask.reshape(b * k, length)
        )
        hidden = out.last_hidden_state.reshape(b, k * length, -1)
        return Encoded(hidden, attention_mask.reshape(b, k * length))

    def decoder_start(self, n: int, device: torch.device | str) -> torch.Tensor:
        """The decoder's first inputs [n, 1 + P]: its start id, then the prefix's P ids."""
        ids = [self.t5.config.decoder_start_token_id, *self.decoder_prefix]
        return torch.tensor(ids, dtype=torch.long, device=device).expand(n, -1)

    def decode(self, encoded: Encoded, targets: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """Teacher-forced logits [B·repeats, T, V] of ``targets`` [B·repeats, T] (row b·repeats + g is
        input b's g-th target); the decoder input is the start id, the prefix, then the targets
        shifted right."""
        hidden, mask = encoded.hidden, encoded.mask
        if repeats > 1:
            hidden, mask = hidden.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
        if targets.shape[0] != hidden.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} encoded inputs")
        # [start, prefix, targets[:-1]]: without a prefix, exactly T5's _shift_right of the targets
        inputs = torch.cat([self.decoder_start(targets.shape[0], targets.device), targets[:, :-1]], dim=1)
        out = self.t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=inputs,
            use_cache=False,
        )
        return out.logits[:, len(self.decoder_prefix) :]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, repeats: int = 1
    ) -> torch.Tensor:
        """FiD logits [B·repeats, T, V] of ``targets`` given passage inputs [B, K, L]."""
        return self.decode(self.encode(input_ids, attention_mask), targets, repeats)

    @torch.no_grad()
    def greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        suppress_ids: Sequence[int] = (),
    ) -> torch.Tensor:
        """Greedy responses [B, ≤ max_new_tokens] (HF ``generate`` on the fused encoding; no start
        token nor prefix, padded after EOS). ``suppress_ids`` are never emitted (the sampler bans the same)."""
        encoded = self.encode(input_ids, attention_mask)
        start = self.decoder_start(input_ids.shape[0], input_ids.device)
        out = self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded.hidden),
            attention_mask=encoded.mask,
            decoder_input_ids=start,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            suppress_tokens=list(suppress_ids) or None,
        )
        return out[:, start.shape[1] :]  # drop the decoder start token and the prefix


def banned_ids(tokenizer) -> list[int]:
    """Ids a response never contains: every special token but EOS (pad is T5's decoder start)."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


def tokenize_fid(
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[Passage]],
    encoder_format: str,
    max_length: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [B, K, L] of ``encoder_format`` filled with each (query, passage)."""
    k = len(passages[0]) if passages else 0
    if len(queries) != len(passages) or any(len(p) != k for p in passages) or k == 0:
        raise ValueError("every query needs the same number (≥ 1) of passages")
    texts = [
        format_passage(p, encoder_format, q) for q, ps in zip(queries, passages, strict=True) for p in ps
    ]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    shape = (len(queries), k, enc["input_ids"].shape[1])
    return enc["input_ids"].reshape(shape).to(device), enc["attention_mask"].reshape(shape).to(device)


def tokenize_targets(
    tokenizer, texts: Sequence[str], max_length: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids [B, T] ending in EOS (pad after it) and their mask [B, T]."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].bool().to(device)


def response_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bool [B, T]: the tokens up to and including the first EOS (all when there is none)."""
    is_eos = (tokens == eos_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return before == 0


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing cross-entropy, the mean over the target tokens: logits [B, T, V], targets and mask [B, T]."""
    nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1)
