"""Policy-gradient core shared by the persona-dialogue and character-diffusion systems.

Small pure torch functions (no other project imports): group advantages and baselines
(:mod:`.advantages`), KL estimators (:mod:`.kl`), the sampled distribution and its log-probs
(:mod:`.sampling`), and the clipped and REINFORCE losses (:mod:`.losses`). Their GRPO loss equals
TRL 1.16's on the same batch (tests/test_pg_trl.py), so ``alignment.grpo`` and these agree.
"""

from alignment.pg.advantages import GroupAdvantages, group_advantages, leave_one_out_baseline
from alignment.pg.kl import KL_ESTIMATORS, exact_kl, kl_k1, kl_k2, kl_k3, per_token_kl, reference_mass
from alignment.pg.losses import PGLoss, aggregate, clipped_pg_loss, masked_mean, reinforce_loss
from alignment.pg.sampling import sample, sampling_logits, token_logprobs

__all__ = [
    "KL_ESTIMATORS",
    "GroupAdvantages",
    "PGLoss",
    "aggregate",
    "clipped_pg_loss",
    "exact_kl",
    "group_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "leave_one_out_baseline",
    "masked_mean",
    "per_token_kl",
    "reference_mass",
    "reinforce_loss",
    "sample",
    "sampling_logits",
    "token_logprobs",
]
