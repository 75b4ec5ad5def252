"""Beaver reward and cost models on plain transformers (no ``safe_rlhf`` import).

Two published checkpoint layouts load into :class:`LlamaForScore`:

- v1.0: ``architectures: ["LlamaModelForScore"]``, ``bias: false``, sharded ``.bin`` weights;
- current: ``architectures: ["LlamaForScore"]``, ``score_bias: true``, safetensors, ``normalizer.*``
  buffers with ``normalizer_type`` and ``do_normalize: false``.

Both hold ``model.*`` (a ``LlamaModel``) and ``score_head.weight`` (+ ``score_head.bias``). The score
of a text is the head's output at its last attended token (the "end score"), raw unless the config
sets ``do_normalize``. Any one-label ``AutoModelForSequenceClassification`` also loads, so users can
bring other reward models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaPreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

BEAVER_ARCHITECTURES = ("LlamaForScore", "LlamaModelForScore")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip


class ScoreModelLoadError(RuntimeError):
    """A score-model checkpoint that is missing, incomplete or of an unknown kind."""


def end_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row, for left or right padding.

    attention_mask: (B, L) of 0/1 -> (B,) long.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is attended tokens followed only by padding. (B, L) -> bool."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that start at 0 at each row's first attended token.

    Without them a left-padded row would be read at shifted positions and score differently
    from the same text padded on the right. (B, L) -> (B, L) long.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class ScoreNormalizer(nn.Module):
    """The running statistics Beaver checkpoints carry; applied only when ``do_normalize`` is true."""

    def __init__(self, score_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(score_dim))
        self.register_buffer("var", torch.ones(score_dim))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, scores: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
        return (scores - self.mean) / (self.var.sqrt() + epsilon)


class LlamaForScore(LlamaPreTrainedModel):
    """A ``LlamaModel`` trunk with a linear score head, weight names as in Beaver checkpoints."""

    config_class = LlamaConfig
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        score_dim = int(getattr(config, "score_dim", 1))
        bias = bool(getattr(config, "score_bias", getattr(config, "bias", False)))
        self.model = LlamaModel(config)
        self.score_head = nn.Linear(config.hidden_size, score_dim, bias=bias)
        self.normalizer = ScoreNormalizer(score_dim) if getattr(config, "normalizer_type", None) else None
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) -> end scores (B, score_dim)."""
        # Right padding needs no mask and plain positions 0..L-1: causal attention already hides
        # every later position, padding included, from each attended token, and the score is read
        # at the last attended one. A mask (or positions that repeat, which transformers reads as
        # packed sequences) sends SDPA to a masked kernel: 1.5-2.7x slower per row on CPU, measured.
        if is_right_padded(attention_mask):
            trunk_mask, positions = None, None
        else:
            trunk_mask, positions = attention_mask, position_ids_from_mask(attention_mask)
        hidden = self.model(
            input_ids=input_ids, attention_mask=trunk_mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, L, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        end_hidden = hidden[rows, end_positions(attention_mask)]  # (B, H)
        scores = self.score_head(end_hidden)
        if self.normalizer is not None and getattr(self.config, "do_normalize", False):
            scores = self.normalizer(scores)
        return scores


class _SequenceClassifierScorer(nn.Module):
    """Adapter giving a one-label ``*ForSequenceClassification`` model the same end-score rule.

    Transformers pools at the last token that is not ``pad_token_id``, which is wrong when pad equals
    EOS; when the model has a per-token ``score`` head we read its output at the last attended
    token instead.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self._token_logits: torch.Tensor | None = None
        head = getattr(model, "score", None)
        if isinstance(head, nn.Linear):
            head.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._token_logits = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._token_logits = None
        pooled = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits  # (B, 1)
        token_logits, self._token_logits = self._token_logits, None
        if token_logits is None or token_logits.dim() != 3:
            return pooled
        rows = torch.arange(token_logits.shape[0], device=token_logits.device)
        return token_logits[rows, end_positions(attention_mask).to(token_logits.device)]


@dataclass
class ScoreModel:
    """A loaded reward or cost model with its tokenizer."""

    name: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    kind: str  # "beaver" or "sequence-classification"

    @torch.inference_mode()
    def end_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B,) float32 end scores (first score dimension)."""
        out = self.model(input_ids.to(self.device), attention_mask.to(self.device))
        return out[:, 0].float().cpu()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _read_config(name_or_path: str) -> tuple[Any, dict[str, Any]]:
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ScoreModelLoadError(f"score model directory not found: {name_or_path}")
        if not (path / "config.json").is_file():
            raise ScoreModelLoadError(f"{name_or_path} has no config.json: not a model checkpoint directory")
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ScoreModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    else:
        raw = None
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ScoreModelLoadError(f"cannot read the config of score model {name_or_path!r}: {exc}") from exc
    return config, raw if raw is not None else config.to_dict()


def _check_loading_info(name: str, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if "rotary_emb" not in k)
    mismatched = info.get("mismatched_keys", [])
    problems = []
    if missing:
        problems.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"weights of the wrong shape {list(mismatched)[:8]}")
    if problems:
        raise ScoreModelLoadError(f"score model {name}: " + "; ".join(problems))


def load_score_model(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
) -> ScoreModel:
    """Load a Beaver (either layout) or one-label sequence-classification score model, eval mode."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config, raw = _read_config(name_or_path)
    architectures = list(raw.get("architectures") or [])
    try:
        if any(a in BEAVER_ARCHITECTURES for a in architectures):
            if config.model_type != "llama":
                raise ScoreModelLoadError(
                    f"{name_or_path}: Beaver score models are Llama models, config has model_type "
                    f"{config.model_type!r}"
                )
            model, info = LlamaForScore.from_pretrained(
                name_or_path, config=config, dtype=torch_dtype, output_loading_info=True
            )
            kind = "beaver"
        elif getattr(config, "num_labels", None) == 1 or any(
            "SequenceClassification" in a for a in architectures
        ):
            if config.num_labels != 1:
                raise ScoreModelLoadError(
                    f"{name_or_path}: a sequence-classification score model needs exactly one label, "
                    f"config has num_labels={config.num_labels}"
                )
            base, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, dtype=torch_dtype, output_loading_info=True
            )
            model, kind = _SequenceClassifierScorer(base), "sequence-classification"
        else:
            raise ScoreModelLoadError(
                f"{name_or_path}: architectures {architectures} are neither a Beaver score model "
                f"({', '.join(BEAVER_ARCHITECTURES)}) nor a one-label sequence classifier"
            )
    except ScoreModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ScoreModelLoadError(f"cannot load the weights of score model {name_or_path!r}: {exc}") from exc
    _check_loading_info(name_or_path, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ScoreModelLoadError(
            f"cannot load the tokenizer of score model {name_or_path!r}: {exc}"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise ScoreModelLoadError(f"{name_or_path}: tokenizer has no EOS token; end scores need one")
    model.to(dev).eval()
    logger.info("loaded %s score model %s (%s, %s)", kind, name_or_path, torch_dtype, dev)
    return ScoreModel(name=name_or_path, model=model, tokenizer=tokenizer, device=dev, kind=kind)
