"""The policy-gradient core against exact expectations: small categoricals are enumerated, so every
expectation below is a finite sum, not a Monte-Carlo estimate. fp64 throughout; the 1e-12 tolerances
only absorb the rounding of those sums."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.pg import (
    aggregate,
    clipped_pg_loss,
    exact_kl,
    group_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    leave_one_out_baseline,
    per_token_kl,
    reference_mass,
    reinforce_loss,
    sample,
    sampling_logits,
    token_logprobs,
)

V = 5
TOL = dict(rtol=0, atol=1e-12)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.tensor([0.3, -1.2, 0.8, 0.05, -0.4], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-0.5, 0.2, 0.4, 1.0, -1.5], dtype=torch.float64)
    return theta, ref


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) written out from its definition."""
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    return (p * (p.log() - q.log())).sum()


def expected_estimator(theta, ref, estimator) -> torch.Tensor:
    """E_{a~π}[k(a)] with π's weights held fixed: Σ_a π(a) k(log π(a), log ref(a)).

    Its gradient is E_π[∇ k(a)], the gradient a loss on sampled actions has in expectation."""
    logp = torch.log_softmax(theta, -1)
    ref_logp = torch.log_softmax(ref, -1)
    return (logp.exp().detach() * estimator(logp, ref_logp)).sum()


def grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, theta, retain_graph=True)[0]


def test_k1_and_k3_values_are_unbiased_for_kl_pi_ref(logits):
    theta, ref = logits
    target = kl(theta, ref)
    torch.testing.assert_close(expected_estimator(theta, ref, kl_k1), target, **TOL)
    torch.testing.assert_close(expected_estimator(theta, ref, kl_k3), target, **TOL)
    torch.testing.assert_close(exact_kl(theta, ref), target, **TOL)
    # k2 is biased: its expectation is not the KL (it is only close for close distributions)
    assert abs(expected_estimator(theta, ref, kl_k2) - target) > 1e-3


def test_estimator_gradients_regularise_different_divergences(logits):
    theta, ref = logits
    grad_forward = grad(kl(theta, ref), theta)  # ∇ KL(π‖ref)
    grad_reverse = grad(kl(ref, theta), theta)  # ∇ KL(ref‖π)
    torch.testing.assert_close(
        grad(expected_estimator(theta, ref, kl_k1), theta), torch.zeros(V, dtype=torch.float64), **TOL
    )
    torch.testing.assert_close(grad(expected_estimator(theta, ref, kl_k2), theta), grad_forward, **TOL)
    torch.testing.assert_close(grad(expected_estimator(theta, ref, kl_k3), theta), grad_reverse, **TOL)
    torch.testing.assert_close(grad(exact_kl(theta, ref), theta), grad_forward, **TOL)
    assert (grad_forward - grad_reverse).abs().max() > 1e-2  # the two really differ here


def test_k3_is_trls_orientation():
    logp, ref_logp = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    d = ref_logp - logp
    torch.testing.assert_close(kl_k3(logp, ref_logp), torch.exp(d) - d - 1)
    assert (kl_k3(logp, ref_logp) >= 0).all()


