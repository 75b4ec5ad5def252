"""Turn a text file into the token files and vocabulary of a character diffusion run.

    python -m alignment.char_diffusion.prepare --input input.txt --out models/char_diffusion/gpu/data \\
        [--block_size 256] [--val_fraction 0.1]

Writes ``train.bin``, ``val.bin`` and ``meta.json`` into ``--out`` (see :mod:`.data`). The split is
made at the line boundary nearest to ``1 - val_fraction`` of the text, and each split must hold at
least one line-aligned block of ``block_size`` characters. An empty or non-UTF-8 file is an error
naming the file (and for bad bytes, the offset).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from alignment import cli
from alignment.atomic import write_bytes, write_text
from alignment.char_diffusion.config import RunConfig
from alignment.char_diffusion.data import META_FILE, META_FORMAT, CharData, Vocab
from alignment.cli import UserError

logger = logging.getLogger(__name__)

MAX_VOCAB = 2**16  # ids are stored as uint16


def read_text(path: str | Path) -> str:
    """The file's text; raises naming ``path`` when it is missing, empty or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input text not found: {path}")
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"{path} is empty: nothing to train on")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text: byte {raw[exc.start]:#04x} at offset {exc.start} ({exc.reason})"
        ) from exc
    return text.removeprefix("\ufeff")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the cut is at the line start nearest to ``(1 - val_fraction) * len(text)``."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    target = int(len(text) * (1.0 - val_fraction))
    before = text.rfind("\n", 0, target)
    after = text.find("\n", target)
    cuts = [c + 1 for c in (before, after) if c != -1 and 0 < c + 1 < len(text)]
    cut = min(cuts, key=lambda c: abs(c - target)) if cuts else target
    return text[:cut], text[cut:]


def _write_tokens(path: Path, ids: list[int]) -> None:
    write_bytes(path, np.asarray(ids, dtype=np.uint16).tobytes())


def prepare(input_path: str | Path, out_dir: str | Path, block_size: int = 256,
            val_fraction: float = 0.1) -> dict[str, Any]:  # fmt: skip
    """Prepare ``input_path`` into ``out_dir``; returns the meta that was written."""
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    text = read_text(input_path)
    vocab = Vocab.from_text(text)
    if vocab.size > MAX_VOCAB:
        raise UserError(f"{input_path} has {vocab.size - 3} distinct characters; at most {MAX_VOCAB - 3} fit")
    train, val = split_text(text, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", train), ("val", val)):
        if len(part) < block_size:
            raise UserError(
                f"{input_path}: the {split} split has {len(part)} characters, fewer than block_size "
                f"{block_size} (use a longer text, a smaller --block_size or another --val_fraction)"
            )
        _write_tokens(out / f"{split}.bin", vocab.encode(part))
    meta = {
        "format": META_FORMAT,
        **vocab.meta(),
        "block_size": block_size,
        "source": str(input_path),
        "train_tokens": len(train),
        "val_tokens": len(val),
    }
    write_text(out / META_FILE, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    CharData(out)  # fails naming the split when no line-aligned block fits
    logger.info("%s -> %s: %d train / %d val characters, vocab %d", input_path, out, len(train), len(val),
                vocab.size)  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--input", required=True, help="a UTF-8 text file")
    p.add_argument(
        "--out", default=RunConfig.dataset, help="folder for train.bin, val.bin, meta.json (the GPU recipe's)"
    )
    p.add_argument("--block_size", type=int, default=256, help="characters per training block")
    p.add_argument(
        "--val_fraction", type=float, default=0.1, help="share of the text held out (at a line start)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    meta = prepare(a.input, a.out, a.block_size, a.val_fraction)
    print(f"wrote {a.out}: vocab_size {meta['vocab_size']}, train {meta['train_tokens']}, "
          f"val {meta['val_tokens']} characters, block_size {meta['block_size']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(main)
