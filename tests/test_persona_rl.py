"""The persona losses against exact expectations: REINFORCE's gradient and sign by enumerating a
small categorical, GRPO's ratio (1, then not) and its KL term, the retriever's distillation KL."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.persona.rl import (
    GRPOSettings,
    distillation_loss,
    grpo_advantages,
    grpo_objective,
    reinforce_baseline,
    reinforce_objective,
)
from alignment.persona.sampler import Samples, reference_logits, sampled_logits
from alignment.persona.trainer import train
from alignment.pg import sampling_logits
from alignment.tracking import read_jsonl_metrics


def test_reinforce_baselines():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(reinforce_baseline(r, "none"), torch.zeros(4))
    assert torch.equal(reinforce_baseline(r, "batch_mean"), torch.full((4,), 3.0))
    torch.testing.assert_close(
        reinforce_baseline(r, "leave_one_out"), torch.tensor([11.0, 10.0, 9.0, 6.0]) / 3
    )
    with pytest.raises(ValueError, match="at least 2"):
        reinforce_baseline(torch.tensor([1.0]), "batch_mean")


def test_reinforce_expected_gradient_is_the_gradient_of_expected_reward():
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    probs = torch.softmax(theta, 0).detach()
    expected_grad = torch.zeros(3, dtype=torch.float64)
    for y in range(3):  # E_y~π[−∇ loss(y)], enumerated
        logp = torch.log_softmax(theta, 0)[y].view(1, 1)
        res = reinforce_objective(logp, torch.ones(1, 1, dtype=torch.bool), rewards[y : y + 1], "none")
        (g,) = torch.autograd.grad(res.loss, theta)
        expected_grad -= probs[y] * g
    (true_grad,) = torch.autograd.grad((torch.softmax(theta, 0) * rewards).sum(), theta)
    torch.testing.assert_close(expected_grad, true_grad, rtol=1e-12, atol=1e-12)


def test_reinforce_sign_and_sequence_logprob():
    theta = torch.zeros(2, 3, 4, requires_grad=True)  # two responses, three positions, four tokens
    tokens = torch.tensor([[1, 2, 3], [3, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp = torch.log_softmax(theta, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
    res = reinforce_objective(logp, mask, torch.tensor([2.0, 0.0]), "batch_mean")
    assert res.baseline.tolist() == [1.0, 1.0]
    torch.testing.assert_close(res.seq_logprob, torch.tensor([3 * math.log(0.25), math.log(0.25)]))
    res.loss.backward()
    with torch.no_grad():
        stepped = torch.log_softmax(theta - 0.5 * theta.grad, -1)
    # above the baseline: its tokens got likelier; below: less likely; positions off the mask untouched
    assert stepped[0, 0, 1] > math.log(0.25) and stepped[1, 0, 3] < math.log(0.25)
    assert torch.equal(theta.grad[1, 1:], torch.zeros(2, 4))


def test_group_advantages_per_group():
    adv, zero = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]), 4, "group")
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std()
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4)) and zero == 0.5
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(8), 3, "group")


def _policy_batch():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 3, 5, generator=gen, requires_grad=True)
    ref = torch.randn(4, 3, 5, generator=gen)
    tokens = torch.tensor([[1, 2, 3], [4, 1, 0], [2, 2, 2], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return theta, ref, tokens, mask, torch.tensor([1.0, -1.0, 0.5, -0.5])


def _dists(theta, ref):
    # token 0 banned (as pad is): −inf logits inside both distributions
    return sampling_logits(theta, 0.8, 1.0, [0])[0], sampling_logits(ref, 0.8, 1.0, [0])[0]


def test_grpo_ratio_is_one_on_the_first_inner_epoch_and_not_after():
    theta, ref, tokens, mask, adv = _policy_batch()
    opt = torch.optim.SGD([theta], lr=1.0)
    settings = GRPOSettings(kl_coeff=0.1)
    dist, ref_dist = _dists(theta, ref)
    first, old = grpo_objective(dist, ref_dist, tokens, mask, None, adv, settings)
    assert first.ratio_mean.item() == 1.0 and first.clip_fraction.item() == 0.0
    assert not old.requires_grad
    opt.zero_grad()
    first.loss.backward()
    assert torch.isfinite(theta.grad).all()  # despite the −inf of the banned token
    opt.step()
    second, _ = grpo_objective(*_dists(theta, ref), tokens, mask, old, adv, settings)
    assert abs(second.ratio_mean.item() - 1.0) > 1e-3
    # the clip is active somewhere after a large step, and the objective improved
    assert second.clip_fraction.item() > 0 and second.pg_loss < first.pg_loss


def test_grpo_exact_kl_term_is_applied_with_its_coefficient():
    theta, ref, tokens, mask, adv = _policy_batch()
    dist, ref_dist = _dists(theta, ref)
    p, q = torch.softmax(dist, -1), torch.softmax(ref_dist, -1)
    support = p > 0
    by_hand = torch.where(support, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)
    per_token_mean = (by_hand * mask).sum() / mask.sum()
    with_kl, _ = grpo_objective(dist, ref_dist, tokens, mask, None, adv, GRPOSettings(kl_coeff=0.5))
    without, _ = grpo_objective(dist, ref_dist, tokens, mask, None, adv, GRPOSettings(kl_coeff=0.0))
    torch.testing.assert_close(with_kl.kl, per_token_mean.detach())
    torch.testing.assert_close(with_kl.loss - without.loss, 0.5 * per_token_mean)
    # with zero advantages only the KL moves the policy: toward the reference
    zero_adv, _ = grpo_objective(
        dist, ref_dist, tokens, mask, None, torch.zeros(4), GRPOSettings(kl_coeff=1.0)
    )
    zero_adv.loss.backward()
    with torch.no_grad():
        after = _dists(theta - 0.5 * theta.grad, ref)
        closer, _ = grpo_objective(*after, tokens, mask, None, torch.zeros(4), GRPOSettings(kl_coeff=1.0))
    assert closer.kl < zero_adv.kl


def test_grpo_k3_estimator_on_the_sampled_tokens():
    theta, ref, tokens, mask, adv = _policy_batch()
    dist, ref_dist = _dists(theta, ref)
    out, logp = grpo_objective(dist, ref_dist, tokens, mask, None, adv, GRPOSettings(kl_estimator="k3"))
    ref_logp = torch.log_softmax(ref_dist, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    d = ref_logp - logp
    k3 = torch.where(mask, d.exp() - d - 1, torch.zeros_like(d))
    torch.testing.assert_close(out.kl, (k3.sum() / mask.sum()).detach())
    with pytest.raises(ValueError, match="reference"):
        grpo_objective(dist, None, tokens, mask, None, adv, GRPOSettings(kl_coeff=0.1))


def test_distillation_loss_is_the_kl_to_the_reward_softmax():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
    t_s, t_g = 0.5, 0.25
    total = 0.0
    for b in range(2):
        target = [math.exp(r / t_g) for r in rewards[b].tolist()]
        target = [t / sum(target) for t in target]
        q = [math.exp(s / t_s) for s in scores[b].tolist()]
        q = [x / sum(q) for x in q]
        total += sum(t * math.log(t / x) for t, x in zip(target, q, strict=True))
    loss = distillation_loss(scores, rewards, t_s, t_g)
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)
    loss.backward()
    assert scores.grad[0, 1] < 0 and scores.grad[1, 2] < 0  # raise the best passages' scores
    with pytest.raises(ValueError, match="> 0"):
        distillation_loss(scores, rewards, 0.0, 1.0)


def test_a_non_finite_gradient_never_reaches_the_weights():
    from alignment.persona.steps import Optim

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    optim = Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), [w])
    with pytest.raises(FloatingPointError, match="gradient norm is inf"):
        optim.update(torch.sqrt(w - 1).sum())  # a finite loss (0) whose gradient is infinite
    with pytest.raises(FloatingPointError, match="loss is inf"):
        optim.update(w.sum() * float("inf"))
    assert torch.equal(w.detach(), torch.ones(3))
    assert optim.update(w.sum()) == pytest.approx(3**0.5)


def _one_step_samples(logits: torch.Tensor, token: int, top_p: float) -> Samples:
    """One response of one token drawn from ``logits`` [V] with ``top_p``; id 4 is banned (as pad is)."""
    dist, keep = sampling_logits(logits, 1.0, top_p, [4])
    logp = torch.log_softmax(dist, -1)[token]
    return Samples(
        torch.tensor([[token]]), torch.ones(1, 1, dtype=torch.bool), logp.view(1, 1), keep.view(1, 1, -1)
    )


def _kl_of_sample(policy, ref, token, top_p, estimator) -> torch.Tensor:
    """The persona GRPO's logged KL for one sampled token, through its own sampler helpers."""
    samples = _one_step_samples(policy.detach(), token, top_p)
    dist = sampled_logits(policy.view(1, 1, -1), samples, 1.0, top_p, [4])
    ref_dist = reference_logits(ref.view(1, 1, -1), 1.0, [4])
    out, _ = grpo_objective(dist, ref_dist, samples.tokens, samples.mask, None, torch.zeros(1),
                            GRPOSettings(kl_coeff=1.0, kl_estimator=estimator))  # fmt: skip
    return out


