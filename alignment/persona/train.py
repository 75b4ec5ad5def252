"""Train the persona reader (SFT, REINFORCE or GRPO) and optionally its retriever.

    python -m alignment.persona.train --name sft --checkpoint_dir ckpt --train_data train.jsonl \\
        --eval_data valid.jsonl --passages story.jsonl --retriever_from persona
    python -m alignment.persona.train --reader_rl_learning --use_grpo --grpo_group_size 4 \\
        --grpo_kl_coeff 0.1 --gold_score_mode f1rougebleudist --name grpo --checkpoint_dir ckpt \\
        --model_path ckpt/sft/checkpoint/latest --train_data ... --eval_data ... --per_gpu_batch_size 2
    python -m alignment.persona.train --config alignment/persona/persona_toy.yaml --use_grpo ...
    torchrun --nproc_per_node 4 -m alignment.persona.train ...          # data parallel
    python -m alignment.persona.train <the same flags> --resume         # continue after a crash

Flags beat the YAML recipe, which beats the defaults (alignment/persona/config.py). A bad flag,
file or row is one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from alignment import cli
from alignment.config import add_dataclass_args, config_from_args
from alignment.persona.config import PersonaConfig


def parse_args(argv: list[str] | None = None) -> tuple[PersonaConfig, argparse.Namespace]:
    p = cli.parser(__doc__)
    p.add_argument("--config", default=None, help="YAML recipe (keys of PersonaConfig)")
    p.add_argument("--resume", action="store_true", help="continue checkpoint_dir/name/checkpoint/latest")
    add_dataclass_args(p, PersonaConfig)
    args = p.parse_args(argv)
    return config_from_args(PersonaConfig, args, args.config), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(cfg.run_dir / "run.log", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from alignment.persona.trainer import train  # after logging is set up: imports transformers

    summary = train(cfg, resume=args.resume)
    if rank == 0:
        print(json.dumps({"step": summary["step"], "checkpoint": summary["checkpoint"],
                          "final_eval": summary["eval"][-1] if summary["eval"] else None}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(main)
