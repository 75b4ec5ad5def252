"""GRPO fill-in: fine-tune the generator against the frozen judge.

    python -m alignment.char_diffusion.train_grpo --config alignment/char_diffusion/grpo.yaml \\
        [--group_size=16 --kl_beta=0.2 --learning_rate=5e-6] [--resume]
    torchrun --nproc_per_node 4 -m alignment.char_diffusion.train_grpo --config ...

Per iteration and micro-batch: ``batch_size`` line-aligned blocks masked with ``[MASK]``; one policy
forward per input and ``group_size`` fills sampled from it; judge rewards (1 − predicted corrupted
fraction); group advantages (``advantage_scale: batch``: over every micro-batch of every rank, so
the whole batch is sampled first and each micro-batch re-forwarded for its update); the loss of
:mod:`.grpo`; AdamW, warmup + cosine LR, clipping,
``gradient_accumulation_steps`` micro-batches per step (DDP averages over ranks). The reference is
the frozen ``generator_checkpoint``. Metrics (the seed's names, plus ``lr``, ``zero_spread_fraction``
and ``fill_accuracy``, the share of masked characters filled with the original one) go to
TensorBoard and ``metrics.jsonl`` in ``out_dir`` (W&B with ``--wandb_log``); ``eval/mean_reward`` and
``eval/fill_accuracy`` on fixed held-out blocks every ``eval_interval``; readable samples to
``out_dir/samples.log`` every ``sample_interval``; ``out_dir/ckpt.pt`` every ``save_interval``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from alignment import cli
from alignment.char_diffusion import runtime as rt_
from alignment.char_diffusion.checkpoint import CKPT_NAME, fingerprint, load_model, save_checkpoint
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.data import CharData, check_same_vocab
from alignment.char_diffusion.evaluate import evaluate, format_samples
from alignment.char_diffusion.grpo import Rollout, generation_rewards, grade, grpo_loss, rescore, rollout
from alignment.char_diffusion.loop import log_metrics, open_tracker, resume_state, run_cli
from alignment.char_diffusion.masking import masked_blocks
from alignment.char_diffusion.monitor import BestKeeper, HackingWatch, fill_accuracies, pair_agreement
from alignment.cli import UserError
from alignment.config import config_to_dict
from alignment.distributed import cleanup, micro_sync, wrap

logger = logging.getLogger("alignment.char_diffusion.train_grpo")

SAMPLES_FILE = "samples.log"
BEST_DIR = "best"  # out_dir/best/ckpt.pt: the policy with the best held-out fill accuracy so far


def load_models(cfg: GRPOConfig, data: CharData) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(policy, frozen reference, frozen judge), checked against each other and the data."""
    policy, gen_vocab, _ = load_model(cfg.generator_checkpoint, "generator", "generator_checkpoint")
    judge, judge_vocab, _ = load_model(cfg.judge_checkpoint, "judge", "judge_checkpoint")
    check_same_vocab(gen_vocab, cfg.generator_checkpoint, data.vocab, str(data.meta_path))
    check_same_vocab(judge_vocab, cfg.judge_checkpoint, data.vocab, str(data.meta_path))
    data.check_block_size(policy.args.block_size, cfg.generator_checkpoint)
    data.check_block_size(judge.args.block_size, cfg.judge_checkpoint)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    judge.eval().requires_grad_(False)
    policy.eval()  # no dropout: the distribution that is sampled is the one that is scored
    return policy, reference, judge


