"""The persona training loop: SFT, REINFORCE or GRPO for the reader, optional retriever distillation.

    summary = train(load_persona_config("alignment/persona/persona_toy.yaml"))

One step = one batch of ``per_gpu_batch_size`` rows per process: retrieve → (distil the retriever)
→ one reader update (SFT, REINFORCE) or ``grpo_inner_epochs`` of them (GRPO) → schedulers.
Evaluation every ``eval_freq`` steps (and at step 0, unless ``eval_at_start`` is off, and the end), a checkpoint every ``save_freq``
steps and at the end. Data order is a function of (seed, epoch), so a resumed run continues the
same sequence of batches; with the RNG, optimizer and scheduler states restored it reaches the
weights an uninterrupted run reaches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from alignment.atomic import write_text
from alignment.cli import UserError
from alignment.config import ConfigError
from alignment.distributed import DistInfo, barrier, cleanup, gather_objects, init_distributed, wrap
from alignment.persona import checkpoint as ckpt
from alignment.persona import models
from alignment.persona.config import RESUME_MUTABLE, PersonaConfig
from alignment.persona.data import DataError, load_examples, load_passages
from alignment.persona.evaluate import evaluate, format_records
from alignment.persona.hashing import weights_hash
from alignment.persona.index import load_index, load_or_build_index
from alignment.persona.pipeline import Pipeline
from alignment.persona.steps import Optim, distill_step, grpo_step, reinforce_step, sft_step
from alignment.persona.vocab import warn_if_unknown
from alignment.rng import rng_state, set_rng_state
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


class RunExistsError(UserError, FileExistsError):
    """The run folder already holds checkpoints and ``--resume`` was not given."""


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "fixed": "constant_with_warmup"}


def _reader_path(path: str | Path) -> str:
    """A checkpoint folder's ``reader/``, else the path itself (a LAPDOG checkpoint, a T5, a hub name)."""
    p = Path(path)
    return str(p / "reader") if (p / "reader").is_dir() else str(path)


