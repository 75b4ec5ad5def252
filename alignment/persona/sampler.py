"""Sampling responses from the FiD reader, token by token, from exactly the distribution the
policy-gradient losses use.

Why a loop of our own rather than ``generate(do_sample=True)``: the losses need the log-probs of
the *sampled distribution* (temperature, nucleus, banned special tokens) on the *sampled tokens*.
HF's samplers choose their nucleus by their own rules (e.g. ``min_tokens_to_keep``, ties at the
boundary) and do not return the support, so re-deriving it afterwards can disagree on boundary
tokens. Here every step draws from :func:`alignment.pg.sampling_logits` (the distribution and its
support ``keep``) with :func:`alignment.pg.sample`; the support is recorded, and
:func:`sampled_logits` rebuilds the same distribution from teacher-forced logits with it (the KL
reference is :func:`reference_logits`: same temperature and banned ids, no nucleus). The
encoder runs once per input (its output is shared by the G samples of a group), and the decoder
reuses its key/value cache, so sampling costs about what ``generate`` costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from alignment.persona.reader import Encoded, FiDReader
from alignment.pg import sample, sampling_logits, token_logprobs


@dataclass
class Samples:
    tokens: torch.Tensor  # [N, T] long: N = B·G responses (row b·G + g), pad after EOS
    mask: torch.Tensor  # [N, T] bool: the response's tokens, its EOS included
    logprobs: torch.Tensor  # [N, T] log-prob of each token under the sampled distribution (0 off mask)
    keep: torch.Tensor | None  # [N, T, V] bool support of each step; None when top_p = 1 (all but banned)


@torch.no_grad()
def sample_responses(
    reader: FiDReader,
    encoded: Encoded,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    banned: Sequence[int],
    generator: torch.Generator | None = None,
) -> Samples:
    """``num_samples`` responses to each of the B encoded inputs (at most ``max_new_tokens`` each)."""
    t5 = reader.t5
    eos, pad = t5.config.eos_token_id, t5.config.pad_token_id
    hidden = encoded.hidden.repeat_interleave(num_samples, 0)
    mask = encoded.mask.repeat_interleave(num_samples, 0)
    n = hidden.shape[0]
    encoder_outputs = BaseModelOutput(last_hidden_state=hidden)
    step_input = reader.decoder_start(n, hidden.device)  # start id (+ prefix: LAPDOG's <extra_id_0>)
    finished = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    past = None
    tokens, active, logps, keeps = [], [], [], []
    for _ in range(max_new_tokens):
        out = t5(
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=step_input,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logits, keep = sampling_logits(out.logits[:, -1], temperature, top_p, banned)
        token = sample(logits, generator)
        logp = token_logprobs(logits, token)
        on = ~finished
        token = torch.where(on, token, torch.full_like(token, pad))
        tokens.append(token)
        active.append(on)
        logps.append(torch.where(on, logp, torch.zeros_like(logp)))
        if top_p < 1:
            keeps.append(keep)
        finished = finished | (token == eos)
        step_input = token.unsqueeze(1)
        if bool(finished.all()):
            break
    return Samples(
        tokens=torch.stack(tokens, 1),
        mask=torch.stack(active, 1),
        logprobs=torch.stack(logps, 1),
        keep=torch.stack(keeps, 1) if keeps else None,
    )


def sampled_logits(
    logits: torch.Tensor, samples: Samples, temperature: float, top_p: float, banned: Sequence[int]
) -> torch.Tensor:
    """The sampled distribution (tempered, on the recorded support) from teacher-forced logits [N, T, V]
    of the same responses: fp32 [N, T, V] with −inf outside the support."""
    if samples.keep is not None:
        return sampling_logits(logits, temperature, keep=samples.keep)[0]
    if top_p < 1:
        raise ValueError("samples drawn with top_p < 1 carry their support; these have none")
    return sampling_logits(logits, temperature, 1.0, banned)[0]


def reference_logits(logits: torch.Tensor, temperature: float, banned: Sequence[int]) -> torch.Tensor:
    """The KL reference's distribution from its teacher-forced logits [N, T, V]: the sampling
    temperature and banned ids, but no nucleus (fp32 [N, T, V], −inf at the banned ids). Cutting
    the reference to the policy's nucleus would renormalise it there and hide the divergence the
    penalty is for (a one-token nucleus would give KL 0 however unlikely the reference finds it)."""
    return sampling_logits(logits, temperature, 1.0, banned)[0]


def response_logprobs(dist_logits: torch.Tensor, samples: Samples) -> torch.Tensor:
    """Log-probs [N, T] of the sampled tokens under ``dist_logits`` [N, T, V], 0 off the mask (where
    the pad token, outside the support, would give −inf)."""
    ids = torch.where(samples.mask, samples.tokens, dist_logits.argmax(-1))
    logp = token_logprobs(dist_logits, ids)
    return torch.where(samples.mask, logp, torch.zeros_like(logp))