def test_exact_kl_handles_excluded_tokens_and_dispatch():
    p = torch.tensor([[0.0, 1.0, float("-inf")]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    probs = torch.softmax(p, -1)[0]
    qs = torch.softmax(q, -1)[0]
    expected = sum(probs[i] * (probs[i].log() - qs[i].log()) for i in range(2))
    torch.testing.assert_close(exact_kl(p, q)[0], expected, **TOL)
    assert torch.isinf(exact_kl(q, p)).all()  # π allows a token the reference excludes
    # gradients stay finite where both distributions exclude a token (sampling_logits' −inf)
    theta = torch.tensor([[0.3, -0.2, float("-inf")]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.1, 0.4, float("-inf")]], dtype=torch.float64)
    g = torch.autograd.grad(exact_kl(theta, ref).sum(), theta)[0]
    torch.testing.assert_close(
        g[:, :2], torch.autograd.grad(kl(theta[0, :2], ref[0, :2]), theta)[0][:, :2], **TOL
    )
    assert g[0, 2] == 0
    assert torch.equal(per_token_kl("exact", logits=p, ref_logits=q), exact_kl(p, q))
    with pytest.raises(ValueError, match="needs both logit tensors"):
        per_token_kl("exact", logp=p, ref_logp=q)
    with pytest.raises(ValueError, match="one of exact, k1, k2, k3"):
        per_token_kl("k4", logp=p, ref_logp=q)


def test_group_advantages_match_trl_semantics():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    out = group_advantages(rewards)
    mean, std = 3.0, (((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5  # unbiased, as TRL's nanstd
    expected = torch.tensor([[(1 - mean) / (std + 1e-4), (2 - mean) / (std + 1e-4), (6 - mean) / (std + 1e-4)],
                             [0.0, 0.0, 0.0]])  # fmt: skip
    torch.testing.assert_close(out.advantages, expected)
    assert out.zero_spread_fraction == 0.5

    batch = group_advantages(rewards, scale="batch").advantages
    torch.testing.assert_close(batch, (rewards - rewards.mean(1, keepdim=True)) / (rewards.std() + 1e-4))
    none = group_advantages(rewards, scale="none").advantages
    torch.testing.assert_close(none, rewards - rewards.mean(1, keepdim=True))


def test_leave_one_out_baseline_and_rloo_advantages():
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    torch.testing.assert_close(leave_one_out_baseline(rewards), torch.tensor([[4.0, 3.5, 1.5]]))
    rloo = group_advantages(rewards, scale="none", baseline="leave_one_out").advantages
    # r_i − mean of the others = (G / (G − 1)) · (r_i − group mean)
    torch.testing.assert_close(rloo, 1.5 * (rewards - rewards.mean()))
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_baseline(torch.tensor([[1.0]]))


def test_group_advantages_refuse_bad_rewards():
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.tensor([1.0, 2.0]))


def test_sampling_logits_give_the_tempered_masked_nucleus():
    raw = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0], dtype=torch.float64)
    masked, keep = sampling_logits(raw, temperature=0.5, top_p=0.9, banned_ids=[4])
    tempered = torch.softmax(raw[:4] / 0.5, -1)  # id 4 banned, then the rest renormalised
    # probabilities of ids 0..3 are ~[0.867, 0.117, 0.016, 0.002]: 0.867 < 0.9, so ids 0 and 1 form
    # the nucleus (the mass before id 1 is 0.867 < 0.9, before id 2 it is 0.984 ≥ 0.9)
    assert keep.tolist() == [True, True, False, False, False]
    expected = tempered[:2] / tempered[:2].sum()
    torch.testing.assert_close(torch.softmax(masked, -1)[:2], expected, **TOL)
    assert torch.softmax(masked, -1)[2:].sum() == 0
    torch.testing.assert_close(token_logprobs(masked, torch.tensor(1)), expected[1].log(), **TOL)
    # the support of the sampling step is reused as given, whatever the new logits prefer
    again, same = sampling_logits(torch.tensor([0.0, 0.0, 9.0, 9.0, 9.0]), 0.5, 0.9, keep=keep)
    assert torch.equal(same, keep) and torch.isinf(again[2:]).all()


def test_samples_stay_in_the_support():
    logits = torch.randn(200, 7, generator=torch.Generator().manual_seed(0))
    masked, keep = sampling_logits(logits, temperature=0.8, top_p=0.5, banned_ids=[0, 1])
    ids = sample(masked, torch.Generator().manual_seed(1))
    assert ids.shape == (200,)
    assert keep.gather(-1, ids.unsqueeze(-1)).all()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling_logits(logits, temperature=0.0)
    with pytest.raises(ValueError, match="at least one allowed token"):
        sampling_logits(logits, banned_ids=list(range(7)))


def test_clipped_loss_on_first_update_is_the_exact_policy_gradient(logits):
    """With old = current weights (r = 1), E_π[∇ loss] = −∇ E_π[A]: the true policy gradient."""
    theta, _ = logits
    advantage = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    logp_all = torch.log_softmax(theta, -1)
    # one single-token "sequence" per action; the expectation weights them by π(a)
    logp = logp_all.unsqueeze(-1)
    per_action = torch.stack(
        [clipped_pg_loss(logp[a : a + 1], logp[a : a + 1].detach(), advantage[a : a + 1], torch.ones(1, 1)).loss
         for a in range(V)]
    )  # fmt: skip
    expected_grad = grad((logp_all.exp().detach() * per_action).sum(), theta)
    true_grad = -grad((torch.softmax(theta, -1) * advantage).sum(), theta)
    torch.testing.assert_close(expected_grad, true_grad, **TOL)


def test_clipped_loss_values_ratio_clip_and_aggregation():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.55, 0.3], [0.75, 0.55, 0.3]]))  # r = 1.5, 1.1, 0.6
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = clipped_pg_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.2, agg="token")
    # row 0 (A = +1): −min(r, clip r) = −[1.2, 1.1, 0.6]; row 1 (A = −1): −min(−r, −clip r) = [1.5, 1.1]
    per_token = torch.tensor([[-1.2, -1.1, -0.6], [1.5, 1.1, 0.0]])
    torch.testing.assert_close(out.loss, per_token.sum() / 5)
    # clipping active: r = 1.5 with A > 0 (row 0) and r = 0.6 with A < 0 is masked out; row 1's
    # r = 1.5 with A < 0 is not clipped (min picks the unclipped, more pessimistic term)
    torch.testing.assert_close(out.clip_fraction, torch.tensor(1 / 5))
    torch.testing.assert_close(out.ratio_mean, torch.tensor((1.5 + 1.1 + 0.6 + 1.5 + 1.1) / 5))
    seq = clipped_pg_loss(new, old, adv, mask, agg="sequence").loss
    torch.testing.assert_close(seq, torch.tensor(((-1.2 - 1.1 - 0.6) / 3 + (1.5 + 1.1) / 2) / 2))
    dapo = clipped_pg_loss(new, old, adv, mask, num_items=10).loss
    torch.testing.assert_close(dapo, per_token.sum() / 10)


