"""The vLLM engine: HF-named views of fused weights, and agreement with the transformers engine.

The mapping tests run anywhere. The engine tests need vLLM (on CPU: ``scripts/setup_vllm_env.sh``)
and run in that environment:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 \\
        .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from alignment.es.engines import GenerationSettings, TransformersEngine
from alignment.es.vllm_worker import hf_views, pack_tensors, unpack_tensors
from alignment.es.weights import weights_checksum
from alignment.toy import TOY_EVAL_PROMPTS

GREEDY = GenerationSettings(max_new_tokens=16, temperature=0.0)
PADDED_VOCAB = 512  # vLLM pads the 449-token vocabulary to a multiple of 64
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def fake_vllm_params(hf: dict[str, torch.Tensor], vocab_rows: int) -> dict[str, torch.Tensor]:
    """vLLM's layout of an HF Llama state dict: fused q/k/v and gate/up, vocabulary padded."""
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        prefix, _, _ = name.rpartition(".")
        module, _, short = prefix.rpartition(".")
        if short == "q_proj":
            parts = [hf[f"{module}.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
            fused[f"{module}.qkv_proj.weight"] = torch.cat(parts)
        elif short == "gate_proj":
            fused[f"{module}.gate_up_proj.weight"] = torch.cat([hf[name], hf[f"{module}.up_proj.weight"]])
        elif short in ("k_proj", "v_proj", "up_proj"):
            continue
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            pad = torch.full((vocab_rows - tensor.shape[0], tensor.shape[1]), 7.0)
            fused[name] = torch.cat([tensor, pad])
        else:
            fused[name] = tensor.clone()
    return fused


@pytest.fixture(scope="module")
def hf_policy(toy_models: Path) -> tuple[dict[str, torch.Tensor], AutoConfig]:
    return load_file(toy_models / "policy" / "model.safetensors"), AutoConfig.from_pretrained(
        toy_models / "policy"
    )


def test_hf_views_are_views_of_the_fused_tensors(hf_policy) -> None:
    hf, config = hf_policy
    fused = fake_vllm_params(hf, PADDED_VOCAB)
    assert "model.layers.0.self_attn.qkv_proj.weight" in fused and len(fused) < len(hf)
    views = hf_views(fused, config)
    assert sorted(views) == sorted(hf)
    for name, tensor in hf.items():
        assert views[name].shape == tensor.shape, name
        assert torch.equal(views[name], tensor), name

    # writing through a view changes exactly its rows of the fused tensor
    qkv = fused["model.layers.1.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    views["model.layers.1.self_attn.k_proj.weight"].add_(1.0)
    rows = config.num_key_value_heads * config.head_dim
    q_rows = config.num_attention_heads * config.head_dim
    changed = (qkv != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == list(range(q_rows, q_rows + rows))
    views["model.layers.0.mlp.up_proj.weight"].zero_()
    assert fused["model.layers.0.mlp.gate_up_proj.weight"][config.intermediate_size :].abs().sum() == 0
    views["lm_head.weight"].mul_(2.0)
    assert torch.equal(fused["lm_head.weight"][: config.vocab_size], 2.0 * hf["lm_head.weight"])
    assert (fused["lm_head.weight"][config.vocab_size :] == 7.0).all()  # padding is never touched


def test_hf_views_refuse_wrong_layouts(hf_policy) -> None:
    hf, config = hf_policy
    fused = fake_vllm_params(hf, PADDED_VOCAB)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    with pytest.raises(ValueError, match="rows"):  # e.g. a tensor-parallel shard
        hf_views({**fused, name: fused[name][:-8]}, config)
    with pytest.raises(ValueError, match="empty"):  # a weight moved away by CPU prepacking
        hf_views({**fused, name: torch.empty(0)}, config)
    tied = {k: v for k, v in fused.items() if k != "lm_head.weight"}
    assert "lm_head.weight" not in hf_views(tied, {**config.to_dict(), "tie_word_embeddings": True})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_tensors_round_trip_exactly(dtype: torch.dtype) -> None:
    state = {"a": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype)[::2]}
    packed = pack_tensors(state)
    assert all(isinstance(raw, bytes) for _, _, raw in packed.values())
    back = unpack_tensors({k: list(v) for k, v in packed.items()})  # msgpack turns tuples into lists
    assert all(back[k].dtype == dtype and torch.equal(back[k], state[k]) for k in state)


# --- engine tests (need vLLM) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(toy_models: Path) -> Iterator[tuple[object, TransformersEngine]]:
    """One vLLM engine and one transformers engine on the same fp32 toy policy."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (see scripts/setup_vllm_env.sh)")
    from alignment.es.engines import VLLMEngine

    policy = str(toy_models / "policy")
    with pytest.MonkeyPatch.context() as env:
        # in-process engine core: the tests reach into the worker (the model, its layers)
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm_engine = VLLMEngine(policy, dtype="fp32", seed=0, max_model_len=512, keep_base_on="cpu")
    yield vllm_engine, TransformersEngine(policy, dtype="fp32")
    del vllm_engine


def live_state(engine) -> dict[str, torch.Tensor]:
    return unpack_tensors(engine.llm.collective_rpc("es_state_dict", args=(True,))[0])


def live_checksum(engine) -> str:
    return engine.llm.collective_rpc("es_live_checksum")[0]


def test_names_checksums_and_greedy_output_match_transformers(engines) -> None:
    vllm_engine, hf_engine = engines
    assert sorted(vllm_engine.param_names) == sorted(dict(hf_engine.model.named_parameters()))
    assert vllm_engine.checksum() == hf_engine.checksum()
    out = vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    assert out == hf_engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    assert any(out)  # not trivially empty (the toy policy may end some answers at once)


def test_master_weights_are_kept_where_keep_base_on_says_and_noise_is_checked(engines) -> None:
    from alignment.es.noise import NOISE_ID

    vllm_engine, _ = engines
    assert vllm_engine.noise_id() == NOISE_ID  # the worker's device computed the reference noise
    assert vllm_engine._rpc("es_master_devices") == ["cpu:torch.float32"]
    before = vllm_engine.checksum()
    vllm_engine.perturb(5, sigma=0.1)
    try:  # a copy of its own: perturbing the served weights leaves the master alone
        assert vllm_engine.checksum() == before != live_checksum(vllm_engine)
    finally:
        vllm_engine.restore()
    assert live_checksum(vllm_engine) == before


def test_perturbed_weights_are_bit_identical_to_transformers(engines) -> None:
    vllm_engine, hf_engine = engines
    for engine in engines:
        engine.perturb(seed=123, sigma=0.02, sign=-1.0)
    try:
        ours = live_state(vllm_engine)
        theirs = dict(hf_engine.model.named_parameters())
        assert sorted(ours) == sorted(theirs)
        unequal = [k for k in theirs if not torch.equal(ours[k], theirs[k].detach())]
        assert not unequal
        assert live_checksum(vllm_engine) == weights_checksum(theirs.items())
        assert vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY) == hf_engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    finally:
        for engine in engines:
            engine.restore()


def _add_to_q_proj(worker, scale: float) -> None:
    """Runs inside the vLLM worker: noise into the q rows of layer 0's fused qkv_proj only."""
    view = worker._es_params.params[Q_PROJ]
    gen = torch.Generator().manual_seed(0)
    view.add_(scale * torch.randn(view.shape, generator=gen))


def test_linear_weight_changes_reach_the_output_and_restore_is_exact(engines) -> None:
    """A q_proj-only change alters greedy output: vLLM computes from the live linear weights."""
    vllm_engine, _ = engines
    before_out = vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    before_live = live_checksum(vllm_engine)
    model = vllm_engine.llm.collective_rpc(lambda worker: worker.model_runner.get_model())[0]
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.numel() > 0 and qkv.cpu_linear is torch.nn.functional.linear
    fused_before = qkv.weight.detach().clone()

    vllm_engine.llm.collective_rpc(_add_to_q_proj, args=(0.5,))
    vllm_engine.llm.reset_prefix_cache()
    q_rows = vllm_engine.llm.llm_engine.model_config.hf_config.hidden_size
    assert not torch.equal(qkv.weight[:q_rows], fused_before[:q_rows])
    assert torch.equal(qkv.weight[q_rows:], fused_before[q_rows:])
    assert vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY) != before_out

    vllm_engine.restore()
    assert live_checksum(vllm_engine) == before_live
    assert torch.equal(qkv.weight, fused_before)
    assert vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY) == before_out


def test_perturb_restore_cycles_are_bit_exact(engines) -> None:
    vllm_engine, _ = engines
    before_out = vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    before = (vllm_engine.checksum(), live_checksum(vllm_engine))
    outputs = []
    for seed in range(3):
        vllm_engine.perturb(seed, sigma=0.05)
        assert live_checksum(vllm_engine) != before[1]
        outputs.append(vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY))
        vllm_engine.restore()
        assert (vllm_engine.checksum(), live_checksum(vllm_engine)) == before
    assert any(out != before_out for out in outputs)
    assert vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY) == before_out


