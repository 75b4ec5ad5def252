"""KL penalties between the policy π and a frozen reference, oriented as TRL orients them.

With ``d = ref_logp − logp`` for a sampled token a ~ π:

=========  ======================  =======================  ===================================
estimator  per-token value         E_π[value]               E_π[∇ value] (a held fixed)
=========  ======================  =======================  ===================================
``k1``     −d = logp − ref_logp     KL(π‖ref)                0: as a loss it regularises nothing
``k2``     d² / 2                   ≈ KL(π‖ref) (biased)     ∇ KL(π‖ref)
``k3``     exp(d) − d − 1 (TRL's)   KL(π‖ref)                ∇ KL(ref‖π): the *reverse* divergence
``exact``  Σ_v π_v (log π_v − log ref_v)  KL(π‖ref)          ∇ KL(π‖ref), with no sampling noise
=========  ======================  =======================  ===================================

So k3, the usual GRPO choice, reports KL(π‖ref) but, used as a loss on sampled tokens, pulls π
toward the mode-covering KL(ref‖π). Where both logit tensors are at hand (the persona and
character-diffusion systems), ``exact`` is the default: its value and its gradient are those of
KL(π‖ref) at every position. The tests prove each row by enumerating a small categorical.
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


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref − logp) − (ref − logp) − 1, elementwise (TRL 1.16's ``per_token_kl``)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π‖ref) at every position from the two distributions' logits.

    logits, ref_logits: [..., V] (pass the logits of the distributions meant, e.g. tempered and
    with the same support masking as sampling; ``-inf`` marks an excluded token) -> [...].
    Tokens with π_v = 0 contribute nothing; a token π allows and ref excludes gives +inf.
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
) -> torch.Tensor:
    """The chosen estimator per position: "exact" from ``logits``/``ref_logits`` [..., V] -> [...];
    "k1"/"k2"/"k3" from the sampled tokens' ``logp``/``ref_logp`` [...]."""
    if estimator == "exact":
        if logits is None or ref_logits is None:
            raise ValueError("kl_estimator 'exact' needs both logit tensors (logits and ref_logits)")
        return exact_kl(logits, ref_logits)
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    if logp is None or ref_logp is None:
        raise ValueError(f"kl_estimator {estimator!r} needs logp and ref_logp of the sampled tokens")
    return {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[estimator](logp, ref_logp)
