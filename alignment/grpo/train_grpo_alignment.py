"""GRPO alignment on TRL: reward R − λ·C from the scorer service, λ adapted once per optimiser step.

    python alignment/grpo/train_grpo_alignment.py --config alignment/grpo/grpo_alignment.yaml --beta 0.05
    python alignment/grpo/train_grpo_alignment.py --config alignment/grpo/grpo_alignment.yaml beta=0.05
    accelerate launch --config_file alignment/grpo/accelerate_zero2.yaml \\
        alignment/grpo/train_grpo_alignment.py --config alignment/grpo/grpo_alignment.yaml
    python alignment/grpo/train_grpo_alignment.py --config ... --resume latest   # or a checkpoint dir

``--key value`` (or ``key=value``) overrides the recipe; any GRPOConfig field may appear in either
(``--warmup_steps 0.1``), and a key that is neither ours nor GRPOConfig's is an error naming it.
The run writes ``config.yaml`` (the recipe as run), ``final/`` (the last step) and ``best/`` (the
best greedy evaluation so far, see :mod:`alignment.grpo.best`) into ``output_dir``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python alignment/grpo/train_grpo_alignment.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import yaml

from alignment import cli, hub
from alignment.atomic import write_text
from alignment.config import add_dataclass_args, config_to_dict, overrides_from_flags, parse_overrides
from alignment.conversation import STOP_MARKERS, prompt_text
from alignment.data import load_prompts
from alignment.grpo.best import BEST_DIR, BestCheckpoint
from alignment.grpo.config import GRPO_KEYS, GRPOAlignmentConfig, load_grpo_config
from alignment.grpo.eval_callback import AlignmentEvalCallback
from alignment.grpo.reward import LagrangeCallback, LagrangeLink, ScorerReward
from alignment.lagrange import LagrangeController
from alignment.scoring.client import ScorerError, ScorerRequestError, ScorerUnavailableError
from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS

logger = logging.getLogger("alignment.grpo")


def prompt_dataset(prompts: list[str]):
    """TRL's ``prompt`` column holds the templated text; ``raw_prompt`` is what the scorer scores."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompt_text(p), "raw_prompt": p} for p in prompts])


def grpo_args(cfg: GRPOAlignmentConfig):
    """TRL GRPOConfig from the recipe (CPU-safe defaults when no GPU is present)."""
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {key: getattr(cfg, key) for key in GRPO_KEYS}
    kwargs.update(
        output_dir=cfg.output_dir,
        logging_steps=1,
        report_to=["tensorboard", *(["wandb"] if cfg.wandb else [])],
        restore_callback_states_from_checkpoint=True,  # λ and its EMA resume with the weights
        save_strategy="steps",
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=cuda,
    )
    extra = dict(cfg.extra)
    # the recipe's generation_kwargs add to the turn-marker stop instead of silently dropping it
    stop = {"stop": list(STOP_MARKERS)} if cfg.use_vllm else {"stop_strings": list(STOP_MARKERS)}
    kwargs["generation_kwargs"] = {**stop, **(extra.pop("generation_kwargs", None) or {})}
    kwargs.update(extra)  # recipe fields beat our defaults
    if kwargs.get("mask_truncated_completions"):
        raise ValueError(
            "mask_truncated_completions: TRL counts a completion as finished only when it ends in EOS or pad, "
            "so it would drop every answer that ended at a turn marker from the loss"
        )
    return GRPOConfig(**kwargs)


@dataclass
class GRPORun:
    """A built (not yet trained) GRPO run: the trainer and the pieces the caller reads afterwards."""

    trainer: Any
    link: LagrangeLink
    evaluation: AlignmentEvalCallback
    tokenizer: Any
    best: BestCheckpoint | None = None


