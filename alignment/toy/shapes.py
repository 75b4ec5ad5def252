"""Randomly initialised Llama-1B / Llama-7B shaped policy and score models, from a config alone.

    policy = build_random_policy("1b", "models/doctor", device="cuda")
    score = build_random_score_model("7b", "models/doctor", device="cuda")   # serves as reward and cost

Their outputs are noise, but generating with them, scoring with them and perturbing or training
them costs what the real models cost: the benchmarks and ``python -m alignment.doctor`` measure
the GPU paths on them without the hub. The layers are Llama's (1b: hidden 2048, 16 layers, 32
heads, intermediate 5632; 7b: 4096, 32, 32, 11008); the vocabulary is the toy tokenizer's (a few
hundred tokens, so the 7b shape has 6.48e9 parameters rather than Llama-2-7B's 6.74e9). Weights are
bf16 and initialised directly on ``device``. A folder is reused when it is complete.

The 7b shape is built on a GPU only: on a CPU it needs ~27 GB of memory and many minutes, so
asking for it there is a :class:`~alignment.cli.UserError` rather than a machine that swaps.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.cli import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


SHAPES = {
    "1b": LlamaShape(2048, 16, 32, 5632),
    "7b": LlamaShape(4096, 32, 32, 11008),
}
CPU_SHAPES = ("1b",)  # random shapes that may be built on a CPU


def check_shape(shape: str, device: str) -> LlamaShape:
    """The layers of ``shape``; a UserError for an unknown shape or a 7b on a CPU."""
    if shape not in SHAPES:
        raise UserError(f"unknown model shape {shape!r}; use one of {', '.join(SHAPES)}")
    if not str(device).startswith("cuda") and shape not in CPU_SHAPES:
        raise UserError(
            f"the {shape} shape is built on a GPU only (--device cuda): on a CPU it needs "
            f"~{4 * approx_parameters(shape) / 1e9:.0f} GB of memory; use --policy-shape toy or 1b there"
        )
    return SHAPES[shape]


def approx_parameters(shape: str, vocab: int = 450) -> int:
    """Parameters of the causal LM of ``shape`` with a ``vocab``-token vocabulary (untied head)."""
    s = SHAPES[shape]
    per_layer = 4 * s.hidden * s.hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * per_layer + 2 * vocab * s.hidden + s.hidden


def _config(shape: str, tokenizer, **extra):
    from alignment.toy.build import ToyShapes, llama_config

    s = SHAPES[shape]
    toy = ToyShapes(s.hidden, s.heads, s.layers, s.intermediate, max_position_embeddings=4096)
    return llama_config(toy, tokenizer, **extra)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _materialise(factory, device: str) -> torch.nn.Module:
    """``factory()`` with bf16 weights initialised on ``device`` (never an fp32 copy on the host)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return factory().to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(previous)


def _write(out: Path, save) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_random_policy(shape: str, models_dir: str | Path, device: str = "cpu") -> Path:
    """``models_dir/policy-<shape>``: a random ``LlamaForCausalLM`` of ``shape`` with the toy tokenizer
    (left padding, as the engines use it); needs the toy build in ``models_dir``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    check_shape(shape, device)
    models_dir = Path(models_dir)
    out = models_dir / f"policy-{shape}"
    if _complete(out):
        logger.info("reusing the %s policy in %s", shape, out)
        return out
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tokenizer")
    t0 = time.perf_counter()
    model = _materialise(lambda: LlamaForCausalLM(_config(shape, tokenizer)), device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write(out, save)
    logger.info("built a random %.2fB-parameter %s policy in %s (%.0f s)",
                sum(p.numel() for p in model.parameters()) / 1e9, shape, out, time.perf_counter() - t0)  # fmt: skip
    return out


def build_random_score_model(shape: str, models_dir: str | Path, device: str = "cpu") -> Path:
    """``models_dir/score-<shape>``: a random ``LlamaForScore`` of ``shape`` in the current Beaver layout
    (one checkpoint serves as reward and as cost model); needs the toy build in ``models_dir``."""
    from transformers import AutoTokenizer

    from alignment.scoring.score_model import LlamaForScore
    from alignment.toy.writers import write_beaver_current

    check_shape(shape, device)
    models_dir = Path(models_dir)
    out = models_dir / f"score-{shape}"
    if _complete(out):
        logger.info("reusing the %s score model in %s", shape, out)
        return out
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tokenizer")
    config = _config(shape, tokenizer, architectures=["LlamaForScore"], score_dim=1, score_type="reward",
                     score_bias=True)  # fmt: skip
    t0 = time.perf_counter()
    model = _materialise(lambda: LlamaForScore(config), device)
    _write(out, lambda tmp: write_beaver_current(model, tokenizer, tmp))
    logger.info("built a random %.2fB-parameter %s score model in %s (%.0f s)",
                sum(p.numel() for p in model.parameters()) / 1e9, shape, out, time.perf_counter() - t0)  # fmt: skip
    return out
