"""The supervised training loop shared by pretraining and judge training.

One optimiser step per iteration over ``gradient_accumulation_steps`` micro-batches per rank
(DDP syncs gradients on the last one only), AdamW + warmup/cosine, clipping, metrics to the
project's :class:`~alignment.tracking.Tracker` (TensorBoard + ``metrics.jsonl`` + W&B on request),
evaluation every ``eval_interval`` and an atomic ``out_dir/ckpt.pt`` every ``save_interval``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from alignment import cli
from alignment.char_diffusion import runtime as rt_
from alignment.char_diffusion.checkpoint import (
    CKPT_NAME,
    load_strict,
    read_checkpoint,
    save_checkpoint,
)
from alignment.char_diffusion.config import RunConfig
from alignment.char_diffusion.data import Vocab, check_same_vocab
from alignment.char_diffusion.runtime import Runtime
from alignment.cli import UserError
from alignment.config import add_dataclass_args, config_from_args, config_to_dict
from alignment.distributed import mean_over_ranks, micro_sync, wrap
from alignment.rng import set_rng_state
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)

# (model as called: maybe DDP-wrapped, iteration, slot) -> (loss to minimise, metrics to average)
MicroLoss = Callable[[nn.Module, int, int], tuple[torch.Tensor, dict[str, float]]]
Evaluate = Callable[[nn.Module], dict[str, float]]


def open_tracker(cfg: RunConfig, rt: Runtime) -> Tracker | None:
    """The run's tracker on rank 0 (None elsewhere), logging into ``out_dir``."""
    if not rt.is_main:
        return None
    return Tracker(cfg.out_dir, run_name=cfg.wandb_run_name, config=config_to_dict(cfg), wandb=cfg.wandb_log,
                   wandb_project=cfg.wandb_project)  # fmt: skip


def log_metrics(
    rt: Runtime, tracker: Tracker | None, sums: dict[str, float], lr: float, step: int
) -> dict[str, float]:
    """``sums`` averaged over the ranks, plus ``lr``, logged at ``step`` on rank 0; a collective:
    every rank calls it at the same steps."""
    metrics = {**mean_over_ranks(rt, sums), "lr": lr}
    if tracker is not None:
        tracker.log(metrics, step=step)
    return metrics


def resume_state(path: Path, model: nn.Module, vocab: Vocab, optimizer: torch.optim.Optimizer,
                 scheduler: Any) -> dict[str, Any]:  # fmt: skip
    """Restore model, optimiser, scheduler and RNG states from ``path``; returns the checkpoint."""
    ckpt = read_checkpoint(path, model.args.kind, "--resume checkpoint")
    check_same_vocab(Vocab(tuple(ckpt["vocab"])), str(path), vocab, "the data")
    if ckpt["model_args"] != model.args.to_dict():
        raise UserError(
            f"{path}: model_args {ckpt['model_args']} differ from this run's {model.args.to_dict()}"
        )
    if ckpt["optimizer"] is None or ckpt["scheduler"] is None:
        raise UserError(f"{path} holds no optimizer/scheduler state: it cannot be resumed")
    load_strict(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], str(path))
    logger.info("resumed %s at iteration %d", path, ckpt["iteration"])
    return ckpt


def run_supervised(cfg: RunConfig, rt: Runtime, model: nn.Module, vocab: Vocab, micro_loss: MicroLoss,
                   evaluate: Evaluate | None = None, resume: bool = False,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``model`` (unwrapped, already on ``rt.device``) to ``cfg.max_iters``; returns the last
    logged metrics, evaluation and the checkpoint path."""
    optimizer = rt_.build_optimizer(model, cfg)
    scheduler = rt_.build_scheduler(optimizer, cfg)
    ckpt_path = Path(cfg.out_dir) / CKPT_NAME
    start = resume_state(ckpt_path, model, vocab, optimizer, scheduler)["iteration"] if resume else 0
    ddp = wrap(model, rt)
    tracker = open_tracker(cfg, rt)
    last: dict[str, float] = {}
    evaluation: dict[str, float] = {}
    accum = cfg.gradient_accumulation_steps
    try:
        for it in tqdm(range(start, cfg.max_iters), desc=Path(cfg.out_dir).name, disable=not rt.is_main,
                       initial=start, total=cfg.max_iters):  # fmt: skip
            ddp.train()
            sums: dict[str, float] = {}
            for _, slot, is_last in rt_.slots(rt, accum):
                with micro_sync(ddp, is_last):
                    with rt.autocast():
                        loss, metrics = micro_loss(ddp, it, slot)
                    (loss / accum).backward()
                for k, v in {"loss": float(loss.detach()), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            lr = optimizer.param_groups[0]["lr"]
            sums["grad_norm"] = rt_.optimizer_step(model, optimizer, scheduler, cfg.grad_clip)
            done = it + 1
            final = done == cfg.max_iters
            if done % cfg.log_interval == 0 or final:
                last = log_metrics(rt, tracker, sums, lr, done)
            if evaluate is not None and (done % cfg.eval_interval == 0 or final) and rt.is_main:
                model.eval()
                evaluation = evaluate(model)
                model.train()
                tracker.log({f"val/{k}": v for k, v in evaluation.items()}, step=done)
                logger.info("iter %d: %s", done, " ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
            if (done % cfg.save_interval == 0 or final) and rt.is_main:
                save_checkpoint(ckpt_path, model=model, vocab=vocab, iteration=done, config=config_to_dict(cfg),
                                optimizer=optimizer, scheduler=scheduler, extra=extra)  # fmt: skip
    finally:
        if tracker is not None:
            tracker.close()
    return {"metrics": last, "eval": evaluation, "checkpoint": str(ckpt_path), "iterations": cfg.max_iters}


def run_cli(
    doc: str, cls: type, run: Callable[..., dict[str, Any]], argv: list[str] | None, config_help: str
) -> dict[str, Any]:
    """The shell of the three trainer CLIs: ``--config`` YAML, ``--resume``, one flag per field of
    ``cls``. Bad input raises :class:`alignment.cli.UserError` (a bad config its subclass
    ``ConfigError``); the trainer's ``main`` runs under :func:`alignment.cli.run`, which makes it one
    line on stderr and exit code 2."""
    p = cli.parser(doc)
    p.add_argument("--config", help=config_help)
    p.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt")
    add_dataclass_args(p, cls)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(config_from_args(cls, a, a.config), resume=a.resume)
