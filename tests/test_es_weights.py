"""Exact (master) weights: bit-exact perturb/restore, seeds-only agreement, no update lost to bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.es import weights
from alignment.es.noise import f32, gaussian
from alignment.es.weights import PerturbableParams, weights_checksum

NAME = "model.layers.1.self_attn.q_proj.weight"


def load_policy(toy_models, dtype):
    return AutoModelForCausalLM.from_pretrained(toy_models / "policy", dtype=dtype)


def named(model):
    return dict(model.named_parameters())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("master_dtype", ["fp32", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_perturb_restore_cycles_are_bit_exact(toy_models, dtype, master_dtype):
    model = load_policy(toy_models, dtype)
    before = snapshot(model)
    params = PerturbableParams(named(model), master_dtype=master_dtype)
    for seed in range(50):
        params.perturb(seed, sigma=0.01, sign=-1.0 if seed % 2 else 1.0)
        if seed == 0:
            changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
            assert len(changed) == len(before)  # every tensor moved, linear layers included
        params.restore()
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_subtracting_the_noise_would_not_restore_bf16(toy_models):
    """Why restore rounds the master again: the published add-then-subtract drifts in bf16."""
    model = load_policy(toy_models, torch.bfloat16)
    w = model.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    eps = gaussian(1, "w", w.shape, "cpu")
    with torch.no_grad():
        w.add_((0.01 * eps).to(w.dtype))
        w.sub_((0.01 * eps).to(w.dtype))
    assert not torch.equal(w, before)


def test_perturbation_matches_the_formula(toy_models):
    model = load_policy(toy_models, torch.bfloat16)
    base = named(model)[NAME].detach().clone()
    params = PerturbableParams(named(model))
    params.perturb(7, sigma=0.05, sign=-1.0)
    # recomputed with the same operations (a product, then a sum, then one rounding to bf16)
    expected = (base.float() + gaussian(7, NAME, base.shape, "cpu") * f32(-0.05)).to(torch.bfloat16)
    assert torch.equal(named(model)[NAME], expected)
    with pytest.raises(RuntimeError, match="restore"):
        params.perturb(8, sigma=0.05)


def test_two_engines_agree_after_seeds_only_updates(toy_models, monkeypatch):
    a, b = load_policy(toy_models, torch.bfloat16), load_policy(toy_models, torch.bfloat16)
    pa = PerturbableParams(named(a))
    monkeypatch.setattr(weights, "CHUNK", 1000)  # other blocks: tensors cut and grouped otherwise
    pb = PerturbableParams(named(b), cache_bytes=0)  # and every noise drawn anew (pa reuses its own)
    assert len(pb.blocks) > 10 * len(pa.blocks)
    history = [([1, 2, 3], [0.5, -1.0, 0.25]), ([4, 5], [1.2, -0.7]), ([6, 7, 8, 9], [0.1, 0.2, -0.3, 0.4])]
    for seeds, coefs in history:
        pa.perturb(seeds[0], 0.01)  # engines evaluate different members in between ...
        pa.restore()
        pb.perturb(seeds[-1], 0.01)
        pb.restore()
        pa.apply_update(seeds, coefs, scale=0.001)  # ... and apply the same update from seeds
        pb.apply_update(seeds, coefs, scale=0.001)
    assert pa.checksum() == pb.checksum()
    assert pa.live_checksum() == pb.live_checksum() == weights_checksum(named(b).items())
    assert all(torch.equal(x, y) for x, y in zip(named(a).values(), named(b).values(), strict=True))


def test_blocks_cover_every_element_once(toy_models):
    params = named(load_policy(toy_models, torch.float32))
    for size in (1000, 1 << 22):
        covered = {n: torch.zeros(t.numel(), dtype=torch.int64) for n, t in params.items()}
        for block in weights.plan_blocks(params, size):
            assert sum(b - a for _, a, b in block) <= size
            for name, a, b in block:
                covered[name][a:b] += 1
        assert all(bool((c == 1).all()) for c in covered.values())


def test_perturbation_of_a_block_is_per_tensor_noise(toy_models, monkeypatch):
    """One draw for many tensors gives each tensor its own noise (the one gaussian() gives)."""
    model = load_policy(toy_models, torch.float32)
    base = {k: v.detach().clone() for k, v in named(model).items()}
    params = PerturbableParams(named(model))
    assert len(params.blocks) == 1  # the toy model: every tensor in one block
    params.perturb(3, sigma=0.1)
    for name, live in named(model).items():
        assert torch.equal(live, base[name] + gaussian(3, name, live.shape, "cpu") * f32(0.1)), name


def test_update_accumulates_in_the_fp32_master_and_rounds_into_live(toy_models):
    model = load_policy(toy_models, torch.bfloat16)
    base = named(model)[NAME].detach().float()
    params = PerturbableParams({NAME: named(model)[NAME]})
    master = base.clone()
    for seeds, coefs in (([1, 2], [0.5, -1.0]), ([3], [2.0])):
        params.apply_update(seeds, coefs, scale=1e-4)
        direction = torch.zeros_like(master)
        for s, c in zip(seeds, coefs, strict=True):
            direction = direction + gaussian(s, NAME, master.shape, "cpu") * f32(c)
        master = master + direction * f32(1e-4)
    assert torch.equal(params.master[NAME], master)
    assert torch.equal(params.params[NAME], master.to(torch.bfloat16))
    assert params.state_dict()[NAME].dtype == torch.float32


def test_updates_below_half_an_ulp_are_kept_only_by_the_fp32_master():
    """Weights of 1.0 in bf16 (half an ulp: 2^-8 up, 2^-9 down) and steps of 2e-4·ε (|ε| < 6.4): rounded
    into bf16 each time they never move; kept in fp32 they add up."""
    moved = {}
    for master_dtype in ("fp32", "model"):
        live = {"w": torch.ones(4096, dtype=torch.bfloat16)}
        params = PerturbableParams(live, master_dtype=master_dtype)
        stats = [params.apply_update([5], [1.0], scale=2e-4).metrics() for _ in range(40)]
        moved[master_dtype] = (live["w"].float() - 1.0).abs().gt(0).double().mean().item()
        if master_dtype == "model":
            assert all(s["update/fraction_changed"] == 0.0 for s in stats)
            assert all(s["update/realised_intended_ratio"] == 0.0 for s in stats)
        else:
            cumulative = 40 * gaussian(5, "w", (4096,), "cpu") * 2e-4
            err = live["w"].float() - 1.0 - cumulative
            assert err.abs().max() <= 2.0**-8 + 1e-6  # at most half an ulp: the last rounding only
            assert all(s["update/master_intended_ratio"] == pytest.approx(1.0, abs=1e-3) for s in stats)
    assert moved["model"] == 0.0 and moved["fp32"] > 0.5


def test_master_can_live_elsewhere_and_load_state_round_trips(toy_models):
    model = load_policy(toy_models, torch.bfloat16)
    params = PerturbableParams(named(model), keep_on="cpu")
    assert {t.device.type for t in params.master.values()} == {"cpu"}
    assert {t.dtype for t in params.master.values()} == {torch.float32}
    params.apply_update([1], [1.0], 0.01)
    state = params.state_dict()
    other = PerturbableParams(named(load_policy(toy_models, torch.bfloat16)))
    other.load_state_dict(state)
    assert other.checksum() == params.checksum() and other.live_checksum() == params.live_checksum()
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match="other shapes"):
        other.load_state_dict({**state, NAME: state[NAME][:1]})


def test_checksum_sees_a_one_bit_difference(toy_models):
    model = load_policy(toy_models, torch.bfloat16)
    before = weights_checksum(named(model).items())
    w = model.model.norm.weight
    with torch.no_grad():
        bits = w.view(torch.int16)
        bits[3] ^= 1
    assert weights_checksum(named(model).items()) != before


def test_noise_drawn_ahead_in_a_thread_gives_the_weights_drawn_on_demand(toy_models):
    """prefetch() draws the members in a background thread while the engine would generate; every
    perturbation and the update are bit for bit those of an engine drawing each noise when needed."""
    ahead, demand = load_policy(toy_models, torch.float32), load_policy(toy_models, torch.float32)
    pa, pd = PerturbableParams(named(ahead)), PerturbableParams(named(demand), cache_bytes=0)
    seeds, coefs = [11, 12, 12, 13], [0.5, -0.25, 0.25, 1.0]  # an antithetic pair shares a seed
    pa.prefetch(seeds)
    for seed, sign in zip(seeds, [1.0, 1.0, -1.0, 1.0], strict=True):
        pa.perturb(seed, 0.05, sign)
        pd.perturb(seed, 0.05, sign)
        assert pa.live_checksum() == pd.live_checksum()
        pa.restore()
        pd.restore()
    pa.apply_update(seeds, coefs, scale=0.01)
    pd.apply_update(seeds, coefs, scale=0.01)
    assert pa._cache._thread is None and not pa._cache._noise  # the thread is joined, the noise dropped
    assert all(torch.equal(x, y) for x, y in zip(named(ahead).values(), named(demand).values(), strict=True))
