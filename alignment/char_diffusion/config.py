"""Typed configs of the three trainers, loaded by :mod:`alignment.config` (YAML + ``--flag`` overrides;
unknown keys are errors). Names follow nanoGPT and the GRPO seed (``group_size``, ``kl_beta``,
``generator_checkpoint``, ``judge_checkpoint``, ``out_dir``, ``save_interval``, ``wandb_log``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignment.char_diffusion.masking import Strategy
from alignment.char_diffusion.model import JudgeHead
from alignment.config import field_help as _help
from alignment.pg.advantages import Baseline, Scale
from alignment.pg.kl import KLEstimator


@dataclass
class RunConfig:
    """What every trainer shares: data, masking, optimisation, logging, checkpoints, system."""

    dataset: str = field(
        default="models/char_diffusion/gpu/data", metadata=_help("folder written by prepare")
    )
    out_dir: str = "models/char_diffusion/gpu/generator"
    # masking (see alignment/char_diffusion/masking.py)
    mask_strategy: Strategy = "random"
    mask_min: float = field(default=0.15, metadata=_help("per-row masked fraction drawn from [min, max]"))
    mask_max: float = 0.15
    span_mean: float = 4.0
    sticky_p: float = 0.5
    # optimisation: AdamW, linear warmup then cosine decay to min_lr
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = field(default=None, metadata=_help("cosine length (default max_iters)"))
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = field(default=1.0, metadata=_help("max gradient norm (0: no clipping)"))
    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 250
    eval_iters: int = 10
    save_interval: int = 250
    wandb_log: bool = False
    wandb_project: str = "char-diffusion"
    wandb_run_name: str | None = None
    # system
    seed: int = 1337
    device: str = field(default="auto", metadata=_help("auto (cuda if available), cpu, cuda, cuda:N"))
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata=_help("autocast dtype: auto = bfloat16 on GPU, float32 on CPU")
    )
    backend: str = field(default="auto", metadata=_help("DDP backend: auto = nccl on GPU, gloo on CPU"))

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "log_interval",
                     "eval_interval", "eval_iters", "save_interval"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mask_min <= self.mask_max <= 1.0:
            raise ValueError(f"need 0 <= mask_min <= mask_max <= 1, got {self.mask_min}, {self.mask_max}")
        if self.warmup_iters < 0 or self.min_lr < 0 or self.learning_rate <= 0 or self.grad_clip < 0:
            raise ValueError("warmup_iters, min_lr, grad_clip must be >= 0 and learning_rate > 0")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters


@dataclass
class ModelShape:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


@dataclass
class PretrainConfig(ModelShape, RunConfig):
    """``python -m alignment.char_diffusion.train``: the generator, masked-token loss."""

    mask_min: float = 0.05
    mask_max: float = 0.6


@dataclass
class JudgeConfig(ModelShape, RunConfig):
    """``python -m alignment.char_diffusion.train_judge``: predict the fraction of characters the
    generator's own fills changed."""

    out_dir: str = "models/char_diffusion/gpu/judge"
    generator_checkpoint: str = field(
        default="models/char_diffusion/gpu/generator/ckpt.pt", metadata=_help("frozen filler")
    )
    init_from_generator: bool = field(
        default=True,
        metadata=_help("start the judge's body from the generator's (its shape is then the generator's)"),
    )
    mask_min: float = 0.0
    mask_max: float = 0.5
    fills_per_block: int = field(
        default=4, metadata=_help("fills of each masked block (rows = batch_size × this)")
    )
    judge_head: JudgeHead = field(
        default="cls",
        metadata=_help(
            "cls: one logit at [CLS] for the corrupted fraction (the seed's); tokens: one per "
            "character, was it replaced (ELECTRA), the fraction is their mean"
        ),  # fmt: skip
    )
    temperature: float = 0.8
    top_p: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class GRPOConfig(RunConfig):
    """``python -m alignment.char_diffusion.train_grpo``: the seed's defaults."""

    out_dir: str = "models/char_diffusion/gpu/grpo"
    generator_checkpoint: str = field(
        default="models/char_diffusion/gpu/generator/ckpt.pt", metadata=_help("policy θ₀ and π_ref")
    )
    judge_checkpoint: str = field(
        default="models/char_diffusion/gpu/judge/ckpt.pt", metadata=_help("frozen reward model")
    )
    group_size: int = field(default=8, metadata=_help("fills sampled per masked input (k)"))
    kl_beta: float = field(default=0.1, metadata=_help("weight of the KL penalty to the reference"))
    kl_estimator: KLEstimator = field(
        default="exact",
        metadata=_help(
            "exact: KL(π‖π_ref) per position; k3: TRL's, corrected for top_p (gradient of KL(π_ref‖π))"
        ),
    )
    temperature: float = 0.8
    top_p: float = 0.95
    advantage_scale: Scale = field(
        default="group",
        metadata=_help(
            "divide by the group's std, the generation batch's (all micro-batches and ranks), or none"
        ),
    )
    advantage_baseline: Baseline = field(
        default="mean", metadata=_help("mean (GRPO) or leave_one_out (RLOO)")
    )
    advantage_eps: float = 1e-4
    num_inner_epochs: int = field(default=1, metadata=_help("updates per batch of fills (clipped ratio)"))
    clip_eps: float = 0.2
    mask_min: float = 0.1
    mask_max: float = 0.3
    batch_size: int = field(default=1, metadata=_help("masked inputs per micro-batch"))
    gradient_accumulation_steps: int = 16
    max_iters: int = 10000
    learning_rate: float = 1e-5
    min_lr: float = 1e-6
    warmup_iters: int = 100
    beta2: float = 0.95
    log_interval: int = 1
    save_interval: int = 100
    sample_interval: int = field(default=0, metadata=_help("readable samples every N iterations (0: off)"))
    eval_interval: int = 100
    eval_iters: int = 4
    eval_batch_size: int = 16
    eval_seed: int | None = field(
        default=None, metadata=_help("seed of the held-out blocks, masks and draws (default: seed)")
    )
    hack_patience: int = field(
        default=2,
        metadata=_help(
            "warn 'judge hacking' after this many evaluations in a row with the reward above and the "
            "fill accuracy below the most accurate evaluation so far (0: never)"
        ),
    )
    hack_tolerance: float = field(
        default=0.005, metadata=_help("how far below the best fill accuracy counts as fallen")
    )
    judge_min_agreement: float = field(
        default=0.55,
        metadata=_help(
            "warn at the first evaluation when the judge orders the fills of a block as their "
            "accuracy does less often than this (0.5 = chance: GRPO can only game it)"
        ),  # fmt: skip
    )
    wandb_project: str = "grpo"
    wandb_run_name: str | None = "grpo_run"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        if (
            self.num_inner_epochs < 1
            or self.eval_batch_size < 1
            or self.sample_interval < 0
            or self.hack_patience < 0
            or self.hack_tolerance < 0
        ):
            raise ValueError(
                "num_inner_epochs and eval_batch_size must be >= 1; sample_interval, hack_patience and "
                "hack_tolerance >= 0"
            )
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.kl_beta < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1, kl_beta >= 0")
