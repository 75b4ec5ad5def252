"""The ES run configuration: the flags users know from the published scripts, typed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from alignment.config import field_help as _help
from alignment.es.engines import GenerationSettings
from alignment.es.lowrank import NoiseSpec
from alignment.lagrange import LagrangeRecipe
from alignment.scoring.recipe import ScorerRecipe


@dataclass
class ESConfig(ScorerRecipe, LagrangeRecipe):
    # the trainer hands λ every episode's cost (population order), so an episode window works
    passes_episode_costs: ClassVar[bool] = True

    # policy and engines
    policy_model_path: str = field(default="models/toy/policy", metadata=_help("HF folder or hub name of θ₀"))
    backend: Literal["transformers", "vllm"] = "transformers"
    executor: Literal["local", "ray"] = "local"
    num_engines: int = field(default=1, metadata=_help("generation engines (one per GPU)"))
    device: str = field(default="auto", metadata=_help("transformers engines: auto, cpu, cuda"))
    dtype: str = field(default="auto", metadata=_help("auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"))
    ray_address: str | None = field(default=None, metadata=_help("join this Ray cluster (multi-node)"))
    vllm_gpu_memory_utilization: float = field(
        default=0.8,
        metadata=_help("share of each GPU for an engine: vLLM plus the ES master kept on the GPU "
                       "(vLLM is given this minus the master; README, ES training)"),
    )  # fmt: skip
    keep_base_on: Literal["gpu", "cpu"] = field(
        default="gpu", metadata=_help("where the exact (master) weights live: gpu, or cpu to free the GPU")
    )
    master_dtype: Literal["fp32", "model"] = field(
        default="fp32",
        metadata=_help("exact weights in fp32 (no update lost to bf16 rounding) or in the model's dtype"),
    )
    # evolution strategies
    population_size: int = 30
    sigma: float = 0.001
    alpha: float = 0.0005
    num_iterations: int = 500
    batch_size: int = field(default=64, metadata=_help("prompts per iteration"))
    fitness_shaping: Literal["zscore", "rank", "none"] = "zscore"
    noise: Literal["full", "lowrank"] = field(
        default="full",
        metadata=_help("full: every parameter gets N(0, I) noise, member by member; lowrank: EGGROLL "
                       "rank-r noise on the q/k/v/o/gate/up/down matrices, the population in one "
                       "batched call (README, ES training)"),
    )  # fmt: skip
    noise_rank: int = field(default=4, metadata=_help("r of noise: lowrank (E = A·Bᵀ/√r)"))
    max_loras: int = field(
        default=0, metadata=_help("vLLM adapters per batch step with noise: lowrank (0: members per engine)")
    )
    antithetic: bool = False
    seed: int = 0
    # adaptive λ: the lambda_* fields come from LagrangeRecipe (alignment/lagrange.py)
    lambda_cost_source: Literal["population", "unperturbed"] = field(
        default="population",
        metadata=_help("mean cost for λ: the population's (no extra generation) or θ's on the batch"),
    )
    # scorer: the scorer_* fields come from ScorerRecipe (alignment/scoring/recipe.py)
    # data and generation
    train_jsonl: str | None = field(default=None, metadata=_help("prompts jsonl (default: toy prompts)"))
    eval_jsonl: str | None = None
    prompt_key: str = "prompt"
    eval_max_prompts: int = 256
    max_new_tokens: int = 128
    temperature: float = field(default=0.0, metadata=_help("0 = greedy"))
    top_p: float = 1.0
    gen_batch_size: int = 64
    # outputs
    experiment_dir: str = "logs/es"
    run_name: str | None = None
    save_every: int = 10
    checksum_every: int = 5
    wandb: bool = False
    wandb_project: str | None = "es-alignment"

    def __post_init__(self) -> None:
        for name in (
            "population_size",
            "num_iterations",
            "batch_size",
            "num_engines",
            "save_every",
            "checksum_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.antithetic and self.population_size % 2:
            raise ValueError(f"antithetic needs an even population_size, got {self.population_size}")
        if self.max_loras < 0:
            raise ValueError(f"max_loras must be >= 0 (0: members per engine), got {self.max_loras}")
        self.noise_spec()  # a bad noise / noise_rank fails here, naming the field

    def noise_spec(self) -> NoiseSpec:
        return NoiseSpec(self.noise, self.noise_rank)

    def members_per_engine(self) -> int:
        """Low-rank mode splits the population into one contiguous share per engine."""
        return -(-self.population_size // self.num_engines)

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed, batch_size=self.gen_batch_size,
        )  # fmt: skip
