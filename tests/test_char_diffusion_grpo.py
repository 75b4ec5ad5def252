"""GRPO fill-in maths: the sampled distribution and its log-probs, one policy forward for k fills,
the loss's gradient (policy term and exact KL) against independent computations, the metrics."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.grpo import Rollout, grpo_loss, rescore, rollout
from alignment.char_diffusion.model import Generator, Judge, ModelArgs
from alignment.char_diffusion.sampling import (
    draw_fills,
    fill_distribution,
    fill_logprobs,
    place_fills,
    to_positions,
)

V, BANNED = 7, (4, 5, 6)  # 4 characters, then [MASK] [PAD] [CLS]
SEED_METRICS = ("loss", "pg_loss", "kl_penalty", "mean_reward", "std_reward", "mean_advantage", "mean_kl",
                "mean_log_prob")  # fmt: skip


def sampled_probs(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The sampler's distribution written out by hand: tempered softmax without the special ids, then
    the smallest most-likely set whose mass reaches top_p, renormalised."""
    w = [0.0 if i in BANNED else math.exp(z / temperature) for i, z in enumerate(logits)]
    p = [x / sum(w) for x in w]
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p or p[i] == 0.0:
            break
        kept.add(i)
        mass += p[i]
    return [p[i] / mass if i in kept else 0.0 for i in range(len(p))]


def test_fill_logprobs_are_the_logs_of_the_sampled_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    dist, keep = fill_distribution(logits, mask, temperature=0.7, top_p=0.8, banned_ids=BANNED)
    draws = draw_fills(dist, 6, torch.Generator().manual_seed(1))
    got = fill_logprobs(dist, draws)
    assert got.shape == (6, 5)  # [k, N]
    for n, row in enumerate(logits[mask].tolist()):
        probs = sampled_probs(row, 0.7, 0.8)
        assert keep[n].tolist() == [p > 0 for p in probs]
        for j in range(6):
            assert probs[int(draws[j, n])] > 0  # never a special id, never outside the nucleus
            assert got[j, n].item() == pytest.approx(math.log(probs[int(draws[j, n])]), abs=1e-12)


def test_draws_follow_the_sampled_distribution():
    logits = torch.tensor([[[1.0, 0.5, 0.0, -1.0, 3.0, 3.0, 3.0]]], dtype=torch.float64)
    dist, _ = fill_distribution(logits, torch.ones(1, 1, dtype=torch.bool), 0.8, 0.95, BANNED)
    draws = draw_fills(dist, 40000, torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(draws, minlength=V).double() / len(draws)
    expected = torch.tensor(sampled_probs(logits[0, 0].tolist(), 0.8, 0.95), dtype=torch.float64)
    # 40,000 draws: each frequency is within 4 standard errors (<= 0.01) of its probability
    assert torch.allclose(freq, expected, atol=0.01) and freq[list(BANNED)].sum() == 0


def test_fills_keep_visible_characters_and_spread_values_back():
    inp = torch.tensor([[0, 4, 1, 4], [4, 2, 3, 3]])
    mask = inp == 4
    draws = torch.tensor([[0, 1, 2], [3, 3, 3]])  # [k=2, N=3]
    filled = place_fills(inp, mask, draws)
    assert filled.tolist() == [[[0, 0, 1, 1], [0, 3, 1, 3]], [[2, 2, 3, 3], [3, 2, 3, 3]]]
    spread = to_positions(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), mask)
    assert spread.tolist() == [[[0, 1, 0, 2], [0, 4, 0, 5]], [[3, 0, 0, 0], [6, 0, 0, 0]]]


class Counting(torch.nn.Module):
    """Wraps a model and counts its forward calls and the rows they carried."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x)

    def corrupted_fraction(self, filled: torch.Tensor, *masked: torch.Tensor) -> torch.Tensor:
        """A judge's scoring entry point (filled [B, k, T]): counted as one call on B·k rows."""
        self.calls += 1
        self.rows += filled.shape[0] * filled.shape[1]
        return self.model.corrupted_fraction(filled, *masked)


def _models(block: int = 6) -> tuple[Generator, Generator, Judge]:
    torch.manual_seed(0)
    gen = Generator(ModelArgs("generator", V, block, 1, 2, 8))
    judge = Judge(ModelArgs("judge", V, block, 1, 2, 8))
    return gen, Generator(gen.args).requires_grad_(False), judge