def build_trainer(cfg: GRPOAlignmentConfig, client: Any = None, callbacks: Sequence[Any] = ()) -> GRPORun:
    """The GRPO trainer of the recipe, ready to ``train()``; ``client`` and ``callbacks`` as in :func:`train_grpo`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import TensorBoardCallback

    from alignment.grpo.stopping import TurnMarkerGRPOTrainer, stop_at_turn_markers

    if cfg.wandb and cfg.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    args = grpo_args(cfg)
    tokenizer = hub.from_pretrained(AutoTokenizer, cfg.model_name, "--model_name")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = hub.from_pretrained(AutoModelForCausalLM, cfg.model_name, "--model_name",
                                dtype=torch.bfloat16 if args.bf16 else torch.float32)  # fmt: skip
    if not cfg.use_vllm:
        stop_at_turn_markers(model, tokenizer)
    if client is None:
        client = cfg.scorer_client()
    link = LagrangeLink.create(LagrangeController(cfg.lagrange_config()))
    evals = load_prompts(cfg.eval_jsonl, cfg.prompt_key, TOY_EVAL_PROMPTS, cfg.eval_max_prompts)
    eval_cb = AlignmentEvalCallback(client, evals, every=cfg.eval_every, batch_size=cfg.eval_batch_size,
                                    max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length)  # fmt: skip
    best = None if cfg.best_by == "none" else BestCheckpoint(eval_cb, cfg.best_by, cfg.cost_threshold_d)
    trainer = TurnMarkerGRPOTrainer(  # completions end where generation stopped (see stopping.py)
        model=model,
        reward_funcs=[ScorerReward(client, link, prompt_key="raw_prompt")],
        args=args,
        train_dataset=prompt_dataset(load_prompts(cfg.train_jsonl, cfg.prompt_key, TOY_TRAIN_PROMPTS)),
        processing_class=tokenizer,
        callbacks=[LagrangeCallback(link.key), eval_cb, *([best] if best else []), *callbacks],
    )
    eval_cb.bind(trainer)
    if best is not None:
        best.bind(trainer)  # after eval_cb in the list: it sees each evaluation on its step
    for callback in trainer.callback_handler.callbacks:
        # TensorBoard into <output_dir>/runs, per trainer: a process-wide TENSORBOARD_LOGGING_DIR would
        # send a second run in the same process to the first one's folder (one the user set is kept)
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(cfg.output_dir) / "runs")
    return GRPORun(trainer, link, eval_cb, tokenizer, best)


class ScorerStoppedError(ScorerUnavailableError):
    """The scorer stayed unavailable for the retry budget mid-run: the finished steps are saved, and
    the message names the hosts and gives the resume flag."""


def stop_on_scorer_failure(trainer: Any, exc: ScorerError) -> ScorerError:
    """Save the finished optimiser steps (a checkpoint of ``global_step`` unless one exists: weights,
    optimiser, scheduler, RNG and λ) and return the error to raise: for an outage a
    :class:`ScorerStoppedError` saying how to resume, else ``exc`` itself (a rejected request or a
    malformed answer is not fixed by waiting). Every rank calls it: the reward and the evaluation
    stop all ranks together, so the collective save cannot hang."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    step = trainer.state.global_step
    checkpoint = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if step > 0 and not checkpoint.is_dir():
        # the Trainer's own checkpoint writer, as at save_steps (a private method: TRL has no public one)
        trainer._save_checkpoint(trainer.model, trial=None)
    if step == 0:
        resume = "no step had finished: run the same command again once the scorer is back"
    else:
        resume = (f"the {step} finished steps are saved in {checkpoint}; once the scorer is back, add "
                  f"--resume {checkpoint} (or --resume latest) to the same command")  # fmt: skip
    if not isinstance(exc, ScorerUnavailableError):
        logger.error("GRPO stopped on a scorer error in step %d; %s", step + 1, resume)
        return exc
    return ScorerStoppedError(f"{exc}. GRPO stopped in step {step + 1}; {resume}")


def train_grpo(
    cfg: GRPOAlignmentConfig,
    resume: str | None = None,
    client: Any = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run (or resume) GRPO; returns the greedy evaluations, λ's state and the trainer's log history.

    ``client`` (default: a :class:`ScorerClient` from the recipe) is anything with
    ``score(prompts, responses)``; ``callbacks`` are added to the trainer's (benchmarks time steps).
    """
    run = build_trainer(cfg, client, callbacks)
    trainer = run.trainer
    if trainer.is_world_process_zero():  # the recipe as run, for the record and the training-curve legends
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(cfg.output_dir) / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(cfg.output_dir)
        if resume is None:
            raise cli.UserError(f"--resume latest: no checkpoint-* folder in {cfg.output_dir}")
    try:
        trainer.train(resume_from_checkpoint=resume)
    except ScorerError as exc:
        raise stop_on_scorer_failure(trainer, exc) from exc
    final = Path(cfg.output_dir) / "final"
    trainer.save_model(str(final))
    run.tokenizer.save_pretrained(final)
    return {
        "eval": run.evaluation.history,
        "lambda": run.link.controller.state_dict(),
        "log_history": trainer.state.log_history,
        "final_model": str(final),
        "best_model": str(Path(cfg.output_dir) / BEST_DIR) if run.best and run.best.best else None,
        "best_eval": run.best.best if run.best else None,
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[GRPOAlignmentConfig, str | None]:
    """The recipe and ``--resume`` of a command line: defaults < ``--config`` YAML < ``--key value``
    flags < ``key=value`` overrides."""
    p = cli.parser(
        __doc__,
        epilog="λ keys: cost_threshold_d=d gives J_C = mean(C) + d, i.e. the constraint E[C] <= -d\n"
        "(d = -0.1: E[C] <= 0.1); lambda_rule=ema_log|ppo_lag; episode_cost_window_size,\n"
        "lambda_update_delay_steps (see alignment/lagrange.py).",
    )
    p.add_argument("--config", help="recipe YAML, e.g. alignment/grpo/grpo_alignment.yaml (default: none)")
    p.add_argument(
        "--resume", help="checkpoint folder, or 'latest' for the newest in output_dir (default: none)"
    )
    add_dataclass_args(p, GRPOAlignmentConfig, exclude=("extra",))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of recipe keys or GRPOConfig fields (as --key value)")  # fmt: skip
    a = p.parse_intermixed_args(overrides_from_flags(p, list(sys.argv[1:] if argv is None else argv)))
    flags = {k: v for k, v in vars(a).items() if k not in ("config", "resume", "overrides", "debug")}
    return load_grpo_config(a.config, {**flags, **parse_overrides(a.overrides)}), a.resume


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = train_grpo(cfg, resume=resume)
    if result["eval"]:
        first, last = result["eval"][0], result["eval"][-1]
        logger.info("greedy eval: reward %.3f -> %.3f, cost %.3f -> %.3f, safe %.1f%% -> %.1f%%",
                    first["R_mean"], last["R_mean"], first["C_mean"], last["C_mean"],
                    first["safe_ratio"], last["safe_ratio"])  # fmt: skip
    logger.info("final model in %s", result["final_model"])
    if result["best_model"]:
        logger.info("best model (step %d) in %s", result["best_eval"]["step"], result["best_model"])
    return 0


if __name__ == "__main__":
    # an unreachable scorer or a refused token is the user's to fix (start it, or point --scorer_url at it)
    cli.run(main, user_errors=(ScorerUnavailableError, ScorerRequestError))
