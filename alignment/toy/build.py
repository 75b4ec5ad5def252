"""Build the tiny models into a folder (default ``models/toy``), in seconds on CPU, with no hub.

    python -m alignment.toy.build [--out models/toy] [--force]

Writes::

    tokenizer/        byte-level BPE (Llama ids: <unk>=0, <s>=1, </s>=2; <pad> added last, as in Beaver)
    policy/           LlamaForCausalLM, safetensors
    reward/, cost/    current Beaver layout: LlamaForScore, score_bias, normalizer buffers, safetensors
    reward-v1.0/, cost-v1.0/   v1.0 Beaver layout: LlamaModelForScore, no bias, sharded .bin
    BUILD.json        what was built, with the toy-objective fit of the score models

Shapes are vLLM-CPU friendly (head_dim 32). The reward and cost models are trained to reproduce
:mod:`alignment.toy.objective`, so their scores mean something on toy text.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignment import cli
from alignment.scoring.score_model import LlamaForScore
from alignment.toy.objective import tokenizer_corpus
from alignment.toy.train import fit_policy, fit_score_model
from alignment.toy.writers import write_beaver_current, write_beaver_v1

logger = logging.getLogger(__name__)

BUILD_VERSION = 3  # bump when what is built changes, so stale folders are rebuilt
MIN_FIT_CORR = 0.95


@dataclass(frozen=True)
class ToyShapes:
    hidden_size: int = 64
    num_attention_heads: int = 2  # head_dim 32: vLLM's CPU attention rejects 16
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    vocab_target: int = 448


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the toy corpus: any text encodes (bytes are the fallback)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.add_special_tokens({"pad_token": "<pad>"})  # last id, like Beaver's <pad> = 32000
    return fast


def llama_config(shapes: ToyShapes, tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shapes.hidden_size,
        intermediate_size=shapes.intermediate_size,
        num_hidden_layers=shapes.num_hidden_layers,
        num_attention_heads=shapes.num_attention_heads,
        num_key_value_heads=shapes.num_attention_heads,
        max_position_embeddings=shapes.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _is_current(out: Path) -> bool:
    try:
        return json.loads((out / "BUILD.json").read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build_toy_models(
    out: str | Path = "models/toy",
    force: bool = False,
    seed: int = 0,
    score_train_steps: int = 250,
    policy_train_steps: int = 300,
    shapes: ToyShapes = ToyShapes(),
) -> Path:
    """Build everything into ``out`` (skipped when an up-to-date build is there); returns ``out``."""
    out = Path(out)
    if not force and _is_current(out):
        logger.info("toy models in %s are up to date", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(shapes.vocab_target)
    tokenizer.save_pretrained(out / "tokenizer")

    report = {"version": BUILD_VERSION, "seed": seed, "shapes": asdict(shapes), "score_models": {}}
    policy = LlamaForCausalLM(llama_config(shapes, tokenizer))
    report["policy"] = fit_policy(policy, tokenizer, steps=policy_train_steps, seed=seed)
    logger.info("toy policy: %s", report["policy"])
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.save_pretrained(out / "policy")
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out / "policy")
    tokenizer.padding_side = "right"

    for i, kind in enumerate(("reward", "cost")):
        torch.manual_seed(seed + 1 + i)
        config = llama_config(
            shapes, tokenizer, architectures=["LlamaForScore"], score_dim=1, score_type=kind, score_bias=True
        )
        model = LlamaForScore(config)
        fit = fit_score_model(model, tokenizer, kind, steps=score_train_steps, seed=seed + i)
        report["score_models"][kind] = fit
        if fit["heldout_corr"] < MIN_FIT_CORR:
            raise RuntimeError(f"toy {kind} model did not fit the toy objective: {fit}")
        write_beaver_current(model, tokenizer, out / kind, fit["score_mean"], fit["score_var"])
        write_beaver_v1(model, tokenizer, out / f"{kind}-v1.0")
        logger.info("toy %s model: %s", kind, fit)
    tmp = out / "BUILD.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "BUILD.json")
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="models/toy", help="output folder")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    p.add_argument("--seed", type=int, default=0, help="seed of the models' initialisation and training")
    p.add_argument("--score-train-steps", type=int, default=250, help="training steps per score model")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(build_toy_models(a.out, force=a.force, seed=a.seed, score_train_steps=a.score_train_steps))
    return 0


def console() -> None:
    """The ``alignment-build-toy`` command (pyproject's console script) with the CLI behaviour."""
    cli.run(main)


if __name__ == "__main__":
    cli.run(main)
