"""The character-diffusion stage of ``make demo``: synthetic text -> data -> generator -> judge -> GRPO.

Builds (once; reused while ``BUILD.json`` matches) a small synthetic text (:mod:`.synthetic`), its
prepared data, a tiny pretrained generator and a judge trained on that generator's fills into
``models/char_diffusion/``, then runs GRPO from the generator against the judge and reports, on
fixed held-out masked blocks, the judge's reward and the ground-truth fill accuracy before and
after: the reward rises and the accuracy does not fall (the judge is not being gamed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from alignment.char_diffusion.build import DEMO, build
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import load_config

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
# kl_beta 1.0 (the recipe's is 0.1): a judge this small is exploitable, and with 0.1 some seeds see the
# reward rise while fill_accuracy falls (judge hacking); the strong penalty keeps the policy where the
# judge is right (reward and accuracy both rose over four seeds of the whole build)
GRPO = {"batch_size": 8, "gradient_accumulation_steps": 1, "group_size": 8, "max_iters": 240, "learning_rate": 2e-4,
        "min_lr": 2e-5, "warmup_iters": 5, "kl_beta": 1.0, "eval_interval": 80, "eval_iters": 8,
        "eval_batch_size": 32, "save_interval": 1000, "sample_interval": 80}  # fmt: skip


def run_char_diffusion_demo(models_dir: str | Path = "models/char_diffusion",
                            logs_dir: str | Path = "logs/demo/char_diffusion",
                            overrides: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Build the models if needed, run GRPO, and return the report's lines."""
    paths = build(models_dir, DEMO)
    out_dir = Path(logs_dir) / time.strftime("grpo_%Y%m%d_%H%M%S")
    cfg = load_config(GRPOConfig, HERE / "grpo.yaml", {
        **GRPO, "dataset": paths["data"], "generator_checkpoint": paths["generator"],
        "judge_checkpoint": paths["judge"], "out_dir": str(out_dir), **(overrides or {})})  # fmt: skip
    result = train_grpo(cfg)
    before, after = result["evals"][0][1], result["evals"][-1][1]
    n = cfg.eval_iters * cfg.eval_batch_size
    return [
        f"Character diffusion GRPO ({cfg.max_iters} iterations, group {cfg.group_size}, kl_beta {cfg.kl_beta}) "
        f"on {n} held-out masked blocks",
        f"{'':8} {'judge reward':>13} {'fill accuracy':>14}",
        f"{'before':8} {before['mean_reward']:13.4f} {before['fill_accuracy']:14.4f}",
        f"{'after':8} {after['mean_reward']:13.4f} {after['fill_accuracy']:14.4f}",
        f"Samples: {out_dir / 'samples.log'}   metrics: {out_dir / 'metrics.jsonl'}",
    ]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t = time.time()
    print("\n".join(run_char_diffusion_demo()))
    print(f"{time.time() - t:.1f} s")
