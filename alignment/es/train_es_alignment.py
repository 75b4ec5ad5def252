"""Train a policy with evolution strategies against the scorer's reward and cost.

    python -m alignment.es.train_es_alignment --policy_model_path models/alpaca-7b --num_engines 4 \\
        --backend vllm --executor ray --population_size 30 --num_iterations 500 --lambda_adapt
    python -m alignment.es.train_es_alignment --config my_es.yaml --sigma 0.002
    python -m alignment.es.train_es_alignment --config alignment/es/es_toy_lowrank.yaml   # EGGROLL noise
    python -m alignment.es.train_es_alignment --resume logs/es/alignment_20261122_101500

Flags override the YAML file (``--config``), which overrides the defaults in
:class:`alignment.es.config.ESConfig`. The scorer is found through its address file unless
``--scorer_url`` names it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from alignment import cli, hub
from alignment.config import add_dataclass_args, config_from_args
from alignment.data import load_prompts
from alignment.es.config import ESConfig
from alignment.es.executors import LocalExecutor
from alignment.es.trainer import ESTrainer, ScorerFailedError
from alignment.scoring.client import ScorerRequestError, ScorerUnavailableError
from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS

logger = logging.getLogger("alignment.es")


def build_executor(cfg: ESConfig):
    """Engines for ``cfg.backend`` behind ``cfg.executor``."""
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    dtype = ("bf16" if device.startswith("cuda") else "fp32") if cfg.dtype == "auto" else cfg.dtype
    if cfg.executor == "ray":
        from alignment.es.ray_executor import RayExecutor

        return RayExecutor(cfg, device=device, dtype=dtype)
    if cfg.backend == "vllm":
        from alignment.es.engines import VLLMEngine

        engines = [VLLMEngine(cfg.policy_model_path, dtype=dtype, seed=cfg.seed,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                              keep_base_on=cfg.keep_base_on, master_dtype=cfg.master_dtype,
                              lora_rank=cfg.noise_rank if cfg.noise == "lowrank" else None,
                              max_loras=cfg.max_loras or cfg.members_per_engine())]  # fmt: skip
        if cfg.num_engines > 1:
            raise cli.UserError("several vLLM engines need --executor ray (one actor per GPU)")
    else:
        from alignment.es.engines import TransformersEngine

        devices = (
            [f"cuda:{k}" for k in range(cfg.num_engines)] if device == "cuda" else [device] * cfg.num_engines
        )
        engines = [TransformersEngine(cfg.policy_model_path, device=d, dtype=dtype, keep_base_on=cfg.keep_base_on,
                                      master_dtype=cfg.master_dtype) for d in devices]  # fmt: skip
    return LocalExecutor(engines)


def run_es(cfg: ESConfig, resume: str | Path | None = None) -> dict:
    """Run (or resume) ES training; returns the before/after evaluation."""
    if resume is not None:
        run_dir = Path(resume)
    else:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        run_dir = Path(cfg.experiment_dir) / (
            f"alignment_{stamp}" + (f"_{cfg.run_name}" if cfg.run_name else "")
        )
    hub.check_model(cfg.policy_model_path, "--policy_model_path")  # before engines or Ray actors start
    train = load_prompts(cfg.train_jsonl, cfg.prompt_key, TOY_TRAIN_PROMPTS)
    evals = load_prompts(cfg.eval_jsonl, cfg.prompt_key, TOY_EVAL_PROMPTS, cfg.eval_max_prompts)
    client = cfg.scorer_client()
    executor = build_executor(cfg)
    try:
        return ESTrainer(cfg, executor, client, train, evals, run_dir).train()
    finally:
        executor.close()
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", help="YAML file of ESConfig fields (default: none)")
    p.add_argument(
        "--resume",
        help="run directory to resume (its config.yaml is used; flags override it) (default: none)",
    )
    add_dataclass_args(p, ESConfig)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.resume and not args.config:
        if not Path(args.resume).is_dir():
            raise cli.UserError(f"--resume {args.resume}: no such run directory")
        saved = Path(args.resume) / "config.yaml"
        cfg = config_from_args(ESConfig, args, saved if saved.exists() else None)
    else:
        cfg = config_from_args(ESConfig, args, args.config)
    run_es(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    # an unreachable scorer, a refused token, a scorer outage mid-run (checkpoint saved): the user's to fix
    cli.run(main, user_errors=(ScorerUnavailableError, ScorerRequestError, ScorerFailedError))