def test_grpo_kl_under_a_collapsed_nucleus_is_minus_log_ref():
    """Issue 21, item 1: 4 tokens (+ a banned one), nucleus {0}, the reference gives token 0 0.01. The
    reference is taken without the nucleus, so the KL is −log 0.01 = 4.605, not 0."""
    policy = torch.tensor([6.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.01, 0.33, 0.33, 0.33, 1.0], dtype=torch.float64).log()  # id 4 is banned anyway
    assert _one_step_samples(policy.detach(), 0, 0.5).keep.view(-1).tolist() == [
        True,
        False,
        False,
        False,
        False,
    ]
    for estimator in ("exact", "k1", "k3"):
        out = _kl_of_sample(policy, ref, 0, 0.5, estimator)
        assert out.kl.item() == pytest.approx(-math.log(0.01), abs=1e-12), estimator
        # with A = 0 the loss is β·KL; nearby weights sample the same single token: no gradient
        (g,) = torch.autograd.grad(out.loss, policy)
        assert g.abs().max() == 0, estimator
    # what the cut reference said (the bug): both distributions are token 0 with probability 1
    samples = _one_step_samples(policy.detach(), 0, 0.5)
    cut = sampled_logits(ref.view(1, 1, -1), samples, 1.0, 0.5, [4])
    dist = sampled_logits(policy.view(1, 1, -1), samples, 1.0, 0.5, [4])
    assert (
        grpo_objective(dist, cut, samples.tokens, samples.mask, None, torch.zeros(1), GRPOSettings())[0].kl
        == 0
    )


