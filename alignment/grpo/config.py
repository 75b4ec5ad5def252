"""The GRPO recipe: the keys users know from ``grpo_alignment.yaml``, typed, plus any GRPOConfig field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from alignment.config import field_help, load_config
from alignment.lagrange import LagrangeRecipe
from alignment.scoring.recipe import ScorerRecipe


def grpo_config_fields() -> frozenset[str]:
    """Every field of TRL's GRPOConfig (they may appear at the top level of a recipe)."""
    from trl import GRPOConfig

    return frozenset(f.name for f in dataclasses.fields(GRPOConfig))


@dataclass
class GRPOAlignmentConfig(ScorerRecipe, LagrangeRecipe):
    passes_episode_costs: ClassVar[bool] = True  # LagrangeCallback hands λ every episode's cost

    # model and data
    model_name: str = "models/toy/policy"
    train_jsonl: str | None = None  # None: the toy training prompts
    eval_jsonl: str | None = None  # None: the held-out toy prompts
    prompt_key: str = "prompt"
    eval_max_prompts: int = 256
    output_dir: str = "logs/grpo/run"
    # scorer: the scorer_* fields come from ScorerRecipe (alignment/scoring/recipe.py)
    # adaptive λ: the lambda_* fields come from LagrangeRecipe (alignment/lagrange.py)
    # GRPO (these map onto GRPOConfig fields of the same name)
    num_generations: int = 8
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-6
    max_steps: int = 500
    beta: float = 0.0
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int = 8
    save_steps: int = 50
    loss_type: str = "dapo"
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    # evaluation and logging
    eval_every: int = 50  # greedy evaluation on the eval prompts every N steps (0: only at the end)
    eval_max_new_tokens: int | None = None  # default: max_completion_length
    eval_batch_size: int = 64  # prompts per greedy generate call; the batches are dealt out to the ranks
    best_by: Literal["constrained", "reward", "safe_ratio", "none"] = field(
        default="constrained",
        metadata=field_help("which greedy evaluation's model output_dir/best keeps: constrained (meets "
                            "E[C] <= -d, then highest reward), reward, safe_ratio; none: no best/"),
    )  # fmt: skip
    wandb: bool = False
    wandb_project: str | None = None
    # any other GRPOConfig field, given at the top level of the recipe
    extra: dict[str, Any] = field(default_factory=dict)


GRPO_KEYS = (
    "num_generations", "max_completion_length", "temperature", "top_p", "learning_rate", "max_steps", "beta",
    "gradient_accumulation_steps", "per_device_train_batch_size", "save_steps", "loss_type", "use_vllm",
    "vllm_mode",
)  # fmt: skip


def load_grpo_config(
    path: str | Path | None, overrides: list[str] | dict[str, Any] = ()
) -> GRPOAlignmentConfig:
    """The recipe at ``path`` with ``key=value`` overrides; unknown keys (not ours, not GRPOConfig's) fail."""
    return load_config(GRPOAlignmentConfig, path, overrides, passthrough=grpo_config_fields())