def test_apply_update_agrees_with_transformers_and_state_round_trips(engines) -> None:
    vllm_engine, hf_engine = engines
    original = vllm_engine.state_dict()
    assert weights_checksum(original.items()) == hf_engine.checksum()
    seeds, coefficients = [11, 12, 13, 14], [0.7, -0.7, 0.1, -1.3]
    try:
        stats = [engine.apply_update(seeds, coefficients, scale=0.05) for engine in engines]
        # diagnostics are float64 sums whose order may follow each process's thread count: not bit-exact
        assert stats[0] == pytest.approx(stats[1], rel=1e-9) and stats[0]["update/fraction_changed"] > 0.99
        assert vllm_engine.checksum() == hf_engine.checksum() != weights_checksum(original.items())
        assert live_checksum(vllm_engine) == vllm_engine.checksum()
        assert vllm_engine.generate(TOY_EVAL_PROMPTS, GREEDY) == hf_engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    finally:
        for engine in engines:
            engine.load_state_dict(original)
    assert vllm_engine.checksum() == hf_engine.checksum() == weights_checksum(original.items())
    assert live_checksum(vllm_engine) == vllm_engine.checksum()


def test_es_run_on_vllm_engines_through_ray_completes(toy_models, scorer, tmp_path, monkeypatch) -> None:
    """The whole trainer on the real vLLM engine, one engine per Ray actor, against the real scorer."""
    pytest.importorskip("vllm", reason="needs vLLM (scripts/setup_vllm_env.sh on CPU)")
    ray = pytest.importorskip("ray")
    from alignment.es.checkpoint import ReplayLog
    from alignment.es.config import ESConfig
    from alignment.es.train_es_alignment import run_es

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # inherited by the actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ESConfig(
            policy_model_path=str(toy_models / "policy"), backend="vllm", executor="ray", num_engines=2,
            scorer_url=scorer.url, population_size=4, batch_size=6, num_iterations=3, sigma=0.05, alpha=0.03,
            max_new_tokens=12, eval_max_prompts=6, device="cpu", dtype="fp32", checksum_every=1,
            experiment_dir=str(tmp_path / "runs"),
        )  # fmt: skip
        results = run_es(cfg)
    finally:
        ray.shutdown()
    run_dir = next((tmp_path / "runs").iterdir())
    assert [e.iteration for e in ReplayLog(run_dir / "replay.jsonl").read()] == [0, 1, 2]
    assert results["after"]["num_points"] == 6
    assert (run_dir / "model_saves" / "final_model_iteration_3" / "pytorch_model.pth").is_file()