def test_kl_term_is_added_with_beta_and_reported():
    logp = torch.zeros(1, 2, requires_grad=True)
    kl = torch.tensor([[0.2, 0.4]])
    out = clipped_pg_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), kl=kl, beta=0.5)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * 0.3))
    torch.testing.assert_close(out.kl, torch.tensor(0.3))
    assert aggregate(kl, torch.tensor([[1.0, 0.0]]), "sequence") == pytest.approx(0.2)


def test_reinforce_expected_gradient_sign_and_baseline_invariance(logits):
    """E_π[∇ loss] = −∇ E_π[R] for any constant baseline: descent raises the expected reward."""
    theta, _ = logits
    reward = torch.tensor([0.1, 0.9, 0.3, 0.0, 0.5], dtype=torch.float64)
    logp = torch.log_softmax(theta, -1)
    weights = logp.exp().detach()
    true_grad = -grad((torch.softmax(theta, -1) * reward).sum(), theta)
    for b in (0.0, 0.4, float((weights * reward).sum())):
        per_action = torch.stack([reinforce_loss(logp[a : a + 1], reward[a : a + 1], b) for a in range(V)])
        torch.testing.assert_close(grad((weights * per_action).sum(), theta), true_grad, **TOL)
    # the sign: the best action's log-probability goes up after a step against the loss
    loss = reinforce_loss(logp, reward, reward.mean())
    step = grad(loss, theta)
    assert step[1] < 0  # id 1 has the highest reward, so −∂loss/∂θ₁ > 0
    with pytest.raises(ValueError, match=r"must both be \[B\]"):
        reinforce_loss(logp.unsqueeze(0), reward.unsqueeze(0))


def _nucleus(theta: torch.Tensor, ref: torch.Tensor, temperature: float, top_p: float):
    """π (tempered, cut to its nucleus S, renormalised), the reference (tempered, not cut), and
    their log-probs: the pair every KL of a truncated sampler compares."""
    dist, keep = sampling_logits(theta, temperature, top_p)
    ref_dist, _ = sampling_logits(ref, temperature, 1.0)
    return dist, ref_dist, keep


def _expected_k3(dist, ref_dist, mass) -> torch.Tensor:
    """E_{a~π}[k3(a)] enumerated over π's support (π's weights held fixed, as for sampled tokens)."""
    logp, ref_logp = torch.log_softmax(dist, -1), torch.log_softmax(ref_dist, -1)
    support = torch.isfinite(dist)
    values = kl_k3(logp[support], ref_logp[support], mass)
    return (logp[support].exp().detach() * values).sum()