def test_one_policy_forward_per_input_for_all_k_fills():
    gen, ref, judge = _models()
    policy, reference, scorer = Counting(gen), Counting(ref), Counting(judge)
    tokens = torch.randint(0, 4, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 1:3] = True
    inp = tokens.masked_fill(mask, 4)
    cfg = GRPOConfig(group_size=8)
    ro, dist = rollout(
        policy, reference, scorer, tokens, inp, mask, cfg, BANNED, torch.Generator().manual_seed(0)
    )
    loss, _ = grpo_loss(dist, ro, cfg)
    loss.backward()
    assert (policy.calls, policy.rows) == (1, 3)  # one forward of the 3 inputs, not 3 x 8
    assert (reference.calls, reference.rows) == (1, 3)
    assert scorer.rows == 24  # the judge scores every fill
    assert ro.filled.shape == (3, 8, 6) and gen.lm_head.weight.grad is not None
    assert (ro.inp[ro.mask] == 4).all()


def _rollout_for(dist: torch.Tensor, ref_logits: torch.Tensor, draws: torch.Tensor, rewards: torch.Tensor,
                 advantages: torch.Tensor, mask: torch.Tensor) -> Rollout:  # fmt: skip
    k = draws.shape[0]
    b, t = mask.shape
    tokens = torch.zeros(b, t, dtype=torch.long)
    filled = place_fills(tokens.masked_fill(mask, 4), mask, draws)
    return Rollout(tokens, tokens.masked_fill(mask, 4), mask, draws, filled, torch.isfinite(dist),
                   fill_logprobs(dist, draws).detach(), ref_logits, rewards.view(b, k), advantages.view(b, k),
                   0.0, 0.0)  # fmt: skip