def _write_samples(cfg: GRPOConfig, tracker: Any, text: str, step: int) -> None:
    with open(Path(cfg.out_dir) / SAMPLES_FILE, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
    tracker.log_text("samples", f"```\n{text}```", step=step)


def _pair_agreement(rollouts: list[Rollout]) -> float:
    """Does the judge rank this step's fills as their accuracy does? (this rank's micro-batches;
    NaN when no two fills of a block differed in accuracy)"""
    agree, pairs = 0.0, 0
    for ro in rollouts:
        share, n = pair_agreement(ro.rewards, fill_accuracies(ro.draws, ro.tokens, ro.mask))
        agree, pairs = agree + (share * n if n else 0.0), pairs + n
    return agree / pairs if pairs else float("nan")


def backward_rescored(ddp: nn.Module, rt: rt_.Runtime, rollouts: list[Rollout], cfg: GRPOConfig,
                      banned: tuple[int, ...]) -> dict[str, float]:  # fmt: skip
    """One pass over the micro-batches of this rank: a new policy forward on each rollout's inputs
    (on the support it was sampled from), its loss backward (DDP's all-reduce on the last one);
    returns the metrics averaged over the micro-batches. Gradients accumulate: step afterwards."""
    accum, sums = len(rollouts), {}
    for (_, _, is_last), ro in zip(rt_.slots(rt, accum), rollouts, strict=True):
        with micro_sync(ddp, is_last):
            with rt.autocast():
                dist = rescore(ddp, ro, cfg, banned)
            loss, metrics = grpo_loss(dist, ro, cfg)
            (loss / accum).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / accum
    return sums


def train_grpo(cfg: GRPOConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) GRPO; returns the held-out evaluations ``[(iteration, {...})]`` (rank 0), the
    last metrics, the checkpoint path, the trained policy module and the class it ran wrapped in
    (``DistributedDataParallel`` under torchrun)."""
    data = CharData(cfg.dataset)
    policy, reference, judge = load_models(cfg, data)
    rt = rt_.setup_runtime(cfg)
    try:
        return _train(cfg, rt, data, policy, reference, judge, resume)
    finally:
        cleanup(rt)


def _train(cfg: GRPOConfig, rt: rt_.Runtime, data: CharData, policy: nn.Module, reference: nn.Module,
           judge: nn.Module, resume: bool) -> dict[str, Any]:  # fmt: skip
    for m in (policy, reference, judge):
        m.to(rt.device)
    banned = data.vocab.special_ids
    optimizer = rt_.build_optimizer(policy, cfg)
    scheduler = rt_.build_scheduler(optimizer, cfg)
    ckpt_path = Path(cfg.out_dir) / CKPT_NAME
    frozen = {"reference_fingerprint": fingerprint(reference), "judge_fingerprint": fingerprint(judge),
              "generator_checkpoint": cfg.generator_checkpoint, "judge_checkpoint": cfg.judge_checkpoint}  # fmt: skip
    start = 0
    if resume:
        ckpt = resume_state(ckpt_path, policy, data.vocab, optimizer, scheduler)
        for what, source in (("reference", "generator_checkpoint"), ("judge", "judge_checkpoint")):
            if ckpt["extra"].get(f"{what}_fingerprint") != frozen[f"{what}_fingerprint"]:
                raise UserError(f"{ckpt_path}: the {what} model differs from the one this run started with "
                                 f"({source} {frozen[source]} changed?)")  # fmt: skip
        start = ckpt["iteration"]
    watch, best = HackingWatch(cfg.hack_patience, cfg.hack_tolerance), BestKeeper()
    evals: list[tuple[int, dict[str, float]]] = []
    if resume and "watch" in ckpt["extra"]:  # (checkpoints of earlier versions hold no monitor state)
        watch.load_state_dict(ckpt["extra"]["watch"])
        best.load_state_dict(ckpt["extra"]["best"])
        evals = [(int(i), dict(e)) for i, e in ckpt["extra"]["evals"]]
    ddp = wrap(policy, rt)
    tracker = open_tracker(cfg, rt)
    last: dict[str, float] = {}
    accum = cfg.gradient_accumulation_steps
    batch_scale = cfg.advantage_scale == "batch"

    def run_eval(step: int) -> None:
        ev = evaluate(policy, judge, data, cfg, rt)
        evals.append((step, ev))
        warning = watch.update(step, ev["mean_reward"], ev["fill_accuracy"])
        tracker.log({**{f"eval/{k}": v for k, v in ev.items()}, "eval/judge_hacking": int(warning is not None)},
                    step=step)  # fmt: skip
        logger.info("iteration %d held-out: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if warning is not None:
            logger.warning("%s", warning)
            tracker.log_text("judge_hacking", warning, step=step)
        agreement = ev.get("judge_pair_agreement", 1.0)
        if len(evals) == 1 and agreement < cfg.judge_min_agreement:
            text = (f"the judge orders two fills of a held-out block as their accuracy does only {agreement:.3f} "
                    f"of the time (0.5 = chance, judge_min_agreement {cfg.judge_min_agreement}): GRPO's "
                    f"group-relative advantages will follow noise or the judge's blind spots; train a better "
                    f"judge (its validation pair_agreement; docs/char_diffusion.md)")  # fmt: skip
            logger.warning("%s", text)
            tracker.log_text("judge_quality", text, step=step)
        if best.improves(step, ev["fill_accuracy"], ev["mean_reward"]):
            save_checkpoint(Path(cfg.out_dir) / BEST_DIR / CKPT_NAME, model=policy, vocab=data.vocab, iteration=step,
                            config=config_to_dict(cfg), extra={**frozen, "eval": ev})  # fmt: skip

    def state() -> dict[str, Any]:
        return {**frozen, "watch": watch.state_dict(), "best": best.state_dict(), "evals": evals}

    try:
        if start == 0 and rt.is_main:
            run_eval(0)
        for it in tqdm(range(start, cfg.max_iters), desc="grpo", disable=not rt.is_main, initial=start,
                       total=cfg.max_iters):  # fmt: skip
            sums: dict[str, float] = {}
            rollouts: list[Rollout] = []
            for _, slot, is_last in rt_.slots(rt, accum):
                tokens, inp, mask = (t.to(rt.device) for t in masked_blocks(
                    data, "train", cfg.batch_size, cfg, rt_.slot_generator(cfg.seed, it, slot, "data")))  # fmt: skip
                fills_rng = rt_.slot_generator(cfg.seed, it, slot, "fills", rt.device)
                if batch_scale:  # sample and score only: the advantages need the whole generation batch
                    with torch.no_grad(), rt.autocast():
                        ro, _ = rollout(policy, reference, judge, tokens, inp, mask, cfg, banned, fills_rng)
                    rollouts.append(ro)
                    continue
                with micro_sync(ddp, is_last):
                    with rt.autocast():
                        ro, dist = rollout(ddp, reference, judge, tokens, inp, mask, cfg, banned, fills_rng)
                    loss, metrics = grpo_loss(dist, ro, cfg)
                    (loss / accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
                rollouts.append(ro)
            if batch_scale:
                everything = generation_rewards(rt, [ro.rewards for ro in rollouts])
                rollouts = [grade(ro, cfg, everything) for ro in rollouts]
                sums = backward_rescored(ddp, rt, rollouts, cfg, banned)
            lr = optimizer.param_groups[0]["lr"]
            sums["grad_norm"] = rt_.optimizer_step(policy, optimizer, None, cfg.grad_clip)
            sums["judge_pair_agreement"] = _pair_agreement(rollouts)
            for _ in range(1, cfg.num_inner_epochs):  # later updates on the same fills: ratio ≠ 1, clipped
                metrics = backward_rescored(ddp, rt, rollouts, cfg, banned)
                rt_.optimizer_step(policy, optimizer, None, cfg.grad_clip)
                sums.update({k: metrics[k] for k in ("clip_fraction", "ratio_mean")})
            scheduler.step()
            done = it + 1
            final = done == cfg.max_iters
            if done % cfg.log_interval == 0 or final:
                last = log_metrics(rt, tracker, sums, lr, done)
            if not rt.is_main:
                continue
            if cfg.sample_interval and (done % cfg.sample_interval == 0 or final):
                _write_samples(cfg, tracker, format_samples(data.vocab, rollouts[0], done), done)
            if done % cfg.eval_interval == 0 or final:
                run_eval(done)
            if done % cfg.save_interval == 0 or final:
                save_checkpoint(ckpt_path, model=policy, vocab=data.vocab, iteration=done, config=config_to_dict(cfg),
                                optimizer=optimizer, scheduler=scheduler, extra=state())  # fmt: skip
    finally:
        if tracker is not None:
            tracker.close()
    return {"evals": evals, "metrics": last, "checkpoint": str(ckpt_path), "iterations": cfg.max_iters,
            "policy": policy, "wrapper": type(ddp).__name__, "best": best.state_dict(),
            "best_checkpoint": str(Path(cfg.out_dir) / BEST_DIR / CKPT_NAME), "judge_hacking": watch.flagged}  # fmt: skip


def summary_lines(out: dict[str, Any]) -> list[str]:
    """The held-out table of a run (first, best and last evaluation) and, when the judge was gamed,
    a warning: the judge-hacking flags of the run, or a last evaluation whose reward rose while its
    fill accuracy fell below the first one."""
    if not out["evals"]:
        return []
    (s0, e0), (s1, e1) = out["evals"][0], out["evals"][-1]
    rows = [("start", s0, e0)]
    best = out["best"]
    if best["iteration"] not in (s0, s1):
        rows.append(("best", best["iteration"], dict(out["evals"])[best["iteration"]]))
    rows.append(("last", s1, e1))
    lines = [f"{'held-out':8} {'iteration':>9} {'judge reward':>13} {'fill accuracy':>14}"]
    lines += [f"{name:8} {it:9d} {e['mean_reward']:13.4f} {e['fill_accuracy']:14.4f}" for name, it, e in rows]
    if out["judge_hacking"]:
        lines.append(f"WARNING judge hacking: held-out reward rose while fill accuracy fell at iterations "
                     f"{out['judge_hacking']} (see the log); best/ holds iteration {best['iteration']}")  # fmt: skip
    elif e1["mean_reward"] > e0["mean_reward"] and e1["fill_accuracy"] < e0["fill_accuracy"]:
        lines.append(f"WARNING judge hacking: held-out reward rose but fill accuracy fell over the run; "
                     f"best/ holds iteration {best['iteration']}")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    out = run_cli(
        __doc__,
        GRPOConfig,
        train_grpo,
        argv,
        "YAML recipe, e.g. alignment/char_diffusion/grpo.yaml (flags override it)",
    )
    print("\n".join(summary_lines(out)))
    print(f"policy: {out['checkpoint']}  best held-out fill accuracy: {out['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
