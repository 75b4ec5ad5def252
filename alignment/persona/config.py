"""The persona run's options: LAPDOG's flags and the GRPO quick-start's, typed and checked.

Loaded by :mod:`alignment.config` from defaults < a YAML recipe (``--config``) < command-line
flags (``--name X``, ``--use_grpo``, ``--no_shuffle``); an unknown key or a flag that would do
nothing in this run (a GRPO setting without ``use_grpo``, say) is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.config import field_help as _help
from alignment.config import load_config
from alignment.persona.reward import RewardWeights
from alignment.persona.rl import GRPOSettings


@dataclass
class PersonaConfig:
    # run
    name: str = field(
        default="experiment_name", metadata=_help("run name: checkpoints in checkpoint_dir/name")
    )
    checkpoint_dir: str = field(default="logs/persona", metadata=_help("runs go to checkpoint_dir/name"))
    model_path: str | None = field(
        default=None, metadata=_help("checkpoint folder (…/checkpoint/step-N or latest) to start from")
    )
    seed: int = 0
    device: str = field(default="auto", metadata=_help("auto (cuda if available), cpu, cuda, cuda:1"))
    # models (hub names or local folders)
    reader_model_type: str = field(
        default="google/t5-base-lm-adapt", metadata=_help("T5 reader: local folder or hub name")
    )
    retriever_model_path: str = field(
        default="facebook/contriever",
        metadata=_help(
            "HF encoder: local folder, hub name, or minilm (all-MiniLM-L6-v2, offline: alignment[minilm])"
        ),
    )
    # data
    train_data: str | None = None
    eval_data: str | None = None
    passages: str | None = field(default=None, metadata=_help("passage corpus jsonl (id, text, title)"))
    eval_max_examples: int = field(default=0, metadata=_help("evaluate on the first N eval rows (0: all)"))
    retriever_from: Literal["all", "persona", "context"] = "all"
    qa_prompt_format: str = "dialog with R's persona: {question} R: <extra_id_0>"
    target_prefix: str = field(
        default="auto",
        metadata=_help("decoder prefix before every target, given not sampled: '<extra_id_0>' as LAPDOG trains, "
                       "'' none; auto: what the start model was trained with (LAPDOG checkpoint: <extra_id_0>)"),
    )  # fmt: skip
    encoder_format: str = "{query} story title: {title} story: {text}"
    retriever_format: str = "{title} {text}"
    text_maxlength: int = 200
    target_maxlength: int = 32
    generation_max_length: int = 32
    n_context: int = field(default=1, metadata=_help("passages the reader reads (FiD)"))
    retriever_n_context: int = field(default=5, metadata=_help("passages retrieved (and distilled over)"))
    # index
    save_index_path: str | None = field(default=None, metadata=_help("index cache (default: run dir/index)"))
    index_mode: Literal["flat", "faiss"] = "flat"
    per_gpu_embedder_batch_size: int = 512
    refresh_index: int = field(default=-1, metadata=_help("re-embed the corpus every N steps (-1: never)"))
    # reward and retriever distillation
    gold_score_mode: Literal["f1rougebleudist"] = "f1rougebleudist"
    reward_f1_weight: float = 1.0
    reward_rouge_weight: float = 1.0
    reward_bleu_weight: float = 1.0
    reward_compat: Literal["ours", "lapdog"] = field(
        default="ours",
        metadata=_help("lapdog: F1 without normalisation and ROUGE-L of the rouge package, as LAPDOG's "
                       "(pip install 'alignment[lapdog]'); BLEU stays ours"),
    )  # fmt: skip
    train_retriever: bool = field(
        default=False, metadata=_help("distil the retriever toward per-passage rewards")
    )
    temperature_gold: float = 0.01
    temperature_score: float = 0.01
    # optimisation
    per_gpu_batch_size: int = 2
    per_gpu_eval_batch_size: int = 16
    total_steps: int = 1000
    warmup_steps: int = 0
    lr: float = 1e-4
    lr_retriever: float = 1e-5
    weight_decay: float = 0.01
    clip: float = field(default=1.0, metadata=_help("gradient norm clipping (0: off)"))
    scheduler: Literal["linear", "cosine", "fixed"] = "cosine"
    shuffle: bool = True
    # RL (without reader_rl_learning the reader is trained by teacher forcing: the SFT stage)
    reader_rl_learning: bool = False
    use_grpo: bool = field(default=False, metadata=_help("GRPO (else REINFORCE) for the RL stage"))
    grpo_group_size: int = 4
    grpo_kl_coeff: float = 0.1
    grpo_inner_epochs: int = field(default=2, metadata=_help("clipped updates per sampled batch"))
    grpo_clip_eps: float = 0.2
    grpo_kl_estimator: Literal["exact", "k1", "k2", "k3"] = "exact"
    grpo_scale_rewards: Literal["group", "batch", "none"] = "group"
    grpo_loss_agg: Literal["token", "sequence"] = "token"
    reinforce_baseline: Literal["none", "batch_mean", "leave_one_out"] = "leave_one_out"
    sampling_temperature: float = 1.0
    sampling_top_p: float = 1.0
    reference_model_path: str | None = field(
        default=None, metadata=_help("frozen KL reference (default: the model the RL run starts from)")
    )
    # logging, evaluation, checkpoints
    log_freq: int = 100
    eval_freq: int = 500
    eval_at_start: bool = field(default=True, metadata=_help("also evaluate before the first step"))
    save_freq: int = 5000
    log_examples: int = field(default=5, metadata=_help("example dialogues written per evaluation"))
    wandb: bool = False
    wandb_project: str | None = "lapdog-persona"

    def __post_init__(self) -> None:
        positive = ("per_gpu_batch_size", "per_gpu_eval_batch_size", "total_steps", "text_maxlength",
                    "target_maxlength", "generation_max_length", "n_context", "retriever_n_context",
                    "grpo_group_size", "grpo_inner_epochs", "log_freq", "eval_freq", "save_freq",
                    "per_gpu_embedder_batch_size")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature_gold", "temperature_score", "sampling_temperature", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.sampling_top_p <= 1:
            raise ValueError(f"sampling_top_p must be in (0, 1], got {self.sampling_top_p}")
        if self.n_context > self.retriever_n_context:
            raise ValueError(
                f"n_context ({self.n_context}) exceeds retriever_n_context ({self.retriever_n_context})"
            )
        if self.grpo_kl_coeff < 0 or self.warmup_steps < 0 or self.clip < 0:
            raise ValueError("grpo_kl_coeff, warmup_steps and clip must be >= 0")
        self.reward_weights()  # checks the weights
        self._check_no_idle_flags()

    def _check_no_idle_flags(self) -> None:
        """A setting that this run would ignore is a mistake in the command, not something to skip."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        grpo_only = [n for n in defaults if n.startswith("grpo_") and getattr(self, n) != defaults[n]]
        if not self.reader_rl_learning:
            rl_only = [n for n in ("use_grpo", "reference_model_path", "reinforce_baseline", "sampling_temperature",
                                   "sampling_top_p") if getattr(self, n) != defaults[n]]  # fmt: skip
            if rl_only or grpo_only:
                raise ValueError(f"{', '.join(rl_only + grpo_only)} only apply with reader_rl_learning")
        elif not self.use_grpo:
            if grpo_only:
                raise ValueError(f"{', '.join(grpo_only)} only apply with use_grpo (REINFORCE is running)")
        elif self.reinforce_baseline != defaults["reinforce_baseline"]:
            raise ValueError("reinforce_baseline does not apply with use_grpo (GRPO uses group advantages)")
        if self.use_grpo and self.grpo_group_size < 2:
            raise ValueError("grpo_group_size must be >= 2 (group advantages need company)")
        if (
            self.reader_rl_learning
            and not self.use_grpo
            and self.reinforce_baseline != "none"
            and self.per_gpu_batch_size < 2
        ):
            raise ValueError(f"reinforce_baseline {self.reinforce_baseline} needs per_gpu_batch_size >= 2")
        if self.refresh_index > 0 and not self.train_retriever:
            raise ValueError("refresh_index only applies with train_retriever (the index never goes stale)")

    def reward_weights(self) -> RewardWeights:
        return RewardWeights(
            self.reward_f1_weight, self.reward_rouge_weight, self.reward_bleu_weight, self.reward_compat
        )

    def grpo_settings(self) -> GRPOSettings:
        return GRPOSettings(
            kl_coeff=self.grpo_kl_coeff, kl_estimator=self.grpo_kl_estimator, clip_eps=self.grpo_clip_eps,
            scale_rewards=self.grpo_scale_rewards, loss_agg=self.grpo_loss_agg,
        )  # fmt: skip

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint_dir) / self.name

    @property
    def index_dir(self) -> Path:
        return Path(self.save_index_path) if self.save_index_path else self.run_dir / "index"

    @property
    def stage(self) -> str:
        if not self.reader_rl_learning:
            return "sft"
        return "grpo" if self.use_grpo else "reinforce"


# Options that may differ when a run is resumed (they do not change what is trained).
RESUME_MUTABLE = frozenset({
    "eval_freq", "log_freq", "save_freq", "log_examples", "wandb", "wandb_project", "eval_max_examples",
    "per_gpu_eval_batch_size", "device", "per_gpu_embedder_batch_size", "eval_at_start",
})  # fmt: skip


def load_persona_config(path: str | Path | None, overrides: list[str] | dict = ()) -> PersonaConfig:
    """The recipe at ``path`` (or the defaults) with overrides; unknown keys fail naming the file."""
    return load_config(PersonaConfig, path, overrides)
