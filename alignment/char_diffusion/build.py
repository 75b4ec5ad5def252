"""Build the small synthetic pipeline into a folder: text, prepared data, generator, judge.

    python -m alignment.char_diffusion.build [--out models/char_diffusion] [--force]

Writes ``synthetic.txt`` (:mod:`.synthetic`), ``data/`` (:mod:`.prepare`), ``generator/ckpt.pt``
(:mod:`.train`), ``judge/ckpt.pt`` (:mod:`.train_judge`, on that generator's fills) and
``BUILD.json`` (the settings and the validation figures). A folder built with the same settings is
reused. :data:`DEMO` is what ``make demo`` builds; tests build :data:`TINY` (seconds).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignment import cli
from alignment.char_diffusion.config import JudgeConfig, PretrainConfig
from alignment.char_diffusion.prepare import prepare
from alignment.char_diffusion.synthetic import LINE_LENGTH, write_synthetic_text
from alignment.char_diffusion.train import pretrain
from alignment.char_diffusion.train_judge import train_judge
from alignment.config import load_config

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
BUILD_VERSION = 1


@dataclass(frozen=True)
class BuildSettings:
    num_lines: int = 3000
    seed: int = 0
    block_size: int = LINE_LENGTH
    pretrain: dict[str, Any] = field(default_factory=dict)  # PretrainConfig overrides of train.yaml
    judge: dict[str, Any] = field(default_factory=dict)  # JudgeConfig overrides of judge.yaml


_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0}
_QUIET = {"eval_iters": 4, "save_interval": 100000, "log_interval": 10}
DEMO = BuildSettings(
    pretrain={**_SHAPE, **_QUIET, "batch_size": 32, "max_iters": 200, "learning_rate": 3e-3, "min_lr": 3e-4,
              "warmup_iters": 20, "eval_interval": 100},
    judge={**_QUIET, "init_from_generator": False, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
           "batch_size": 16, "fills_per_block": 4, "max_iters": 1500, "learning_rate": 2e-3, "min_lr": 2e-4,
           "warmup_iters": 50, "eval_interval": 500},
)  # fmt: skip
TINY = BuildSettings(
    num_lines=400,
    pretrain={**_SHAPE, **_QUIET, "n_embd": 32, "batch_size": 16, "max_iters": 40, "learning_rate": 3e-3,
              "min_lr": 3e-4, "warmup_iters": 5, "eval_interval": 40, "eval_iters": 2},
    judge={**_QUIET, "batch_size": 8, "fills_per_block": 2, "max_iters": 20, "learning_rate": 1e-3, "min_lr": 1e-4,
           "warmup_iters": 2, "eval_interval": 20, "eval_iters": 2},
)  # fmt: skip


def build(out: str | Path, settings: BuildSettings = DEMO, force: bool = False) -> dict[str, str]:
    """Paths of ``data``, ``generator`` and ``judge`` (checkpoints) in ``out``, built if needed."""
    root = Path(out)
    paths = {"text": str(root / "synthetic.txt"), "data": str(root / "data"),
             "generator": str(root / "generator" / "ckpt.pt"), "judge": str(root / "judge" / "ckpt.pt")}  # fmt: skip
    stamp = {"version": BUILD_VERSION, **asdict(settings)}
    build_file = root / "BUILD.json"
    built = build_file.is_file() and all(Path(p).exists() for p in paths.values())
    if not force and built and json.loads(build_file.read_text(encoding="utf-8")).get("stamp") == stamp:
        return paths
    write_synthetic_text(paths["text"], settings.num_lines, settings.seed)
    prepare(paths["text"], paths["data"], block_size=settings.block_size)
    gen = pretrain(load_config(PretrainConfig, HERE / "train.yaml", {
        **settings.pretrain, "dataset": paths["data"], "out_dir": str(root / "generator")}))  # fmt: skip
    judge = train_judge(load_config(JudgeConfig, HERE / "judge.yaml", {
        **settings.judge, "dataset": paths["data"], "generator_checkpoint": paths["generator"],
        "out_dir": str(root / "judge")}))  # fmt: skip
    summary = {"stamp": stamp, "generator_val": gen["eval"], "judge_val": judge["eval"]}
    build_file.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    logger.info("built %s: generator %s, judge %s", root, gen["eval"], judge["eval"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="models/char_diffusion", help="folder to build into")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(build(a.out, DEMO, a.force), indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
