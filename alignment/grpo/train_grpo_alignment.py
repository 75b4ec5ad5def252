"""GRPO alignment on TRL: reward R − λ·C from the scorer service, λ adapted once per optimiser step.

    python alignment/grpo/train_grpo_alignment.py --config alignment/grpo/grpo_alignment.yaml beta=0.05
    accelerate launch --config_file alignment/grpo/accelerate_zero2.yaml \\
        alignment/grpo/train_grpo_alignment.py --config alignment/grpo/grpo_alignment.yaml
    python alignment/grpo/train_grpo_alignment.py --config ... --resume latest   # or a checkpoint dir

``key=value`` arguments override the recipe; any GRPOConfig field may appear in either.
"""

from __future__ import annotations

import argparse
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

from alignment.conversation import STOP_MARKERS, prompt_text
from alignment.data import load_prompts
from alignment.grpo.config import GRPO_KEYS, GRPOAlignmentConfig, load_grpo_config
from alignment.grpo.eval_callback import AlignmentEvalCallback
from alignment.grpo.reward import LagrangeCallback, LagrangeLink, ScorerReward
from alignment.lagrange import LagrangeController
from alignment.scoring.client import ScorerError, ScorerUnavailableError
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


def build_trainer(cfg: GRPOAlignmentConfig, client: Any = None, callbacks: Sequence[Any] = ()) -> GRPORun:
    """The GRPO trainer of the recipe, ready to ``train()``; ``client`` and ``callbacks`` as in :func:`train_grpo`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import TensorBoardCallback

    from alignment.grpo.stopping import TurnMarkerGRPOTrainer, stop_at_turn_markers

    if cfg.wandb and cfg.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    args = grpo_args(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_name, dtype=torch.bfloat16 if args.bf16 else torch.float32
    )
    if not cfg.use_vllm:
        stop_at_turn_markers(model, tokenizer)
    if client is None:
        client = cfg.scorer_client()
    link = LagrangeLink.create(LagrangeController(cfg.lagrange_config()))
    evals = load_prompts(cfg.eval_jsonl, cfg.prompt_key, TOY_EVAL_PROMPTS, cfg.eval_max_prompts)
    eval_cb = AlignmentEvalCallback(client, evals, every=cfg.eval_every, batch_size=cfg.eval_batch_size,
                                    max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length)  # fmt: skip
    trainer = TurnMarkerGRPOTrainer(  # completions end where generation stopped (see stopping.py)
        model=model,
        reward_funcs=[ScorerReward(client, link, prompt_key="raw_prompt")],
        args=args,
        train_dataset=prompt_dataset(load_prompts(cfg.train_jsonl, cfg.prompt_key, TOY_TRAIN_PROMPTS)),
        processing_class=tokenizer,
        callbacks=[LagrangeCallback(link.key), eval_cb, *callbacks],
    )
    eval_cb.bind(trainer)
    for callback in trainer.callback_handler.callbacks:
        # TensorBoard into <output_dir>/runs, per trainer: a process-wide TENSORBOARD_LOGGING_DIR would
        # send a second run in the same process to the first one's folder (one the user set is kept)
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(cfg.output_dir) / "runs")
    return GRPORun(trainer, link, eval_cb, tokenizer)


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
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(cfg.output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {cfg.output_dir}")
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
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="λ keys: cost_threshold_d=d gives J_C = mean(C) + d, i.e. the constraint E[C] <= -d\n"
        "(d = -0.1: E[C] <= 0.1); lambda_rule=ema_log|ppo_lag; episode_cost_window_size,\n"
        "lambda_update_delay_steps (see alignment/lagrange.py).",
    )
    p.add_argument("--config", help="recipe YAML (alignment/grpo/grpo_alignment.yaml)")
    p.add_argument("--resume", help="checkpoint folder, or 'latest' for the newest in output_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = load_grpo_config(a.config, a.overrides)
    result = train_grpo(cfg, resume=a.resume)
    if result["eval"]:
        first, last = result["eval"][0], result["eval"][-1]
        logger.info("greedy eval: reward %.3f -> %.3f, cost %.3f -> %.3f, safe %.1f%% -> %.1f%%",
                    first["R_mean"], last["R_mean"], first["C_mean"], last["C_mean"],
                    first["safe_ratio"], last["safe_ratio"])  # fmt: skip
    logger.info("final model in %s", result["final_model"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