def test_grpo_kl_estimators_under_a_nucleus_by_enumeration():
    """E over the sampled token of each estimator, through the persona path, against KL(π_S‖ref)
    written out: exact at every token, k1 and (corrected) k3 in expectation."""
    policy = torch.tensor([1.2, 0.9, 0.3, -0.5, 0.0], dtype=torch.float64)
    ref = torch.tensor([-0.3, 0.8, 0.1, 0.6, 0.0], dtype=torch.float64)
    top_p = 0.75
    dist, keep = sampling_logits(policy, 1.0, top_p, [4])
    support = [v for v in range(5) if keep[v]]
    assert 1 < len(support) < 4
    p = torch.softmax(dist, -1)
    q = torch.softmax(ref[:4], -1)  # the reference over the 4 allowed ids: no nucleus
    target = sum(float(p[v]) * math.log(float(p[v]) / float(q[v])) for v in support)
    assert q[support].sum() < 0.9  # the nucleus leaves > 10 % of the reference's mass out
    for estimator in ("exact", "k1", "k3"):
        values = {v: _kl_of_sample(policy, ref, v, top_p, estimator).kl.item() for v in support}
        mean = sum(float(p[v]) * values[v] for v in support)
        assert mean == pytest.approx(target, abs=1e-12), estimator
        if estimator == "exact":
            assert all(x == pytest.approx(target, abs=1e-12) for x in values.values())


def test_grpo_step_kl_sees_the_nucleus_and_k3_agrees(persona_toy, tmp_path):
    """End to end through ``grpo_step``: at the first step the policy is the reference, so with
    ``--sampling_top_p 0.5`` the KL at each token is exactly −log ref(S), the reference's mass on the
    nucleus sampled from (> 0; the cut reference gave 0 here), and the corrected k3 equals it at every
    token (TRL's k3 would be lower by 1 − ref(S) per token)."""
    from tests.test_persona_train import toy_cfg

    kl = {}
    for estimator in ("exact", "k3"):
        cfg = toy_cfg(persona_toy, tmp_path, estimator, reader_rl_learning=True, use_grpo=True, total_steps=1,
                      per_gpu_batch_size=2, grpo_inner_epochs=1, sampling_top_p=0.5, grpo_kl_estimator=estimator,
                      eval_max_examples=2)  # fmt: skip
        train(cfg)
        (row,) = [r for r in read_jsonl_metrics(cfg.run_dir / "metrics.jsonl") if "train/kl" in r]
        kl[estimator] = row["train/kl"]
    assert kl["exact"] > 0.05
    # the same samples (same seed); the two sums differ only by float32 rounding (a few ulps per token)
    assert kl["k3"] == pytest.approx(kl["exact"], rel=1e-5)
