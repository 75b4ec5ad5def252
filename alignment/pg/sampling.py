"""The distribution a policy samples from, so that log-probs are always taken from it.

A sampler with temperature τ, nucleus ``top_p`` and some ids it may never emit (special tokens)
draws from softmax(logits/τ) restricted to a support S and renormalised. Policy-gradient losses
must use log-probs of *that* distribution, not of the raw logits: :func:`sampling_logits` returns
it as logits (−inf outside S) together with S, and :func:`token_logprobs` reads the sampled ids'
log-probs from it.

When the same samples are scored again under updated weights (inner epochs of a clipped loss),
pass the ``keep`` mask of the sampling step: the support stays the one that was sampled from, so
the ratio π_new/π_old compares the same distribution family and a sampled token never falls
outside it (which would make its log-prob −inf).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _float(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs; fp64 stays fp64 (the exact-expectation tests use it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def sampling_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    banned_ids: Sequence[int] | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the sampled distribution, and its support.

    logits: [..., V]. Returns (masked [..., V] in fp32 with −inf outside the support, keep: bool
    [..., V]). The support is computed from detached probabilities (it is a choice of the sampler,
    not something to differentiate) unless ``keep`` is given, in which case it is used as is.
    """
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 to sample (greedy decoding has no log-probs), got {temperature}"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    scaled = _float(logits) / temperature
    if keep is None:
        keep = torch.ones_like(scaled, dtype=torch.bool)
        if banned_ids is not None and len(banned_ids) > 0:
            banned = torch.as_tensor(banned_ids, dtype=torch.long, device=scaled.device)
            keep[..., banned] = False
        if top_p < 1:
            probs = torch.softmax(scaled.detach().masked_fill(~keep, float("-inf")), dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # the most likely token always stays, so the support is never empty
            in_nucleus = mass_before < top_p
            in_nucleus[..., 0] = True
            nucleus = torch.zeros_like(keep).scatter(-1, order, in_nucleus)
            keep = keep & nucleus
    elif keep.shape != scaled.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of shape {tuple(scaled.shape)}")
    if not keep.any(dim=-1).all():
        raise ValueError("every position needs at least one allowed token (all ids banned?)")
    return scaled.masked_fill(~keep, float("-inf")), keep


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per position from softmax(logits): [..., V] -> long [...]."""
    probs = torch.softmax(_float(logits), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return ids.reshape(probs.shape[:-1])


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at ``ids``: logits [..., V], ids long [...] -> [...] (fp32)."""
    logp = torch.log_softmax(_float(logits), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