def _saved_prefix(step_dir: Path) -> str | None:
    """The decoder prefix one of our checkpoints was trained with (None before the option existed)."""
    return ckpt.load_state(step_dir).get("target_prefix")


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class PersonaTrainer:
    def __init__(self, cfg: PersonaConfig, resume: bool = False, dist: DistInfo | None = None) -> None:
        self.cfg, self.dist = cfg, dist or init_distributed(cfg.device)
        device = self.dist.device
        for name in ("train_data", "eval_data", "passages"):
            if getattr(cfg, name) is None:
                raise ConfigError(f"{name} is required")
        resume_dir = self._resume_dir(resume)
        start = ckpt.resolve_checkpoint(cfg.model_path) if cfg.model_path else None
        src = resume_dir or start
        reader_path = _reader_path(src) if src else cfg.reader_model_type
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed + self.dist.rank)
        self.examples = load_examples(cfg.train_data)
        self.eval_examples = load_examples(cfg.eval_data, limit=cfg.eval_max_examples)
        self.passages = load_passages(cfg.passages)
        self.reader, self.reader_tokenizer = models.load_reader(reader_path, cfg.reader_model_type)
        self.retriever, self.retriever_tokenizer = models.load_retriever(
            src or cfg.retriever_model_path, cfg.retriever_model_path
        )
        self.reader, self.retriever = self.reader.to(device), self.retriever.to(device)
        saved_prefix = (
            _saved_prefix(src) if src is not None and not models.is_lapdog_checkpoint(src) else None
        )
        self.target_prefix = models.resolve_target_prefix(cfg.target_prefix, start, saved_prefix)
        self.reader.decoder_prefix = models.prefix_ids(self.reader_tokenizer, self.target_prefix)
        if self.target_prefix:
            logger.info("targets start with %r (ids %s), given, not sampled", self.target_prefix,
                        self.reader.decoder_prefix)  # fmt: skip
        if self.dist.is_main:
            texts = [e.question for e in self.examples] + [a for e in self.examples for a in e.answers]
            warn_if_unknown(self.reader_tokenizer, texts + [p.text for p in self.passages], reader_path)
        global_batch = cfg.per_gpu_batch_size * self.dist.world_size
        if len(self.examples) < global_batch:
            raise DataError(
                f"{cfg.train_data}: {len(self.examples)} rows, fewer than one batch ({global_batch})"
            )
        if cfg.retriever_n_context > len(self.passages):
            raise ConfigError(
                f"retriever_n_context {cfg.retriever_n_context} > {len(self.passages)} passages"
            )

        self.reader_optim = self._optim(self.reader, cfg.lr)
        self.retriever_optim = self._optim(self.retriever, cfg.lr_retriever) if cfg.train_retriever else None
        if not cfg.train_retriever:
            _frozen(self.retriever)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.answer_rng = random.Random(cfg.seed)
        self.step, self.epoch, self.offset = 0, 0, 0
        self.eval_history: list[dict[str, float]] = []
        self.last_records: list[dict] = []  # the latest evaluation's example dialogues
        state = self._load(resume_dir) if resume_dir else None

        self.reference, self.reference_info = None, None
        if cfg.reader_rl_learning:
            source = (state["reference"]["source"] if state else
                      _reader_path(cfg.reference_model_path) if cfg.reference_model_path else
                      reader_path)  # fmt: skip
            reference, _ = models.load_reader(source, cfg.reader_model_type, "--reference_model_path")
            reference.decoder_prefix = list(self.reader.decoder_prefix)  # the same conditional distribution
            self.reference = _frozen(reference.to(device))
            digest = weights_hash(self.reference)
            if state and digest != state["reference"]["sha256"]:
                raise ConfigError(f"reference {source} changed since the run started (sha256 {digest[:12]}, "
                                 f"was {state['reference']['sha256'][:12]})")  # fmt: skip
            if self.reference.config.vocab_size != self.reader.config.vocab_size:
                raise ConfigError(f"reference {source} has another vocabulary than the reader")
            self.reference_info = {"source": source, "sha256": digest}
            logger.info("reference model %s (frozen), sha256 %s", source, digest)

        self.index = self._index(state["index_fingerprint"] if state else None)
        self.pipe = Pipeline(cfg, self.reader, self.retriever, self.reader_tokenizer, self.retriever_tokenizer,
                             self.index, device)  # fmt: skip
        self.reader_model = wrap(self.reader, self.dist)
        # (unused retriever parameters, e.g. BERT's pooler, are allowed; a frozen retriever stays unwrapped)
        self.retriever_model = wrap(self.retriever, self.dist, find_unused_parameters=True)
        if self.dist.enabled:
            logger.info("data parallel over %d processes: reader in %s", self.dist.world_size,
                        type(self.reader_model).__name__)  # fmt: skip
        self.tracker = None
        if self.dist.is_main:
            self.tracker = Tracker(cfg.run_dir, run_name=cfg.name, config=dataclasses.asdict(cfg), wandb=cfg.wandb,
                                   wandb_project=cfg.wandb_project)  # fmt: skip
            if self.reference_info:
                write_text(cfg.run_dir / "reference.json", json.dumps(self.reference_info, indent=2) + "\n")
                self.tracker.log_text("reference", json.dumps(self.reference_info), self.step)

    # ----- set-up -----
    def _resume_dir(self, resume: bool) -> Path | None:
        latest = ckpt.latest_checkpoint(self.cfg.run_dir)
        if resume:
            if latest is None:
                raise ConfigError(f"--resume: {self.cfg.run_dir} has no checkpoint/latest")
            return latest
        if latest is not None:
            raise RunExistsError(f"{self.cfg.run_dir} already has checkpoints: pass --resume to continue it, "
                                  "or choose another --name")  # fmt: skip
        return None

    def _optim(self, model: torch.nn.Module, lr: float) -> Optim:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)
        sched = get_scheduler(_SCHEDULERS[self.cfg.scheduler], opt, num_warmup_steps=self.cfg.warmup_steps,
                              num_training_steps=self.cfg.total_steps)  # fmt: skip
        return Optim(opt, sched, params, self.cfg.clip)

    def _index(self, fingerprint: str | None):
        cfg, build_kw = self.cfg, {"mode": self.cfg.index_mode}
        if fingerprint is not None:  # resuming: the index in use when the checkpoint was written
            found = load_index(cfg.index_dir, fingerprint, self.passages, cfg.index_mode)
            if found is None:
                raise FileNotFoundError(
                    f"the run's passage index {fingerprint[:32]} is missing from {cfg.index_dir}"
                )
            return found
        return self._build_index(**build_kw)

    def _build_index(self, **kw):
        cfg = self.cfg
        args = (cfg.index_dir, self.retriever, self.retriever_tokenizer, self.passages, cfg.retriever_format,
                min(cfg.text_maxlength, 512), cfg.per_gpu_embedder_batch_size)  # fmt: skip
        index = load_or_build_index(*args, build=self.dist.is_main, **kw) if self.dist.is_main else None
        barrier(self.dist)  # rank 0 has saved it; the others load the same file
        return index if index is not None else load_or_build_index(*args, build=False, **kw)

    def _load(self, step_dir: Path) -> dict[str, Any]:
        saved = ckpt.load_options(step_dir)
        now = dataclasses.asdict(self.cfg)
        changed = sorted(k for k in now if k not in RESUME_MUTABLE and saved.get(k) != now[k])
        if changed:
            raise ConfigError(f"--resume with options that differ from {step_dir / ckpt.OPTIONS_FILE}: "
                              + ", ".join(f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in changed))  # fmt: skip
        state = ckpt.load_state(step_dir)
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"{step_dir} was written by {state['world_size']} processes, not {self.dist.world_size}"
            )
        self.reader_optim.optimizer.load_state_dict(state["optimizers"]["reader"])
        self.reader_optim.scheduler.load_state_dict(state["schedulers"]["reader"])
        if self.retriever_optim is not None:
            self.retriever_optim.optimizer.load_state_dict(state["optimizers"]["retriever"])
            self.retriever_optim.scheduler.load_state_dict(state["schedulers"]["retriever"])
        rank = self.dist.rank
        set_rng_state(state["rng"][rank], f"{step_dir / ckpt.STATE_FILE} (rank {rank})", self._rngs())
        self.step, self.epoch, self.offset = state["step"], state["epoch"], state["offset"]
        self.eval_history = list(state.get("eval_history", []))
        logger.info("resumed %s at step %d", step_dir, self.step)
        return state

    def _rngs(self) -> dict[str, torch.Generator | random.Random]:
        """This process's own generators, saved beside the global RNG states: the sampler's, the answers'."""
        return {"sampler": self.generator, "answers": self.answer_rng}

    # ----- the loop -----
    def _next_batch(self) -> list:
        b, world = self.cfg.per_gpu_batch_size, self.dist.world_size
        if self.offset + b * world > len(self.examples):  # drop the ragged end: every rank gets a full batch
            self.epoch, self.offset = self.epoch + 1, 0
        order = list(range(len(self.examples)))
        if self.cfg.shuffle:
            random.Random(self.cfg.seed * 100003 + self.epoch).shuffle(order)
        start = self.offset + self.dist.rank * b
        self.offset += b * world
        return [self.examples[i] for i in order[start : start + b]]

    def _train_step(self, batch: list) -> dict[str, float]:
        cfg, pipe = self.cfg, self.pipe
        k = cfg.retriever_n_context if cfg.train_retriever else cfg.n_context
        retrieved = pipe.retrieve(batch, k)
        passages = [ps[: cfg.n_context] for ps in retrieved]
        stats: dict[str, float] = {}
        if self.retriever_optim is not None:
            self.retriever.train()
            stats.update(distill_step(pipe, self.retriever_model, batch, retrieved, self.retriever_optim))
        if cfg.stage == "sft":
            self.reader.train()
            targets = [self.answer_rng.choice(e.answers) for e in batch]
            stats.update(sft_step(pipe, self.reader_model, batch, passages, targets, self.reader_optim))
        elif cfg.stage == "reinforce":
            self.reader.eval()
            stats.update(
                reinforce_step(pipe, self.reader_model, batch, passages, self.reader_optim, self.generator)
            )
        else:
            self.reader.eval()
            stats.update(grpo_step(pipe, self.reader_model, self.reference, batch, passages, self.reader_optim,
                                   self.generator, cfg.grpo_settings(), cfg.grpo_group_size,
                                   cfg.grpo_inner_epochs, self.dist))  # fmt: skip
        for optim in (self.reader_optim, self.retriever_optim):
            if optim is not None:
                optim.scheduler.step()
        stats["train/lr"] = self.reader_optim.scheduler.get_last_lr()[0]
        return stats

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop after step ``stop_after``: an interruption, for tests)."""
        cfg = self.cfg
        if self.step == 0 and cfg.eval_at_start:
            self._evaluate()
        window: list[dict[str, float]] = []
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc=f"{cfg.stage} {cfg.name}",
                   disable=not self.dist.is_main)  # fmt: skip
        while self.step < cfg.total_steps:
            window.append(self._train_step(self._next_batch()))
            self.step += 1
            bar.update(1)
            last = self.step == cfg.total_steps
            if self.tracker is not None and (self.step % cfg.log_freq == 0 or last):
                keys = {k for s in window for k in s}
                self.tracker.log({k: sum(s[k] for s in window if k in s) / sum(k in s for s in window)
                                  for k in sorted(keys)}, self.step)  # fmt: skip
                window = []
            if self.step % cfg.eval_freq == 0 or last:
                self._evaluate()
            if cfg.train_retriever and cfg.refresh_index > 0 and self.step % cfg.refresh_index == 0:
                self.index = self.pipe.index = self._build_index(mode=cfg.index_mode)
            if self.step % cfg.save_freq == 0 or last:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        return {
            "step": self.step,
            "stage": cfg.stage,
            "eval": self.eval_history,
            "checkpoint": str(ckpt.latest_checkpoint(cfg.run_dir)),
            "reference": self.reference_info,
            "examples": self.last_records,
        }

    def _evaluate(self) -> None:
        if self.dist.is_main:
            result = evaluate(self.pipe, self.eval_examples, self.cfg.per_gpu_eval_batch_size, self.reference,
                              self.cfg.log_examples)  # fmt: skip
            self.eval_history.append({"step": self.step, **result.metrics})
            self.last_records = result.records
            self.tracker.log(result.metrics, self.step)
            text = format_records(self.step, result.records)
            self.tracker.log_text("eval/examples", text, self.step)
            with open(self.cfg.run_dir / "examples.log", "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
            logger.info("step %d: %s", self.step, {k: round(v, 4) for k, v in result.metrics.items()})
        barrier(self.dist)

    def save(self) -> None:
        """A checkpoint of the current step (every rank's RNG state gathered; rank 0 writes)."""
        rngs = gather_objects(self.dist, rng_state(self._rngs()))
        hashes = gather_objects(self.dist, {"reader": weights_hash(self.reader),
                                            "retriever": weights_hash(self.retriever)})  # fmt: skip
        if any(h != hashes[0] for h in hashes):  # data parallel keeps them equal; if not, stop here
            raise RuntimeError(f"step {self.step}: the ranks' weights differ: {hashes}")
        if self.dist.is_main:
            opts = {"reader": self.reader_optim}
            if self.retriever_optim is not None:
                opts["retriever"] = self.retriever_optim
            state = {
                "stage": self.cfg.stage, "epoch": self.epoch, "offset": self.offset, "rng": rngs,
                "world_size": self.dist.world_size, "index_fingerprint": self.index.fingerprint,
                "optimizers": {k: o.optimizer.state_dict() for k, o in opts.items()},
                "schedulers": {k: o.scheduler.state_dict() for k, o in opts.items()},
                "reference": self.reference_info, "eval_history": self.eval_history, "rank_hashes": hashes,
                "target_prefix": self.target_prefix,
            }  # fmt: skip
            path = ckpt.save_checkpoint(self.cfg.run_dir, self.step, self.reader, self.reader_tokenizer,
                                        self.retriever, self.retriever_tokenizer, self.cfg, state)  # fmt: skip
            logger.info("checkpoint %s", path)
        barrier(self.dist)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def train(cfg: PersonaConfig, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Build the trainer, run it, close its logs; returns the summary (evaluations, checkpoint)."""
    trainer = PersonaTrainer(cfg, resume)
    try:
        return trainer.run(stop_after)
    finally:
        trainer.close()
        cleanup(trainer.dist)
