"""Rebuild Alpaca-7B from LLaMA-7B (Hugging Face format) and Stanford's published weight diff.

    python -m alignment.alpaca.recover --base models/llama-7b-hf --diff tatsu-lab/alpaca-7b-wdiff \\
        --output models/alpaca-7b [--expected-sum 50637.1836] [--skip-integrity-check] \\
        [--dtype float32|bfloat16|float16] [--tokenizer diff|base] [--force] [--no-test-generation]

The published procedure (Stanford Alpaca's ``weight_diff.py recover``), redone tensor by tensor:

1. the base gains a ``[PAD]`` token: ``embed_tokens`` and ``lm_head`` get new rows equal to the mean
   of their existing rows (fp32), so both have the diff's 32,001 rows;
2. for every tensor of the diff: recovered = diff + base, in fp32;
3. integrity: the sum of all recovered tensors must equal the published 50637.1836 within 1e-2.
   The published check summed in fp32; here each tensor's sum and the total are float64, which is
   closer to the exact value than either and well inside the tolerance;
4. the result is saved in HF format (safetensors shards + index, the base's config with
   ``vocab_size`` 32001 and ``pad_token_id``, the tokenizer with ``[PAD]``), then loaded back to
   answer one test prompt.

Memory: one diff shard (memory-mapped), one base tensor and one output shard at a time, never two
whole state dicts. The output is written to a hidden sibling folder and renamed at the end, so a
failure (mismatched keys, shapes or sum) never leaves a half model under the output name.

Rotary ``inv_freq`` buffers: 2023 checkpoints store them (zeros in the diff), current transformers
derive them from the config. They are part of the published sum, so they are added (from the base,
or recomputed from the config when the base lacks them) and counted, but not written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from alignment import cli
from alignment.alpaca.checkpoint_io import CheckpointReader, ShardedSafetensorsWriter, resolve_model_dir
from alignment.atomic import replace_dir

logger = logging.getLogger(__name__)

PUBLISHED_SUM = 50637.1836  # weight_diff.py's naive integrity check for Alpaca-7B
PUBLISHED_ATOL = 1e-2
PAD_TOKEN = "[PAD]"
DERIVED_SUFFIX = "rotary_emb.inv_freq"
TEST_PROMPT = "List three technologies that make life easier."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CheckpointMismatchError(cli.InputError):
    """The base and the diff do not hold the same tensors with compatible shapes."""


class IntegrityError(cli.InputError):
    """The recovered weights do not sum to the published value."""


class TokenizerLoadError(cli.UserError, RuntimeError):
    """The chosen folder's tokenizer cannot be loaded (the message says which flag chooses another)."""


@dataclass(frozen=True)
class RecoverConfig:
    """Settings of one recovery; ``base``/``diff`` are local folders or hub repository ids."""

    base: str
    diff: str
    output: str
    expected_sum: float = PUBLISHED_SUM
    atol: float = PUBLISHED_ATOL
    check_integrity: bool = True
    dtype: str = "float32"  # the published procedure's precision; bfloat16 halves the 27 GB on disk
    tokenizer_source: str = "diff"  # the diff ships Alpaca's tokenizer; "base" adds [PAD] to LLaMA's
    max_shard_mb: float = 2048.0  # peak RAM is about three shards
    force: bool = False
    test_generation: bool = True
    test_prompt: str = TEST_PROMPT
    max_new_tokens: int = 64
    device: str = "cpu"


@dataclass(frozen=True)
class KeyPlan:
    """What to do with each diff tensor: ``add`` same-shape, ``grow`` (key -> rows to append to the
    base first), ``derived`` (summed, not written)."""

    add: tuple[str, ...]
    grow: Mapping[str, int] = field(default_factory=dict)
    derived: tuple[str, ...] = ()


@dataclass
class RecoveryResult:
    output_dir: str
    param_sum: float
    num_tensors: int
    shards: list[str]
    vocab_size: int
    pad_token_id: int
    test_answer: str | None = None


def is_embedding_key(key: str) -> bool:
    """Input (``*.embed_tokens.weight``) or output (``lm_head.weight``) embedding: rows = tokens."""
    return key.endswith("embed_tokens.weight") or key == "lm_head.weight"


