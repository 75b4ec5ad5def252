"""GPU memory of one ES engine: how much of the card vLLM may take once the ES copies are counted.

vLLM sizes its KV cache at start to fill ``gpu_memory_utilization`` of the card with its weights,
activations and cache. ES then allocates the exact (master) weights beside vLLM's live weights,
outside that accounting. So the share vLLM is given must leave room for them:

    vllm_share = budget − (master on the GPU + ES temporaries) / total

Per parameter (7B Llama: 6.74e9 parameters): live bf16 weights 2 bytes (inside vLLM's share), fp32
master 4 bytes (on the GPU with ``keep_base_on: gpu``, in host memory with ``cpu``), or 2 bytes
with ``master_dtype: model`` (the update is then rounded to bf16 every iteration). The README's "ES
training" section tabulates the plan for 80, 48 and 40 GB cards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GiB = 1024**3
KeepOn = Literal["gpu", "cpu"]
LORA_SLOT_SHARE = 0.05  # low-rank ES: at most this share of the card for vLLM's adapter slots


@dataclass(frozen=True)
class EngineMemoryPlan:
    """Bytes on one GPU (and in host memory) for one ES vLLM engine; see :func:`plan_engine_memory`."""

    total_bytes: int
    num_params: int
    live_bytes: int  # vLLM's weights (counted inside its share)
    master_gpu_bytes: int  # ES exact weights on the GPU (0 with keep_base_on: cpu)
    master_host_bytes: int  # ES exact weights in host memory (keep_base_on: cpu)
    transient_bytes: int  # ES temporaries while perturbing/updating one chunk
    activation_reserve_bytes: int  # assumed for vLLM's activations (vLLM measures its own)
    vllm_gpu_memory_utilization: float  # what vLLM is given
    kv_cache_bytes: int  # what is left for vLLM's KV cache (estimate)

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
        return (
            f"{self.num_params / 1e9:.2f}B parameters on a {g(self.total_bytes)} GPU: live weights "
            f"{g(self.live_bytes)}, ES master {g(self.master_gpu_bytes)} on the GPU and "
            f"{g(self.master_host_bytes)} in host memory, temporaries {g(self.transient_bytes)}; vLLM gets "
            f"gpu_memory_utilization={self.vllm_gpu_memory_utilization:.3f}, leaving ~{g(self.kv_cache_bytes)} "
            "for its KV cache"
        )


def master_bytes_per_param(master_dtype: str, live_bytes_per_param: int) -> int:
    """4 for an fp32 master; the live dtype's size for ``model``."""
    if master_dtype == "fp32":
        return 4
    if master_dtype == "model":
        return live_bytes_per_param
    raise ValueError(f"unknown master_dtype {master_dtype!r}; use fp32 or model")


def plan_engine_memory(
    num_params: int,
    total_bytes: int,
    budget_fraction: float,
    live_bytes_per_param: int = 2,
    master_bytes: int = 4,
    keep_base_on: KeepOn = "gpu",
    activation_reserve_bytes: int = 2 * GiB,
    transient_bytes: int = GiB // 2,
    min_kv_cache_bytes: int = GiB,
) -> EngineMemoryPlan:
    """The share of the card to give vLLM so that vLLM and the ES copies together use ``budget_fraction``.

    ``master_bytes``: bytes per parameter of the exact weights (:func:`master_bytes_per_param`);
    ``transient_bytes``: ES temporaries (a few fp32 chunks of 2²² elements, plus the eager noise
    kernel's int64 intermediates). Raises ``ValueError``, naming what to change, when the KV cache
    would get less than ``min_kv_cache_bytes``.
    """
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {budget_fraction}")
    if keep_base_on not in ("gpu", "cpu"):
        raise ValueError(f"keep_base_on must be gpu or cpu, got {keep_base_on!r}")
    live = num_params * live_bytes_per_param
    master = num_params * master_bytes
    master_gpu = master if keep_base_on == "gpu" else 0
    share_bytes = budget_fraction * total_bytes - master_gpu - transient_bytes
    kv = int(share_bytes - live - activation_reserve_bytes)
    plan = EngineMemoryPlan(
        total_bytes=total_bytes, num_params=num_params, live_bytes=live, master_gpu_bytes=master_gpu,
        master_host_bytes=master - master_gpu, transient_bytes=transient_bytes,
        activation_reserve_bytes=activation_reserve_bytes,
        vllm_gpu_memory_utilization=max(share_bytes, 0) / total_bytes, kv_cache_bytes=kv,
    )  # fmt: skip
    if kv < min_kv_cache_bytes:
        hint = "keep_base_on: cpu, " if keep_base_on == "gpu" else ""
        raise ValueError(
            f"not enough GPU memory for this ES engine: {plan.describe()}. Use {hint}master_dtype: model, "
            "a larger vllm_gpu_memory_utilization, or a larger GPU"
        )
    return plan


def count_parameters(model_path: str) -> int:
    """Parameters of a causal LM from its config alone (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def lora_bytes_per_member(model_path: str, rank: int, dtype_bytes: int = 2) -> int:
    """Bytes of one low-rank member's adapter as vLLM stores it: for every target matrix (out × in)
    a (slot rank × in) and an (out × slot rank) factor, the slot rank being ``rank`` rounded up to
    a rank vLLM accepts (:func:`alignment.es.lowrank.vllm_lora_rank`; 4 → 8). From the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignment.es.lowrank import is_target, vllm_lora_rank

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sides = sum(sum(p.shape) for n, p in model.named_parameters() if is_target(n, tuple(p.shape)))
    return vllm_lora_rank(rank) * sides * dtype_bytes


def plan_max_loras(members: int, bytes_per_member: int, budget_bytes: int) -> int:
    """vLLM's ``max_loras`` (adapters served in one batch step): every member of the engine's share
    when their slots fit ``budget_bytes``, else as many as fit (at least 1; vLLM then schedules the
    population in turns within the same batched call)."""
    if members < 1 or bytes_per_member < 1:
        raise ValueError(f"need members >= 1 and bytes_per_member >= 1, got {members}, {bytes_per_member}")
    return max(1, min(members, budget_bytes // bytes_per_member))
