"""Low-rank (EGGROLL) ES on the transformers engine: factors, the batched per-row adapters, the
exact full-rank update, and the trainer (learning, replay, refused mode changes).

The vLLM side (adapters built from seeds in the worker, one batched call) is in
``tests/test_es_lowrank_vllm.py``, run by the vLLM stage.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from alignment.es.checkpoint import ReplayLog, load_latest, replay_updates
from alignment.es.config import ESConfig
from alignment.es.engines import GenerationSettings, TransformersEngine
from alignment.es.executors import shares
from alignment.es.lowrank import (
    FULL,
    LowRankDirection,
    NoiseSpec,
    dense_perturbation,
    factor_table,
    factors,
    target_names,
)
from alignment.es.noise import NOISE_ID, NoiseMismatchError
from alignment.es.train_es_alignment import build_executor, run_es
from alignment.es.trainer import ESTrainer
from alignment.scoring.client import ScorerClient
from alignment.toy import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS

GREEDY = GenerationSettings(max_new_tokens=16, temperature=0.0)
LOWRANK = NoiseSpec("lowrank", 4)
MEMBERS = [(11, 1.0), (11, -1.0), (12, 1.0), (13, -1.0)]


@pytest.fixture(scope="module")
def engine(toy_models) -> TransformersEngine:
    return TransformersEngine(str(toy_models / "policy"), dtype="fp32")


def test_noise_ids_name_mode_and_rank_and_unknown_ids_are_refused() -> None:
    assert FULL.id == NOISE_ID and NoiseSpec.from_id(NOISE_ID) == FULL
    assert LOWRANK.id == f"{NOISE_ID}+lowrank-r4/v1" != NoiseSpec("lowrank", 8).id
    assert NoiseSpec.from_id(LOWRANK.id) == LOWRANK
    for bad in ("torch.randn/v0", f"{NOISE_ID}+lowrank-r0/v1", f"{NOISE_ID}+lowrank-r4/v9"):
        with pytest.raises(NoiseMismatchError):
            NoiseSpec.from_id(bad)
    with pytest.raises(ValueError, match="noise_rank"):
        ESConfig(noise="lowrank", noise_rank=0)
    assert [list(r) for r in shares(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(r) for r in shares(1, 2)] == [[0], []]


def test_adapter_paths_carry_the_member_exactly_and_an_unknown_vllm_is_refused() -> None:
    from types import SimpleNamespace

    from alignment.es.lora_vllm import adapter_path, install_seed_adapters, parse_adapter_path

    sigma = 0.1 + 0.2  # not a short decimal: repr round-trips it exactly
    assert parse_adapter_path(adapter_path(2**31 - 1, -1.0, sigma, 4)) == (2**31 - 1, -1.0, sigma, 4)
    with pytest.raises(ValueError, match="not an ES adapter path"):
        parse_adapter_path("/models/some-lora")
    assert install_seed_adapters(SimpleNamespace(), {}) is False  # an engine started without LoRA
    with pytest.raises(RuntimeError, match="cannot build adapters from seeds"):
        install_seed_adapters(SimpleNamespace(lora_manager=object()), {})  # another vLLM's manager


def test_targets_are_the_projection_matrices_only(engine) -> None:
    names = target_names(engine.params.params)
    assert len(names) == 7 * engine.model.config.num_hidden_layers
    assert {n.split(".")[-2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj"}  # fmt: skip
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n in names)
    with pytest.raises(ValueError, match="has none"):
        target_names({"wte.weight": torch.zeros(4, 4), "ln.weight": torch.zeros(4)})


def test_factors_are_independent_standard_normals() -> None:
    a, b = factors(7, "model.layers.0.mlp.down_proj.weight", (256, 512), 4, "cpu")
    assert a.shape == (256, 4) and b.shape == (512, 4)
    a2, _ = factors(8, "model.layers.0.mlp.down_proj.weight", (256, 512), 4, "cpu")
    a3, _ = factors(7, "model.layers.0.mlp.up_proj.weight", (256, 512), 4, "cpu")
    for other in (b[:256], a2, a3):  # other stream, seed, name: uncorrelated (|r| < 5/sqrt(n))
        assert abs(torch.corrcoef(torch.stack([a.flatten(), other.flatten()]))[0, 1]) < 5 / math.sqrt(1024)
    assert abs(float(a.mean())) < 0.2 and abs(float(a.std()) - 1) < 0.1
    # drawn many at a time (in calls of at most max_elements), the factors keep their bits
    shapes = {
        "model.layers.0.mlp.down_proj.weight": (256, 512),
        "model.layers.0.self_attn.q_proj.weight": (64, 32),
    }
    table = factor_table([7, 8], shapes, 4, "cpu", max_elements=1500)
    for (seed, name), (ta, tb) in table.items():
        fa, fb = factors(seed, name, shapes[name], 4, "cpu")
        assert torch.equal(ta, fa) and torch.equal(tb, fb)


def test_update_direction_is_slice_invariant_and_the_low_rank_sum() -> None:
    name, shape = "model.layers.1.mlp.gate_proj.weight", (48, 40)
    seeds, coefs = [3, 4, 5], [0.8, -1.3, 0.0]
    whole = LowRankDirection(seeds, coefs, 4, {name: shape})(name, 0, 48 * 40, torch.device("cpu"))
    sliced = LowRankDirection(seeds, coefs, 4, {name: shape})
    pieces = torch.cat(
        [sliced(name, a, min(a + 37, 48 * 40), torch.device("cpu")) for a in range(0, 48 * 40, 37)]
    )
    assert torch.equal(pieces, whole)  # elementwise in a fixed order: any slicing, the same bits
    dense = sum(
        c * dense_perturbation(s, 1.0, 1.0, name, shape, 4).double()
        for s, c in zip(seeds, coefs, strict=True)
    )
    # fp32: each element is a sum of 8 rounded products of O(1) values, so a few ulp of O(10)
    assert torch.allclose(whole.view(shape).double(), dense, rtol=0, atol=1e-5)
    # 2 members x rank 4: rank 8 (singular values above the fp32 rounding, ~1e-5)
    assert torch.linalg.matrix_rank(whole.view(shape).double(), atol=1e-3) == 8


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_batched_adapters_equal_the_dense_perturbed_weights_and_leave_them_untouched(engine) -> None:
    from alignment.es.lowrank_hf import MemberAdapters

    model = engine.model
    names = target_names(engine.params.params)
    before = (engine.checksum(), engine.params.live_checksum())
    ids = engine.tokenizer(list(TOY_EVAL_PROMPTS[:3]), return_tensors="pt", padding=True)["input_ids"]
    adapters = MemberAdapters(model, names)
    try:
        with adapters.use(MEMBERS[:2], 0.05, 4):  # rows 0-2: member 0, rows 3-5: member 1
            hooked = _logits(model, torch.cat([ids, ids]))
        assert torch.equal(_logits(model, ids), _logits(model, ids))  # hooks off outside the block
    finally:
        adapters.remove()
    assert (engine.checksum(), engine.params.live_checksum()) == before
    for k, (seed, sign) in enumerate(MEMBERS[:2]):
        with torch.no_grad():
            for n in names:
                engine.params.params[n].add_(
                    dense_perturbation(seed, sign, 0.05, n, engine.params.params[n].shape, 4)
                )
        try:
            dense = _logits(model, ids)
        finally:
            engine.restore()
        # two summation orders of the same fp32 products: equal to ~1e-6 on O(1) logits
        assert torch.allclose(hooked[3 * k : 3 * k + 3], dense, rtol=0, atol=1e-4)
    assert not torch.allclose(hooked[:3], hooked[3:], atol=1e-3)  # antithetic twins differ


def test_members_share_batched_calls_with_the_answers_of_one_member_per_call(engine) -> None:
    prompts = list(TOY_EVAL_PROMPTS[:6])
    before = engine.params.live_checksum()
    got: list[int] = []
    grouped = engine.generate_members(MEMBERS, prompts, 0.05, GREEDY, 4, lambda k, _: got.append(k))
    alone = engine.generate_members(MEMBERS, prompts, 0.05, dataclasses.replace(GREEDY, batch_size=6), 4)
    assert grouped == alone and got == [0, 1, 2, 3]
    base = engine.generate(prompts, GREEDY)
    assert all(answers != base for answers in grouped)  # the adapters reach the output
    assert engine.params.live_checksum() == before  # nothing to restore


def test_low_rank_update_moves_only_the_targets_and_replays_bit_identically(toy_models) -> None:
    a = TransformersEngine(str(toy_models / "policy"), dtype="bf16")
    b = TransformersEngine(str(toy_models / "policy"), dtype="bf16")
    start = a.state_dict()
    names = set(target_names(a.params.params))
    stats = a.apply_update([1, 2], [0.7, -1.1], 0.01, LOWRANK)
    assert 0 < stats["update/fraction_changed"] <= 1 and stats[
        "update/master_intended_ratio"
    ] == pytest.approx(1)
    after = a.state_dict()
    assert all(torch.equal(after[n], start[n]) for n in start if n not in names)  # norms, embeddings, head
    for n in names:
        expected = start[n].double() + 0.01 * (0.7 * dense_perturbation(1, 1, 1, n, start[n].shape, 4).double()
                                                - 1.1 * dense_perturbation(2, 1, 1, n, start[n].shape, 4).double())  # fmt: skip
        assert torch.allclose(after[n].double(), expected, rtol=0, atol=1e-6)
    b.apply_update([1, 2], [0.7, -1.1], 0.01, LOWRANK)  # another engine, the same seeds
    assert (
        a.checksum() == b.checksum()
        and a.checksum() != TransformersEngine(str(toy_models / "policy")).checksum()
    )
    b.apply_update([1, 2], [0.7, -1.1], 0.01, FULL)  # the other mode is another update
    assert a.checksum() != b.checksum()


def lowrank_config(toy_models, scorer, tmp_path, **overrides) -> ESConfig:
    base = dict(
        policy_model_path=str(toy_models / "policy"), scorer_url=scorer.url, noise="lowrank", noise_rank=4,
        population_size=8, batch_size=12, num_iterations=8, sigma=0.05, alpha=0.03, max_new_tokens=16,
        gen_batch_size=96, experiment_dir=str(tmp_path / "runs"), eval_max_prompts=8, save_every=4,
        device="cpu", dtype="fp32", lambda_adapt=True, lambda_lr=0.05,
    )  # fmt: skip
    return ESConfig(**{**base, **overrides})


def test_low_rank_es_improves_the_toy_objective_and_refuses_a_resume_in_full_mode(
    toy_models, scorer, tmp_path
):
    cfg = lowrank_config(toy_models, scorer, tmp_path)
    results = run_es(cfg)
    before, after = results["before"], results["after"]
    assert after["R_mean"] > before["R_mean"] and after["C_mean"] < before["C_mean"]
    assert (
        after["R_mean"] - after["C_mean"] > before["R_mean"] - before["C_mean"] + 1.0
    )  # the objective, λ ≈ 1
    run_dir = next((tmp_path / "runs").iterdir())
    entries = ReplayLog(run_dir / "replay.jsonl").read()
    assert [e.noise for e in entries] == [LOWRANK.id] * 8
    assert load_latest(run_dir)[1]["noise"] == LOWRANK.id
    # the log rebuilds the final weights from the base model, bit for bit
    fresh = TransformersEngine(str(toy_models / "policy"), dtype="fp32")
    replay_updates(fresh, entries)
    final = torch.load(run_dir / "model_saves" / "final_model_iteration_8" / "pytorch_model.pth")
    assert all(torch.equal(final[k], v) for k, v in fresh.state_dict().items())
    for other in (dict(noise="full"), dict(noise_rank=8)):
        again = lowrank_config(toy_models, scorer, tmp_path, num_iterations=9, **other)
        trainer = ESTrainer(again, build_executor(again), ScorerClient(scorer.url), TOY_TRAIN_PROMPTS,
                            TOY_EVAL_PROMPTS[:4], run_dir)  # fmt: skip
        with pytest.raises(NoiseMismatchError, match="Resume with --noise lowrank --noise_rank 4"):
            trainer.restore_progress()


def test_ray_engines_sharing_the_population_match_one_local_engine(
    toy_models, exact_scorer, tmp_path, monkeypatch
):
    """Low-rank shares (members 0-3 on one actor, 4-7 on the other) reach the one engine's weights."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the 1-CPU actors: matmuls blocked alike, answers bit-equal
    try:
        local = lowrank_config(toy_models, exact_scorer, tmp_path / "local", num_iterations=2)
        remote = lowrank_config(toy_models, exact_scorer, tmp_path / "ray", num_iterations=2, executor="ray",
                                num_engines=2)  # fmt: skip
        run_es(local)
        run_es(remote)
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
    a, b = (torch.load(next((tmp_path / d / "runs").iterdir()) / "model_saves" / "final_model_iteration_2"
                       / "pytorch_model.pth") for d in ("local", "ray"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