def test_k3_under_a_nucleus_is_unbiased_only_with_the_reference_mass(logits):
    theta, ref = logits
    dist, ref_dist, keep = _nucleus(theta, ref, 0.8, 0.7)
    assert 1 < int(keep.sum()) < V  # a real cut: the nucleus holds some ids, not all
    mass = reference_mass(dist, ref_dist)
    ref_p = torch.softmax(ref_dist, -1)
    torch.testing.assert_close(mass, ref_p[keep].sum(), **TOL)
    target = exact_kl(dist, ref_dist)  # KL(π_S‖ref) over the support, by its definition:
    p = torch.softmax(dist, -1)[keep]
    torch.testing.assert_close(target, (p * (p.log() - ref_p[keep].log())).sum(), **TOL)
    torch.testing.assert_close(_expected_k3(dist, ref_dist, mass), target, **TOL)
    # TRL's k3 (− 1) is low by exactly the reference's mass outside the nucleus
    torch.testing.assert_close(_expected_k3(dist, ref_dist, None), target - (1 - mass), **TOL)
    assert 1 - mass > 0.05
    # k1 needs no correction; every corrected k3 value stays ≥ 0
    logp, ref_logp = torch.log_softmax(dist, -1)[keep], torch.log_softmax(ref_dist, -1)[keep]
    torch.testing.assert_close((p.detach() * kl_k1(logp, ref_logp)).sum(), target, **TOL)
    assert (kl_k3(logp, ref_logp, mass) >= 0).all()


def test_k3_with_an_unchanged_policy_and_a_nucleus_reports_minus_log_ref_mass():
    """π = π_ref before the nucleus (the first step of a run): KL(π_S‖ref) = −log ref(S); TRL's k3
    averages −log ref(S) − (1 − ref(S)), e.g. 0.0010 where the KL is 0.0460 (ref(S) = 0.955)."""
    z = torch.tensor([2.0, 1.4, 0.9, 0.1, -0.6, -1.5], dtype=torch.float64)
    dist, ref_dist, keep = _nucleus(z, z, 0.8, 0.95)
    mass = reference_mass(dist, ref_dist)
    torch.testing.assert_close(exact_kl(dist, ref_dist), -mass.log(), **TOL)
    torch.testing.assert_close(_expected_k3(dist, ref_dist, mass), -mass.log(), **TOL)
    torch.testing.assert_close(_expected_k3(dist, ref_dist, None), -mass.log() - (1 - mass), **TOL)
    # on this support π(v) = ref(v)/ref(S) for every v: each single draw's k3 is exactly −log ref(S)
    logp, ref_logp = torch.log_softmax(dist, -1)[keep], torch.log_softmax(ref_dist, -1)[keep]
    torch.testing.assert_close(kl_k3(logp, ref_logp, mass), (-mass.log()).expand(int(keep.sum())), **TOL)
    assert 0.9 < mass < 0.99  # the nucleus cut a few per cent of the mass
    # the numbers follow from ref(S) alone
    assert (-math.log(0.955), -math.log(0.955) - 0.045) == pytest.approx((0.0460, 0.0010), abs=5e-5)


def test_a_collapsed_nucleus_keeps_the_divergence_the_cut_reference_hid():
    """4 tokens, nucleus {0}: π is token 0 with probability 1; the reference gives it 0.01."""
    theta = torch.tensor([6.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.01, 0.33, 0.33, 0.33], dtype=torch.float64).log()
    dist, ref_dist, keep = _nucleus(theta, ref, 1.0, 0.5)
    assert keep.tolist() == [True, False, False, False]
    expected = -math.log(0.01)  # 4.605 = −log ref(0)
    assert exact_kl(dist, ref_dist).item() == pytest.approx(expected, abs=1e-12)
    mass = reference_mass(dist, ref_dist)
    assert mass.item() == pytest.approx(0.01, abs=1e-12)
    assert _expected_k3(dist, ref_dist, mass).item() == pytest.approx(expected, abs=1e-12)
    # the reference cut to π's support (what the persona system did) says 0: it cannot see the collapse
    cut = sampling_logits(ref, 1.0, keep=keep)[0]
    assert exact_kl(dist, cut).item() == 0.0
    # no estimator has a gradient here: nearby weights sample the same one token (documented)
    assert grad(exact_kl(dist, ref_dist), theta).abs().max() == 0