def test_classification_policy_on_vllm_matches_transformers_with_an_es_checkpoint(
    toy_models, tmp_path, monkeypatch
) -> None:
    """The evaluation's vLLM path: an ES ``pytorch_model.pth`` on the base answers as on transformers."""
    pytest.importorskip("vllm", reason="needs vLLM (scripts/setup_vllm_env.sh on CPU)")
    from transformers import AutoModelForCausalLM

    from alignment.es.checkpoint import save_final
    from alignment.evaluation.classify_reward_cost_unified import load_policy
    from alignment.evaluation.sweep import SweepConfig, SweepModel

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    policy = str(toy_models / "policy")
    gen = torch.Generator().manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(policy)
    moved = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for k, p in base.named_parameters()}
    checkpoint = save_final(tmp_path, 1, moved)
    prompts = list(TOY_EVAL_PROMPTS[:6])
    answers = {}
    for name, backend, pth in (("base", "transformers", None), ("tf", "transformers", checkpoint),
                               ("vllm", "vllm", checkpoint)):  # fmt: skip
        spec = SweepModel("M", policy, es_checkpoint=str(pth) if pth else None)
        cfg = SweepConfig(models=[spec], backend=backend, device="cpu", dtype="fp32", max_new_tokens=16)
        generate, release = load_policy(spec, cfg)
        answers[name] = generate(prompts)
        release()
    assert answers["vllm"] == answers["tf"]
    assert answers["tf"] != answers["base"], "the checkpoint did not change the policy"
