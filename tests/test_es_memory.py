"""GPU memory plan of an ES vLLM engine: the share vLLM gets once the ES master is counted (pure arithmetic)."""

from __future__ import annotations

import pytest

from alignment.es.memory import GiB, count_parameters, master_bytes_per_param, plan_engine_memory

LLAMA_7B = 6_738_415_616  # parameters of LLaMA-7B / Alpaca-7B
RESERVES = 2 * GiB + GiB // 2  # assumed activations + ES temporaries


def plan(total_gib: int, keep: str, master: str = "fp32", budget: float = 0.8):
    return plan_engine_memory(LLAMA_7B, total_gib * GiB, budget, live_bytes_per_param=2,
                              master_bytes=master_bytes_per_param(master, 2), keep_base_on=keep)  # fmt: skip


def test_bytes_per_parameter():
    assert master_bytes_per_param("fp32", 2) == 4
    assert master_bytes_per_param("model", 2) == 2
    assert master_bytes_per_param("model", 4) == 4
    with pytest.raises(ValueError, match="master_dtype"):
        master_bytes_per_param("fp16", 2)


def test_80gb_card_with_the_master_on_the_gpu():
    p = plan(80, "gpu")
    assert p.live_bytes == 2 * LLAMA_7B and p.master_gpu_bytes == 4 * LLAMA_7B and p.master_host_bytes == 0
    # vLLM gets 0.8 of the card minus the 25.1 GiB master and 0.5 GiB of temporaries
    expected = (0.8 * 80 * GiB - 4 * LLAMA_7B - GiB / 2) / (80 * GiB)
    assert p.vllm_gpu_memory_utilization == pytest.approx(expected)
    assert p.vllm_gpu_memory_utilization == pytest.approx(0.480, abs=1e-3)
    assert p.kv_cache_bytes / GiB == pytest.approx(0.8 * 80 - 6 * LLAMA_7B / GiB - RESERVES / GiB, abs=1e-6)
    assert 23 < p.kv_cache_bytes / GiB < 24


def test_master_on_the_cpu_frees_the_gpu():
    p = plan(80, "cpu")
    assert p.master_gpu_bytes == 0 and p.master_host_bytes == 4 * LLAMA_7B
    assert p.vllm_gpu_memory_utilization == pytest.approx(0.8 - 0.5 / 80)
    assert 48 < p.kv_cache_bytes / GiB < 49


@pytest.mark.parametrize("total", [40, 48])
def test_40_and_48gb_cards_need_the_master_off_the_gpu(total):
    with pytest.raises(ValueError, match="keep_base_on: cpu"):
        plan(total, "gpu")
    p = plan(total, "cpu")
    assert p.kv_cache_bytes == pytest.approx(0.8 * total * GiB - 2 * LLAMA_7B - RESERVES, abs=1)
    assert p.kv_cache_bytes > 16 * GiB


def test_model_dtype_master_is_the_old_two_byte_copy():
    p = plan(40, "gpu", master="model")
    assert p.master_gpu_bytes == 2 * LLAMA_7B
    assert 4 < p.kv_cache_bytes / GiB < 5


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        plan(80, "gpu", budget=1.5)
    with pytest.raises(ValueError, match="keep_base_on"):
        plan(80, "disk")


def test_parameters_are_counted_from_the_config_alone(toy_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_models / "policy")
    assert count_parameters(str(toy_models / "policy")) == sum(p.numel() for p in model.parameters())


def test_low_rank_adapter_bytes_and_slots(toy_models):
    from alignment.es.memory import lora_bytes_per_member, plan_max_loras

    # the toy: q/k/v/o 64 x 64, gate/up 128 x 64, down 64 x 128, 2 layers
    hidden, inter, layers = 64, 128, 2
    sides = layers * (4 * (hidden + hidden) + 3 * (hidden + inter))
    # rank 4 sits in vLLM's rank-8 slots; fp32 here
    assert lora_bytes_per_member(str(toy_models / "policy"), 4, 4) == 8 * sides * 4
    # 7B Llama, bf16: 32 layers x (4 x 8192 + 3 x 15104) sides x 8 x 2 bytes = 38.1 MiB per member
    assert plan_max_loras(30, 40_000_000, int(0.05 * 80 * GiB)) == 30
    assert plan_max_loras(30, 40_000_000, 400_000_000) == 10 and plan_max_loras(30, 10**12, 1) == 1