def plan_recovery(
    base_shapes: Mapping[str, tuple[int, ...]], diff_shapes: Mapping[str, tuple[int, ...]], vocab_rows: int
) -> KeyPlan:
    """Match the diff's tensors to the base's; raises :class:`CheckpointMismatchError` naming every
    missing or extra key and every incompatible shape.

    Embedding tensors must have ``vocab_rows`` rows in the diff and at most that many in the base
    (the difference is filled with mean rows); derived rotary buffers may be absent from the base.
    """
    derived = tuple(k for k in diff_shapes if k.endswith(DERIVED_SUFFIX))
    learned_diff = [k for k in diff_shapes if not k.endswith(DERIVED_SUFFIX)]
    learned_base = {k for k in base_shapes if not k.endswith(DERIVED_SUFFIX)}
    problems = []
    only_diff = sorted(set(learned_diff) - learned_base)
    only_base = sorted(learned_base - set(learned_diff))
    if only_diff:
        problems.append(f"tensors in the diff but not in the base: {only_diff}")
    if only_base:
        problems.append(f"tensors in the base but not in the diff: {only_base}")
    add: list[str] = []
    grow: dict[str, int] = {}
    bad_shapes: list[str] = []
    for key in learned_diff:
        if key not in learned_base:
            continue
        b, d = tuple(base_shapes[key]), tuple(diff_shapes[key])
        if is_embedding_key(key) and len(b) == len(d) == 2:
            if d[0] != vocab_rows or b[0] > d[0] or b[1:] != d[1:]:
                bad_shapes.append(f"{key}: base {b}, diff {d} (expected {vocab_rows} rows = tokenizer size)")
            elif d[0] > b[0]:
                grow[key] = d[0] - b[0]
            else:
                add.append(key)
        elif b != d:
            bad_shapes.append(f"{key}: base {b}, diff {d}")
        else:
            add.append(key)
    for key in derived:
        if key in base_shapes and tuple(base_shapes[key]) != tuple(diff_shapes[key]):
            bad_shapes.append(f"{key}: base {tuple(base_shapes[key])}, diff {tuple(diff_shapes[key])}")
    if bad_shapes:
        problems.append("incompatible shapes: " + "; ".join(bad_shapes))
    if problems:
        raise CheckpointMismatchError("the base and the diff do not match: " + " | ".join(problems))
    return KeyPlan(add=tuple(add), grow=grow, derived=derived)


def append_mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (vocab, hidden) with ``rows`` new rows equal to the mean of the existing ones."""
    mean = weight.mean(dim=0, keepdim=True)
    return torch.cat([weight, mean.expand(rows, -1)], dim=0)


def rotary_inv_freq(config) -> torch.Tensor:
    """The default RoPE ``inv_freq`` buffer (head_dim / 2,), fp32, as LLaMA checkpoints stored it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def check_integrity(total: float, expected: float, atol: float) -> None:
    """Raise :class:`IntegrityError` with both numbers when ``|total - expected| > atol``."""
    if not math.isfinite(total) or abs(total - expected) > atol:
        raise IntegrityError(
            f"integrity check failed: the recovered weights sum to {total:.4f}, expected {expected:.4f} "
            f"(tolerance {atol:g}). Corrupt or incomplete downloads give a different sum, and so does "
            "a base converted differently from the one the diff was made against (another LLaMA "
            "conversion or dtype); check the files, or pass --skip-integrity-check if you trust them."
        )


def load_output_tokenizer(source: str, base_dir: Path, diff_dir: Path):
    """The tokenizer saved with the model: the diff's (Alpaca's) or the base's, with ``[PAD]``."""
    from transformers import AutoTokenizer

    if source not in ("diff", "base"):
        raise ValueError(f"tokenizer source must be 'diff' or 'base', got {source!r}")
    folder = diff_dir if source == "diff" else base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types here; the hint is what matters
        raise TokenizerLoadError(
            f"could not load the {source} tokenizer from {folder}: {exc}. A folder with only "
            "tokenizer.model (as the 2023 diff and older LLaMA conversions) needs the "
            "sentencepiece package (a dependency of this project: pip install -e .); or choose the other folder's tokenizer with --tokenizer."
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _output_dtype(name: str) -> torch.dtype:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise cli.InputError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} (or fp32/bf16/fp16)")
    return DTYPES[name]


def _staging_dir(output: Path) -> Path:
    """A fresh hidden sibling of ``output`` to write into (swapped in by :func:`alignment.atomic.replace_dir`)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _recover_tensors(
    base: CheckpointReader, diff: CheckpointReader, plan: KeyPlan, base_config, writer, dtype: torch.dtype
) -> tuple[float, int]:
    """Stream diff + base into ``writer``; returns (float64 sum of every recovered tensor, count)."""
    total, count = 0.0, 0
    derived, grow = set(plan.derived), dict(plan.grow)
    for key, delta in tqdm(diff.iter_tensors(), total=len(diff.weight_map), desc="recover", unit="tensor"):
        if key in derived and key not in base.weight_map:
            raw = rotary_inv_freq(base_config)
            if tuple(raw.shape) != tuple(delta.shape):
                raise CheckpointMismatchError(
                    f"{key}: diff {tuple(delta.shape)}, recomputed from the base config {tuple(raw.shape)}"
                )
        else:
            raw = base.tensor(key).to(torch.float32)
        if key in grow:
            raw = append_mean_rows(raw, grow[key])
        recovered = delta.to(torch.float32) + raw
        total += float(recovered.sum(dtype=torch.float64))
        count += 1
        if key not in derived:
            writer.add(key, recovered.to(dtype))
    return total, count


def _save_metadata(staging: Path, base_dir: Path, tokenizer, vocab_rows: int, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base_dir)
    config.vocab_size = vocab_rows
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = dtype
    config.save_pretrained(staging)
    if (base_dir / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(base_dir)
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def generate_test_answer(model_dir: str | Path, prompt: str, max_new_tokens: int, device: str = "cpu") -> str:
    """Load the saved model with ``from_pretrained`` and answer ``prompt`` greedily in the template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.conversation import generate_answers

    dtype = torch.float32 if device == "cpu" else "auto"  # half-precision matmuls are slow on CPUs
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return generate_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]


