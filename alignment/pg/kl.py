"""KL penalties between the policy π and a frozen reference, oriented as TRL orients them.

With ``d = ref_logp − logp`` for a sampled token a ~ π:

=========  =============================  =============  =========================================
estimator  per-token value                E_π[value]     E_π[∇ value] (a held fixed)
=========  =============================  =============  =========================================
``k1``     −d = logp − ref_logp           KL(π‖ref)      0: as a loss it regularises nothing
``k2``     d² / 2                         ≈ KL (biased)  ∇ KL(π‖ref)
``k3``     exp(d) − d − ref(S)            KL(π‖ref)      ref(S)·∇ KL(ref_S‖π): the *reverse* one
``k3``·r   k3 times r = π/π_old           KL(π‖ref)      ∇ KL(π‖ref) (TRL's use_bias_correction_kl)
``exact``  Σ_v π_v (log π_v − log ref_v)  KL(π‖ref)      ∇ KL(π‖ref), with no sampling noise
=========  =============================  =============  =========================================

(S is π's support, ref(S) the reference's probability of it, ref_S the reference cut to S and
renormalised; without a nucleus S is everything the reference allows and ref(S) = 1.)

So k3 alone, the usual GRPO choice, reports KL(π‖ref) but, used as a loss on sampled tokens, pulls
π toward the mode-covering KL(ref‖π); multiplied by the (differentiable) ratio r, as TRL 1.16 does
by default, its expected gradient becomes that of KL(π‖ref). Where both logit tensors are at hand
(the persona and character-diffusion systems), ``exact`` is the default: its value and its
gradient are those of KL(π‖ref) at every position.

**A truncated sampler (nucleus, top-p).** π is then the tempered policy cut to a support S and
renormalised there, while the reference stays untruncated (cutting it to π's support would hide
exactly the divergence the penalty exists for: with a one-token nucleus both would be that token
with probability 1 and the KL 0). TRL's k3, exp(d) − d − 1, assumes E_π[ref/π] = 1; on S that
expectation is ref(S) = Σ_{v∈S} ref_v, so its mean is KL(π‖ref) − (1 − ref(S)): biased low by the
reference's mass outside the nucleus. :func:`kl_k3` therefore subtracts ``ref_mass`` = ref(S)
(:func:`reference_mass`) instead of 1. The value is unbiased again and still ≥ 0 per token
(x − log x ≥ 1 ≥ ref(S) for x = ref/π); the gradient is unchanged, since ref(S) does not depend on
the weights (the support is the sampler's choice, not differentiated). Without a nucleus ref(S) is
exactly 1 and k3 is TRL's, bit for bit. In a collapsed (one-token) nucleus π is that token with
probability 1 whatever the weights nearby: exact, k1 and k3 then report the true −log ref(token),
but none has a gradient there, just as the policy-gradient term has none at that position. The
tests prove each row by enumerating small categoricals, with a nucleus and a collapsed (one-token)
nucleus included.
"""

from __future__ import annotations

from typing import Literal

import torch


def _float(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs; fp64 stays fp64 (the exact-expectation tests use it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


KLEstimator = Literal["exact", "k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("exact", "k1", "k2", "k3")


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """logp − ref_logp, elementwise (any shape)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(logp − ref_logp)² / 2, elementwise."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, ref_mass: torch.Tensor | None = None) -> torch.Tensor:
    """exp(ref − logp) − (ref − logp) − ref(S), elementwise.

    ref_mass: ref(S) [...], the reference's probability of the support π samples from (see
    :func:`reference_mass`); None means the whole vocabulary (ref(S) = 1: TRL 1.16's
    ``per_token_kl``). With a nucleus, only ref(S) keeps E_π[value] = KL(π‖ref) (module docstring).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - (1 if ref_mass is None else ref_mass)


def reference_mass(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """ref(S): the reference's probability of π's support S = {v : logits_v > −inf}.

    logits, ref_logits: [..., V] (π's sampled distribution, −inf outside S, and the reference's)
    -> [...] (detached). Exactly 1 wherever S holds every token the reference allows (no nucleus
    cut anything), so the k3 correction is a no-op there rather than rounding noise.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    with torch.no_grad():
        support = torch.isfinite(logits)
        ref_logp = torch.log_softmax(_float(ref_logits), dim=-1)
        mass = torch.logsumexp(ref_logp.masked_fill(~support, float("-inf")), dim=-1).exp()
        cut = (torch.isfinite(ref_logp) & ~support).any(dim=-1)
        return torch.where(cut, mass, torch.ones_like(mass))


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π‖ref) at every position from the two distributions' logits.

    logits, ref_logits: [..., V] (pass the logits of the distributions meant: π's sampled one,
    tempered and −inf outside its support, and the reference at the same temperature with the same
    banned ids but *no* nucleus; ``-inf`` marks an excluded token) -> [...]. Tokens with π_v = 0
    contribute nothing; a token π allows and ref excludes gives +inf.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    logp = torch.log_softmax(_float(logits), dim=-1)
    ref_logp = torch.log_softmax(_float(ref_logits), dim=-1)
    p = logp.exp()
    # Mask the log-probs *before* the product: with ``where`` on the product alone, an excluded
    # token's 0·(−inf − x) is NaN in the backward pass even though its value is discarded.
    allowed = p > 0
    logp = torch.where(allowed, logp, torch.zeros_like(logp))
    ref_logp = torch.where(allowed, ref_logp, torch.zeros_like(ref_logp))
    return (p * (logp - ref_logp)).sum(dim=-1)


def per_token_kl(
    estimator: KLEstimator,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chosen estimator per position: "exact" from ``logits``/``ref_logits`` [..., V] -> [...];
    "k1"/"k2"/"k3" from the sampled tokens' ``logp``/``ref_logp`` [...]; ``ref_mass`` [...] is
    k3's ref(S) under a nucleus (:func:`reference_mass`; k1 needs none, k2 is biased anyway)."""
    if estimator == "exact":
        if logits is None or ref_logits is None:
            raise ValueError("kl_estimator 'exact' needs both logit tensors (logits and ref_logits)")
        return exact_kl(logits, ref_logits)
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    if logp is None or ref_logp is None:
        raise ValueError(f"kl_estimator {estimator!r} needs logp and ref_logp of the sampled tokens")
    if estimator == "k3":
        return kl_k3(logp, ref_logp, ref_mass)
    return {"k1": kl_k1, "k2": kl_k2}[estimator](logp, ref_logp)
