"""Completions that end at the next turn marker, in generation and in what GRPO trains on.

The policy is asked to stop at the turn markers of the Beaver template (``STOP_MARKERS``): vLLM via
its ``stop`` strings, transformers ``generate`` via ``stop_strings``. On the transformers path a row
that completes a marker is finished and the rest of it is filled with ``pad_token_id``. TRL 1.16
cuts a completion only at its first EOS id (``GRPOTrainer._generate_single_turn``), and ``<pad>`` is
not EOS for Alpaca or the toy tokenizer, so those fill tokens would get completion_mask 1: gradient,
KL and a share of DAPO's token normaliser for tokens the policy never sampled.

:class:`TurnMarkerGRPOTrainer` cuts each such completion right after the token that completed the
marker. Why there and not elsewhere:

- Filling rows with EOS instead (``pad_token_id = eos`` for generation) would let TRL's own cut work,
  but it keeps one EOS per row that the policy never sampled, and that token would then carry the
  row's advantage.
- Cutting the text is not enough: the reward already scores the text cut at the marker; the mask is
  built from the token ids.
- After the cut the transformers path trains on exactly the tokens the vLLM path trains on (vLLM
  returns the sampled ids up to and including the one that completed a stop string), so a recipe
  means the same with ``use_vllm`` on or off.

The cut position comes from transformers' own :class:`StopStringCriteria` over the same strings,
evaluated on prompt + completion prefixes, i.e. the same test that ended the row in ``generate``.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StopStringCriteria
from trl import GRPOTrainer


def stop_at_turn_markers(model: torch.nn.Module, tokenizer: Any) -> None:
    """Let ``generate`` honour ``stop_strings`` from the generation config.

    Transformers needs the tokenizer passed to ``generate`` for stop strings and TRL does not pass
    it; this binds it once, so completions end at the next turn marker instead of inventing one.
    """
    original = model.generate

    def generate(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("tokenizer", tokenizer)
        return original(*args, **kwargs)

    model.generate = types.MethodType(generate, model)


def stop_lengths(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    criteria: StopStringCriteria,
    pad_id: int,
) -> list[int | None]:
    """Per row, how many completion tokens end with the first completed stop string (None: none does).

    Rows are laid out as ``generate`` saw them: prompts left-padded with ``pad_id`` to one width
    ``P``, completions after them, giving a (B, P + C) tensor; the criteria is asked about the
    prefixes of length P + t for t = 1 … C.
    """
    width = max(len(p) for p in prompt_ids)
    longest = max((len(c) for c in completion_ids), default=0)
    ids = torch.full((len(prompt_ids), width + longest), pad_id, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, width - len(p) : width] = torch.as_tensor(list(p), dtype=torch.long)
        ids[i, width : width + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
    found: list[int | None] = [None] * len(prompt_ids)
    for t in range(1, longest + 1):
        hits = criteria(ids[:, : width + t], None)
        for i in torch.nonzero(hits).flatten().tolist():
            if found[i] is None and t <= len(completion_ids[i]):
                found[i] = t
    return found


def cut_at_stop(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    criteria: StopStringCriteria,
    pad_id: int,
) -> list[list[int]]:
    """Each completion up to and including the token that completed a stop string.

    Raises ``RuntimeError`` if anything but padding follows that token: ``generate`` did not stop
    there, so the cut would drop sampled tokens.
    """
    out = []
    for i, n in enumerate(stop_lengths(prompt_ids, completion_ids, criteria, pad_id)):
        row = list(completion_ids[i])
        if n is not None:
            if any(tok != pad_id for tok in row[n:]):
                raise RuntimeError(
                    f"completion {i} continues after a stop string ({row[n:][:8]}...): generation did not stop "
                    "at it; was the tokenizer passed to generate (stop_at_turn_markers)?"
                )
            row = row[:n]
        out.append(row)
    return out


class TurnMarkerGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer whose transformers-generated completions end at the stop string that ended them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = getattr(self, "generation_config", None)  # set on the transformers generate path only
        stops = None if self.use_vllm or config is None else config.stop_strings
        self._stop_criteria = StopStringCriteria(self._tokenizer, stops) if stops else None

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if self._stop_criteria is not None:
            completion_ids = cut_at_stop(
                prompt_ids, completion_ids, self._stop_criteria, self._tokenizer.pad_token_id
            )
        return completion_ids, logprobs