def test_the_k3_correction_leaves_its_gradients_alone(logits):
    """Under a nucleus, E_π[∇ k3] = ref(S)·∇ KL(ref_S‖π) (the reverse divergence, weighted); times
    the ratio r (TRL's use_bias_correction_kl) it is ∇ KL(π‖ref). ref(S) is a constant: subtracting it
    changes the value only."""
    theta, ref = logits
    dist, ref_dist, keep = _nucleus(theta, ref, 0.8, 0.7)
    mass = reference_mass(dist, ref_dist)
    logp = torch.log_softmax(dist, -1)[keep]
    ref_logp = torch.log_softmax(ref_dist, -1)[keep]
    weights = logp.exp().detach()
    plain = grad((weights * kl_k3(logp, ref_logp, mass)).sum(), theta)
    torch.testing.assert_close(plain, grad((weights * kl_k3(logp, ref_logp)).sum(), theta), **TOL)
    ref_s = (ref_logp - mass.log()).exp()  # the reference cut to S and renormalised
    reverse = (ref_s * (ref_s.log() - logp)).sum()
    torch.testing.assert_close(plain, mass * grad(reverse, theta), **TOL)
    ratio = torch.exp(logp - logp.detach())
    weighted = grad((weights * ratio * kl_k3(logp, ref_logp, mass)).sum(), theta)
    torch.testing.assert_close(weighted, grad(exact_kl(dist, ref_dist), theta), **TOL)


def test_k3_times_the_ratio_has_the_forward_kl_gradient_without_a_nucleus(logits):
    theta, ref = logits
    logp, ref_logp = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
    ratio = torch.exp(logp - logp.detach())  # 1 in value, not in gradient
    weighted = (logp.exp().detach() * ratio * kl_k3(logp, ref_logp)).sum()
    torch.testing.assert_close(grad(weighted, theta), grad(kl(theta, ref), theta), **TOL)


def test_reference_mass_is_exactly_one_when_nothing_is_cut():
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    ref = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    dist, _ = sampling_logits(z, 0.7, 1.0, banned_ids=[5])
    ref_dist, _ = sampling_logits(ref, 0.7, 1.0, banned_ids=[5])  # the same ids banned: no cut
    assert torch.equal(reference_mass(dist, ref_dist), torch.ones(3))
    logp, ref_logp = (
        token_logprobs(dist, torch.tensor([0, 1, 2])),
        token_logprobs(ref_dist, torch.tensor([0, 1, 2])),
    )
    assert torch.equal(kl_k3(logp, ref_logp, reference_mass(dist, ref_dist)), kl_k3(logp, ref_logp))
    assert torch.equal(
        per_token_kl("k3", logp=logp, ref_logp=ref_logp, ref_mass=torch.ones(3)), kl_k3(logp, ref_logp)
    )
    with pytest.raises(ValueError, match="differ"):
        reference_mass(dist, ref_dist[:, :5])


def test_batch_scale_divides_by_the_whole_generation_batchs_std():
    local = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 4.0]])
    other = torch.tensor([[0.0, 9.0, 5.0], [2.0, 2.0, 2.0]])  # another rank's, or micro-batch's
    everything = torch.cat([local, other])
    out = group_advantages(local, scale="batch", batch_rewards=everything).advantages
    centred = local - local.mean(1, keepdim=True)
    torch.testing.assert_close(out, centred / (everything.std() + 1e-4))
    assert not torch.allclose(out, group_advantages(local, scale="batch").advantages)
    # one process holding the whole batch: the same numbers for its rows
    whole = group_advantages(everything, scale="batch").advantages
    assert torch.equal(whole[:2], out)
    with pytest.raises(ValueError, match="whole generation batch"):
        group_advantages(local, scale="batch", batch_rewards=local[0])
    with pytest.raises(ValueError, match="only apply with scale 'batch'"):
        group_advantages(local, scale="group", batch_rewards=everything)