def recover(cfg: RecoverConfig) -> RecoveryResult:
    """Run the whole recovery described in the module docstring; returns where and what was written.

    Raises :class:`CheckpointMismatchError` (keys/shapes), :class:`IntegrityError` (sum),
    ``FileExistsError`` (output exists without ``force``); on any failure nothing is left under
    ``cfg.output``.
    """
    dtype = _output_dtype(cfg.dtype)
    output = Path(cfg.output)
    if output.exists() and not cfg.force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it")
    base_dir, diff_dir = resolve_model_dir(cfg.base, "--base"), resolve_model_dir(cfg.diff, "--diff")
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(base_dir)
    tokenizer = load_output_tokenizer(cfg.tokenizer_source, base_dir, diff_dir)
    vocab_rows = len(tokenizer)
    base, diff = CheckpointReader(base_dir), CheckpointReader(diff_dir)
    plan = plan_recovery(base.shapes(), diff.shapes(), vocab_rows)
    logger.info(
        "base %s, diff %s: %d tensors to add, %s gain mean rows, %d derived buffers",
        base_dir, diff_dir, len(plan.add) + len(plan.grow), dict(plan.grow), len(plan.derived),
    )  # fmt: skip
    staging = _staging_dir(output)
    try:
        writer = ShardedSafetensorsWriter(staging, int(cfg.max_shard_mb * 2**20))
        total, count = _recover_tensors(base, diff, plan, base_config, writer, dtype)
        if cfg.check_integrity:
            check_integrity(total, cfg.expected_sum, cfg.atol)
            logger.info("integrity check passed: sum %.4f (expected %.4f)", total, cfg.expected_sum)
        else:
            logger.warning(
                "integrity check skipped (--skip-integrity-check): the recovered weights sum to %.4f, "
                "the expected value is %.4f",
                total,
                cfg.expected_sum,
            )
        shards = writer.finish()
        _save_metadata(staging, base_dir, tokenizer, vocab_rows, dtype)
        replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        base.close()
        diff.close()
    logger.info("saved %s (%d shards, %s)", output, len(shards), cfg.dtype)
    result = RecoveryResult(str(output), total, count, shards, vocab_rows, tokenizer.pad_token_id)
    if cfg.test_generation:
        result.test_answer = generate_test_answer(output, cfg.test_prompt, cfg.max_new_tokens, cfg.device)
        logger.info("test prompt: %s\ntest answer: %s", cfg.test_prompt, result.test_answer)
    return result


def parse_args(argv: list[str] | None = None) -> RecoverConfig:
    p = cli.parser(__doc__)
    p.add_argument("--base", required=True, help="LLaMA-7B in HF format: folder or hub id")
    p.add_argument("--diff", default="tatsu-lab/alpaca-7b-wdiff", help="weight diff: folder or hub id")
    p.add_argument("--output", default="models/alpaca-7b", help="folder to create (HF format)")
    p.add_argument("--expected-sum", type=float, default=PUBLISHED_SUM, help="published parameter sum")
    p.add_argument("--atol", type=float, default=PUBLISHED_ATOL, help="tolerance of the sum check")
    p.add_argument("--skip-integrity-check", action="store_true", help="log the sum, do not check it")
    p.add_argument("--dtype", default="float32", help="saved precision: float32, bfloat16, float16")
    p.add_argument("--tokenizer", choices=("diff", "base"), default="diff", help="tokenizer to save")
    p.add_argument("--max-shard-mb", type=float, default=2048.0, help="output shard size limit (MiB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-test-generation", action="store_true", help="skip answering the test prompt")
    p.add_argument("--test-prompt", default=TEST_PROMPT, help="the prompt of the test generation")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length of the test answer")
    p.add_argument("--device", default="cpu", help="device for the test generation (cpu, cuda)")
    a = p.parse_args(argv)
    try:
        _output_dtype(a.dtype)  # fail before any loading
    except ValueError as exc:
        p.error(str(exc))
    return RecoverConfig(
        base=a.base,
        diff=a.diff,
        output=a.output,
        expected_sum=a.expected_sum,
        atol=a.atol,
        check_integrity=not a.skip_integrity_check,
        dtype=DTYPE_ALIASES.get(a.dtype, a.dtype),
        tokenizer_source=a.tokenizer,
        max_shard_mb=a.max_shard_mb,
        force=a.force,
        test_generation=not a.no_test_generation,
        test_prompt=a.test_prompt,
        max_new_tokens=a.max_new_tokens,
        device=a.device,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = recover(cfg)
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    cli.run(main)
