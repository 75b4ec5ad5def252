"""Low-rank ES members as vLLM LoRA adapters, built from seeds inside the engine's worker.

A member (seed, sign) is requested as ``LoRARequest(lora_path="es-lowrank://<seed>/<sign>/<σ>/<r>")``:
only those few bytes travel to the engine. :func:`install_seed_adapters` (run in the worker by
``ESWorkerExtension.es_init``) makes the worker's LoRA manager build such an adapter from the seed
instead of reading a folder: the factors of every target matrix
(:func:`alignment.es.lowrank.adapter_factors`, by HF name, on the worker's device) go through vLLM's
own ``LoRAModel.from_lora_tensors``, which packs q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj`` slices like any PEFT adapter. vLLM then caches, slots and evicts the adapters itself
(an evicted one is rebuilt, identically, from its seed). No file is written and no tensor crosses
a process boundary.

Private surface used (vLLM 0.32): the worker's ``model_runner.lora_manager`` is an
``LRUCacheWorkerLoRAManager`` whose ``_load_adapter(lora_request)`` returns the ``LoRAModel``; only
requests with our scheme are taken over, every other one goes to vLLM's loader. A vLLM without that
method is refused at start with a clear error (``tests/test_es_lowrank_vllm.py`` covers it).

:func:`run_members` puts every member's prompts into the engine at once (``LLM.enqueue``: one
batched generation for the whole population, at most ``max_loras`` distinct adapters per step) and
steps the engine itself, so that a member's answers are handed on (to the scorer) the moment its
last prompt finishes instead of after the whole population.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from alignment.es.lowrank import TARGET_MODULES, adapter_pair, factor_table, is_target, vllm_lora_rank

logger = logging.getLogger(__name__)

SCHEME = "es-lowrank://"


def adapter_path(seed: int, sign: float, sigma: float, rank: int) -> str:
    """The request path naming member (seed, sign) at noise scale σ and rank r (σ exactly, as repr)."""
    return f"{SCHEME}{int(seed)}/{float(sign)!r}/{float(sigma)!r}/{int(rank)}"


def parse_adapter_path(path: str) -> tuple[int, float, float, int]:
    """(seed, sign, σ, rank) of an :func:`adapter_path`; ``ValueError`` for anything else."""
    if not path.startswith(SCHEME):
        raise ValueError(f"not an ES adapter path: {path!r}")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 4:
        raise ValueError(f"ES adapter path {path!r} is not {SCHEME}<seed>/<sign>/<sigma>/<rank>")
    seed, sign, sigma, rank = parts
    return int(seed), float(sign), float(sigma), int(rank)


def lora_engine_kwargs(rank: int, max_loras: int, max_cpu_loras: int | None = None) -> dict[str, Any]:
    """``vllm.LLM`` arguments for a low-rank ES engine: adapters on the target layers only, ``max_loras``
    members per batch step, room for ``max_cpu_loras`` built adapters (at least ``max_loras``)."""
    if max_loras < 1:
        raise ValueError(f"max_loras must be >= 1, got {max_loras}")
    return {
        "enable_lora": True,
        "max_lora_rank": vllm_lora_rank(rank),
        "max_loras": max_loras,
        "max_cpu_loras": max(max_loras, max_cpu_loras or max_loras),
        "lora_target_modules": list(TARGET_MODULES),
    }


def build_lora_model(lora_id: int, path: str, views: Mapping[str, torch.Tensor], manager: Any) -> Any:
    """The ``LoRAModel`` of the member named by ``path`` over the HF-named ``views`` (runs in the worker)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    seed, sign, sigma, rank = parse_adapter_path(path)
    lora_config = manager.lora_config
    dtype = lora_config.lora_dtype if isinstance(lora_config.lora_dtype, torch.dtype) else None
    targets = {name: view for name, view in views.items() if is_target(name, tuple(view.shape))}
    device = next(iter(targets.values())).device  # the worker's device: a GPU draws its own factors
    table = factor_table([seed], {name: tuple(view.shape) for name, view in targets.items()}, rank, device)
    tensors: dict[str, torch.Tensor] = {}
    for name, view in targets.items():
        lora_a, lora_b = adapter_pair(*table[(seed, name)], sign, sigma, rank, dtype or view.dtype)
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.to("cpu")
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.to("cpu")
    helper = PEFTHelper.from_dict({"r": rank, "lora_alpha": rank, "target_modules": list(TARGET_MODULES)})
    helper.validate_legal(lora_config)  # e.g. a rank above the engine's max_lora_rank
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return LoRAModel.from_lora_tensors(
        lora_id, tensors, helper, device="cpu", dtype=dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
    )  # fmt: skip


def install_seed_adapters(model_runner: Any, views: Mapping[str, torch.Tensor]) -> bool:
    """Let the worker's LoRA manager build ``es-lowrank://`` adapters from seeds; False without LoRA."""
    manager = getattr(model_runner, "lora_manager", None)
    if manager is None:
        return False
    original = getattr(manager, "_load_adapter", None)
    if original is None or not hasattr(manager, "_adapter_manager"):
        raise RuntimeError(
            f"this vLLM's {type(manager).__name__} has no _load_adapter/_adapter_manager: low-rank ES "
            "cannot build adapters from seeds here (written for vLLM 0.32)"
        )
    if getattr(original, "_es_seed_adapters", False):
        return True

    def load(lora_request: Any) -> Any:
        if not str(lora_request.lora_path).startswith(SCHEME):
            return original(lora_request)
        return build_lora_model(lora_request.lora_int_id, lora_request.lora_path, views, manager)

    load._es_seed_adapters = True  # type: ignore[attr-defined]
    manager._load_adapter = load
    logger.info("vLLM LoRA manager builds %s adapters from seeds", SCHEME)
    return True


def member_requests(members: Sequence[tuple[int, float]], sigma: float, rank: int, first_id: int) -> list:
    """One ``LoRARequest`` per member; ids (and names) ``first_id, first_id + 1, ...`` are never reused,
    so neither vLLM's adapter cache nor its prefix cache can hand one member another's state."""
    from vllm.lora.request import LoRARequest

    return [
        LoRARequest(f"es-{first_id + k}", first_id + k, adapter_path(seed, sign, sigma, rank))
        for k, (seed, sign) in enumerate(members)
    ]


def run_members(
    llm: Any,
    texts: list[str],
    params: list[Any],
    loras: list[Any],
    groups: int,
    on_group: Callable[[int, list[Any]], None],
) -> None:
    """Generate ``texts`` (``groups`` equal member-major shares) in one batch; ``on_group(k, outputs)``
    with member k's ``RequestOutput``s in prompt order as soon as its last one finishes."""
    per = len(texts) // groups
    ids = llm.enqueue(texts, params, lora_request=loras, use_tqdm=False)
    # enqueue returns vLLM's internal ids ("<external>-<8 random chars>"); outputs carry the external
    # one, which LLM numbers with digits only
    row = {request_id.split("-", 1)[0]: i for i, request_id in enumerate(ids)}
    done: list[list[Any]] = [[None] * per for _ in range(groups)]
    left = [per] * groups
    engine = llm.llm_engine
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished or out.request_id not in row:
                    continue
                k, j = divmod(row.pop(out.request_id), per)
                done[k][j] = out
                left[k] -= 1
                if left[k] == 0:
                    on_group(k, done[k])
    except BaseException:
        if row:
            engine.abort_request(list(row))
        raise
    if row:
        raise RuntimeError(f"vLLM finished without {len(row)} of the population's requests")