def test_policy_gradient_matches_the_formula_and_raises_better_fills():
    # one input with 2 masked positions, k = 3 fills; β = 0: loss = -1/k Σ_j A_j · mean_n log π(d_jn)
    z = torch.randn(2, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    logits = torch.stack([z[0], z[0].detach(), z[1]]).unsqueeze(0)  # [1, 3, V]; position 1 is visible
    dist, _ = fill_distribution(logits, mask, 1.0, 1.0, BANNED)
    draws = torch.tensor([[0, 1], [2, 2], [1, 3]])
    adv = torch.tensor([1.5, -0.5, -1.0], dtype=torch.float64)
    ro = _rollout_for(dist, dist.detach(), draws, torch.zeros(3), adv, mask)
    cfg = GRPOConfig(kl_beta=0.0)
    loss, metrics = grpo_loss(dist, ro, cfg)
    (grad,) = torch.autograd.grad(loss, z)
    logp = torch.log_softmax(z.masked_fill(torch.tensor([i in BANNED for i in range(V)]), -math.inf), -1)
    expected = -sum(adv[j] * (logp[0, draws[j, 0]] + logp[1, draws[j, 1]]) / 2 for j in range(3)) / 3
    (want,) = torch.autograd.grad(expected, z)
    assert torch.allclose(grad, want, atol=1e-12)
    assert metrics["loss"] == pytest.approx(expected.item(), abs=1e-12) == metrics["pg_loss"]
    step = z - 0.1 * grad  # a descent step raises the best fill's log-prob and lowers the worst's
    new = torch.log_softmax(step.masked_fill(torch.tensor([i in BANNED for i in range(V)]), -math.inf), -1)
    assert new[0, 0] + new[1, 1] > logp[0, 0] + logp[1, 1]
    assert new[0, 1] + new[1, 3] < logp[0, 1] + logp[1, 3]
    assert set(SEED_METRICS) | {"zero_spread_fraction", "fill_accuracy"} <= set(metrics)
    fill_logp = [float((logp[0, draws[j, 0]] + logp[1, draws[j, 1]]).detach()) / 2 for j in range(3)]
    assert metrics["mean_log_prob"] == pytest.approx(sum(fill_logp) / 3, abs=1e-9)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_exact_kl_term_is_the_mean_kl_per_masked_character_with_finite_gradient(top_p):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 2, V, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = torch.randn(1, 2, V, dtype=torch.float64, generator=gen)
    mask = torch.ones(1, 2, dtype=torch.bool)
    dist, _ = fill_distribution(z, mask, 0.8, top_p, BANNED)
    ref_logits, _ = fill_distribution(ref, mask, 0.8, 1.0, BANNED)
    draws = dist.argmax(-1).unsqueeze(0).repeat(4, 1)
    ro = _rollout_for(dist, ref_logits, draws, torch.zeros(4), torch.zeros(4, dtype=torch.float64), mask)
    loss, metrics = grpo_loss(dist, ro, GRPOConfig(kl_beta=0.5))  # A = 0: only the KL term is left
    (grad,) = torch.autograd.grad(loss, z)
    # KL(π‖π_ref) by enumeration, π the sampled (nucleus) distribution, π_ref tempered without nucleus
    p = [sampled_probs(row, 0.8, top_p) for row in z[0].tolist()]
    r = [sampled_probs(row, 0.8, 1.0) for row in ref[0].tolist()]
    kl = [
        sum(pi * math.log(pi / ri) for pi, ri in zip(pp, rr, strict=True) if pi > 0)
        for pp, rr in zip(p, r, strict=True)
    ]
    assert metrics["mean_kl"] == pytest.approx(sum(kl) / 2, abs=1e-9)
    assert loss.item() == pytest.approx(0.5 * sum(kl) / 2, abs=1e-9)
    assert metrics["kl_penalty"] == pytest.approx(loss.item()) == metrics["loss"]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the gradient is that of 0.5 · mean KL over the support that was sampled (finite differences)
    eps = 1e-6
    for v in range(4):
        bumped = z.detach().clone()
        bumped[0, 0, v] += eps
        pb = sampled_probs(bumped[0, 0].tolist(), 0.8, top_p) if top_p == 1.0 else None
        if pb is None:  # the support is held fixed: renormalise π over the same kept ids
            keep = [q > 0 for q in p[0]]
            w = [math.exp(x / 0.8) if k else 0.0 for x, k in zip(bumped[0, 0].tolist(), keep, strict=True)]
            pb = [x / sum(w) for x in w]
        klb = sum(pi * math.log(pi / ri) for pi, ri in zip(pb, r[0], strict=True) if pi > 0)
        assert grad[0, 0, v].item() == pytest.approx(0.5 * (klb - kl[0]) / 2 / eps, abs=1e-5)


def test_k3_option_values_and_is_not_the_exact_gradient():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(1, 1, V, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = torch.randn(1, 1, V, dtype=torch.float64, generator=gen)
    mask = torch.ones(1, 1, dtype=torch.bool)
    dist, _ = fill_distribution(z, mask, 1.0, 1.0, BANNED)
    ref_logits, _ = fill_distribution(ref, mask, 1.0, 1.0, BANNED)
    draws = torch.tensor([[0], [1], [2], [3]])
    ro = _rollout_for(dist, ref_logits, draws, torch.zeros(4), torch.zeros(4, dtype=torch.float64), mask)
    loss, metrics = grpo_loss(dist, ro, GRPOConfig(kl_beta=1.0, kl_estimator="k3"))
    logp, ref_logp = torch.log_softmax(dist[0], -1)[:4], torch.log_softmax(ref_logits[0], -1)[:4]
    d = ref_logp - logp
    assert loss.item() == pytest.approx((torch.exp(d) - d - 1).mean().item(), abs=1e-12)
    exact, _ = grpo_loss(dist, ro, GRPOConfig(kl_beta=1.0))
    assert not torch.allclose(
        torch.autograd.grad(loss, z, retain_graph=True)[0], torch.autograd.grad(exact, z)[0]
    )
    assert metrics["kl_penalty"] == pytest.approx(metrics["mean_kl"])


def test_rewards_advantages_and_accuracy_of_a_rollout():
    gen, ref, judge = _models()
    tokens = torch.randint(0, 4, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :3] = True
    cfg = GRPOConfig(group_size=4)
    ro, _ = rollout(gen, ref, judge, tokens, tokens.masked_fill(mask, 4), mask, cfg, BANNED,
                    torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        want = 1 - torch.sigmoid(judge(ro.filled.view(8, 6))).view(2, 4)
    assert torch.allclose(ro.rewards, want, atol=1e-6)
    centred = want - want.mean(1, keepdim=True)
    assert torch.allclose(ro.advantages, centred / (want.std(1, keepdim=True) + 1e-4), atol=1e-4)
    right = (ro.filled[:, :, :3] == tokens[:, None, :3]).float().mean()
    assert ro.fill_accuracy == pytest.approx(float(right))
    none = replace(cfg, advantage_scale="none")
    ro2, _ = rollout(gen, ref, judge, tokens, tokens.masked_fill(mask, 4), mask, none, BANNED,
                     torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.allclose(ro2.advantages, centred, atol=1e-6)


def test_a_later_inner_epoch_rescores_the_same_fills_with_one_forward_and_clips():
    gen, ref, judge = _models()
    policy = Counting(gen)
    tokens = torch.randint(0, 4, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2:5] = True
    cfg = GRPOConfig(group_size=4, kl_beta=0.0, clip_eps=0.2)
    ro, dist = rollout(policy, ref, judge, tokens, tokens.masked_fill(mask, 4), mask, cfg, BANNED,
                       torch.Generator().manual_seed(0))  # fmt: skip
    loss, first = grpo_loss(dist, ro, cfg)
    assert first["ratio_mean"] == pytest.approx(1.0) and first["clip_fraction"] == 0.0
    loss.backward()
    with torch.no_grad():  # a large step, so that the ratio leaves [0.8, 1.2] somewhere
        for p in gen.parameters():
            p -= 5.0 * p.grad.sign() * 0.05
    calls = policy.calls
    dist2 = rescore(policy, ro, cfg, BANNED)
    assert policy.calls == calls + 1  # one forward for the whole group again
    assert torch.isinf(dist2[~ro.keep]).all() and torch.isfinite(dist2[ro.keep]).all()  # same support
    _, second = grpo_loss(dist2, ro, cfg)
    assert second["ratio_mean"] != pytest.approx(1.0) and second["clip_fraction"] > 0.0


def _one_draw_kl(z: torch.Tensor, ref: torch.Tensor, draw: int, top_p: float, estimator: str) -> float:
    """``mean_kl`` of a rollout whose fills of one masked character are all ``draw`` (k = 2)."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    dist, _ = fill_distribution(z, mask, 0.8, top_p, BANNED)
    ref_logits, _ = fill_distribution(ref, mask, 0.8, 1.0, BANNED)
    ro = _rollout_for(dist, ref_logits, torch.tensor([[draw], [draw]]), torch.zeros(2),
                      torch.zeros(2, dtype=torch.float64), mask)  # fmt: skip
    return grpo_loss(dist, ro, GRPOConfig(kl_beta=1.0, kl_estimator=estimator))[1]["mean_kl"]


def test_k3_with_the_recipes_nucleus_is_unbiased_by_enumeration():
    """Issue 21, item 2: temperature 0.8, top_p 0.95 (the recipe's). E over the sampled character of
    the k3 metric, enumerated, equals the exact KL(π‖π_ref), π the nucleus distribution."""
    z = torch.tensor([[[2.5, 1.0, 0.2, -1.5, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    ref = torch.tensor([[[0.3, 1.1, -0.4, -1.2, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    for policy in (z, ref):  # a moved policy, and the unchanged one (π = π_ref before the nucleus)
        probs = sampled_probs(policy[0, 0].tolist(), 0.8, 0.95)
        support = [v for v, p in enumerate(probs) if p > 0]
        r = sampled_probs(ref[0, 0].tolist(), 0.8, 1.0)
        ref_mass = sum(r[v] for v in support)
        assert len(support) < 4 and ref_mass < 0.99  # the nucleus cuts something
        exact = sum(probs[v] * math.log(probs[v] / r[v]) for v in support)
        assert _one_draw_kl(policy, ref, support[0], 0.95, "exact") == pytest.approx(exact, abs=1e-12)
        k3 = sum(probs[v] * _one_draw_kl(policy, ref, v, 0.95, "k3") for v in support)
        assert k3 == pytest.approx(exact, abs=1e-12)
        if policy is ref:  # then KL = −log π_ref(S) and each draw's k3 is that, exactly
            assert exact == pytest.approx(-math.log(ref_mass), abs=1e-12)
            assert all(
                _one_draw_kl(ref, ref, v, 0.95, "k3") == pytest.approx(exact, abs=1e-12) for v in support
            )


def test_batch_scale_grades_with_the_whole_generation_batch():
    """Issue 21, item 3 on one process: with 2 micro-batches, ``batch`` divides by the std of both
    micro-batches' rewards (TRL's generation batch), not each micro-batch's own."""
    from alignment.char_diffusion.grpo import generation_rewards, grade
    from alignment.distributed import DistInfo

    gen, ref, judge = _models()
    cfg = GRPOConfig(group_size=4, advantage_scale="batch")
    rollouts = []
    for seed in (7, 8):
        tokens = torch.randint(0, 4, (2, 6), generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(2, 6, dtype=torch.bool)
        mask[:, 1:4] = True
        with torch.no_grad():
            ro, _ = rollout(gen, ref, judge, tokens, tokens.masked_fill(mask, 4), mask, cfg, BANNED,
                            torch.Generator().manual_seed(seed))  # fmt: skip
        assert ro.advantages is None  # not graded before the whole batch is in
        with pytest.raises(ValueError, match="no advantages yet"):
            grpo_loss(torch.zeros(6, V), ro, cfg)
        rollouts.append(ro)
    everything = generation_rewards(DistInfo(), [ro.rewards for ro in rollouts])
    assert torch.equal(everything, torch.stack([rollouts[0].rewards, rollouts[1].rewards]))
    std = torch.cat([ro.rewards.flatten() for ro in rollouts]).std()
    for ro in rollouts:
        graded = grade(ro, cfg, everything)
        centred = ro.rewards - ro.rewards.mean(1, keepdim=True)
        torch.testing.assert_close(graded.advantages, centred / (std + cfg.advantage_eps))
        assert not torch.allclose(graded.advantages, centred / (ro.rewards.std() + cfg.advantage_eps))
