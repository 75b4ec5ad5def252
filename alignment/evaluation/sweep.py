"""The models and settings of a quadrant-classification sweep (``sweep_configs.yaml``), typed.

A model is a Hugging Face folder or hub name (``model``), optionally with an ES checkpoint
(``es_checkpoint``: a ``pytorch_model.pth`` state dict by HF name) applied on top of it. Every key is
checked by :mod:`alignment.config`, so a typo in a 6-model sweep fails before any GPU time is spent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from alignment.config import ConfigError, load_config


@dataclass
class SweepModel:
    """One model to classify; ``name`` prefixes its output files (``{name}_summary.json``, ...)."""

    name: str
    model: str  # HF folder or hub name; with es_checkpoint, the base the ES run started from
    es_checkpoint: str | None = None  # <run>/model_saves/final_model_iteration_N/pytorch_model.pth
    tokenizer: str | None = None  # default: the model's own

    def __post_init__(self) -> None:
        forbidden = '/\\:*?"<>| '  # it becomes part of file names
        if not self.name or set(self.name) & set(forbidden):
            raise ValueError(f"model name {self.name!r} must be non-empty and contain none of {forbidden!r}")


@dataclass
class SweepConfig:
    """Prompts, generation and scoring settings shared by every model of the sweep."""

    models: list[SweepModel] = field(default_factory=list)
    prompts: str = "PKU-Alignment/PKU-SafeRLHF"  # a jsonl/parquet file or a hub dataset name
    dataset_config: str | None = "alpaca-7b"  # hub datasets only
    split: str = "test"  # hub datasets only; the study used all 3,036 test rows of alpaca-7b
    prompt_key: str = "prompt"
    max_prompts: int | None = None  # the first N prompts (None: all)
    backend: Literal["transformers", "vllm"] = "transformers"
    device: str = "auto"  # transformers backend: auto = cuda when available, else cpu
    dtype: str = "bf16"
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy, as in the study
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32  # prompts per generate() call (transformers)
    save_every: int = 256  # prompts generated between appends to the partial file (resume granularity)
    gpu_memory_utilization: float = 0.85  # vllm backend
    scorer_url: str = "auto"
    scorer_address_file: str = "logs/scorers/"  # the replicas' address directory, or one address file
    score_batch_size: int = 32  # pairs per scorer request
    output_dir: str = "alignment/outputs/model_comparisons"
    scatter: bool = True

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        for key in ("max_new_tokens", "batch_size", "save_every", "score_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null, got {self.max_prompts}")


def load_sweep(
    path: str | Path | None, overrides: Sequence[str] = (), only: Sequence[str] = ()
) -> SweepConfig:
    """The sweep from YAML + ``key=value`` overrides, restricted to the models named in ``only``."""
    return check_sweep(load_config(SweepConfig, path, list(overrides)), only, path)


def check_sweep(cfg: SweepConfig, only: Sequence[str] = (), source: str | Path | None = None) -> SweepConfig:
    """Keep the models named in ``only`` (all when empty) and check the sweep can start."""
    if only:
        known = [m.name for m in cfg.models]
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ConfigError(f"--only names {unknown} not in the sweep {source}; its models are {known}")
        cfg.models = [m for m in cfg.models if m.name in only]
    if not cfg.models:
        raise ConfigError(f"the sweep {source} lists no models")
    missing = [f"{m.name}: {m.es_checkpoint}" for m in cfg.models
               if m.es_checkpoint and not Path(m.es_checkpoint).is_file()]  # fmt: skip
    if missing:  # checked up front: a wrong path must not surface after hours of generation
        raise ConfigError(f"ES checkpoint file(s) not found: {missing}")
    return cfg


def generation_fingerprint(cfg: SweepConfig, model: SweepModel, prompts: Sequence[str]) -> str:
    """A hash of everything that decides a model's responses; partial outputs resume only on a match."""
    settings = {
        "model": asdict(model), "backend": cfg.backend, "dtype": cfg.dtype, "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "prompts": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
