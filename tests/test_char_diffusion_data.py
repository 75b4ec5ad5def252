"""Character diffusion data: prepare (token files + meta), line-aligned blocks, masking strategies,
and clear errors for bad text."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from alignment import cli
from alignment.char_diffusion.data import CLS, MASK, PAD, CharData, Vocab, check_same_vocab
from alignment.char_diffusion.masking import (
    apply_mask,
    make_mask,
    masked_blocks,
    random_mask,
    span_mask,
    sticky_mask,
)
from alignment.char_diffusion.prepare import main as prepare_main
from alignment.char_diffusion.prepare import prepare, split_text
from alignment.char_diffusion.synthetic import LINE_LENGTH, synthetic_text
from alignment.cli import UserError
from tests.conftest import REPO, SHARED_REFERENCE

TEXT = "ab c\nhello there\nxyz\n" * 20


def test_prepare_writes_nanogpt_files_and_meta(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(TEXT, encoding="utf-8")
    meta = prepare(src, tmp_path / "d", block_size=8, val_fraction=0.2)
    chars = sorted(set(TEXT))
    assert meta["itos"] == [*chars, MASK, PAD, CLS] and meta["vocab_size"] == len(chars) + 3
    assert (meta["mask_token_id"], meta["pad_token_id"], meta["cls_token_id"]) == (len(chars), len(chars) + 1,
                                                                                   len(chars) + 2)  # fmt: skip
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == meta
    vocab = Vocab(tuple(meta["itos"]))
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert vocab.decode(train) + vocab.decode(val) == TEXT  # nothing lost, nothing added
    assert vocab.decode(train).endswith("\n")  # the split is at a line boundary
    assert abs(len(val) - 0.2 * len(TEXT)) <= len("hello there\n")


def test_prepare_cli_runs_as_a_module_and_fails_naming_the_file(tmp_path):
    src, bad = tmp_path / "in.txt", tmp_path / "bad.txt"
    src.write_text(TEXT, encoding="utf-8")
    bad.write_bytes(b"")
    script = (
        "import sys; from alignment.char_diffusion.prepare import main\n"
        f"main(['--input', {str(src)!r}, '--out', {str(tmp_path / 'd')!r}, '--block_size', '8'])\n"
        "from alignment import cli\n"
        f"cli.run(main, ['--input', {str(bad)!r}, '--out', {str(tmp_path / 'e')!r}])\n"
    )
    # the CLI as users run it: one subprocess (python -m is the same main) for both outcomes
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "vocab_size 17" in proc.stdout and CharData(tmp_path / "d").block_size == 8
    assert proc.returncode == 2 and f"error: {bad} is empty" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "is empty"), (b"good text\n\xff\xfe bad", "not UTF-8 text: byte 0xff at offset 10"),
     (b"short\n", "fewer than block_size")],
)  # fmt: skip
def test_bad_text_errors_name_the_file(tmp_path, capsys, content, fragment):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(UserError, match=fragment) as err:
        prepare(src, tmp_path / "d", block_size=64)
    assert str(src) in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        cli.run(prepare_main, ["--input", str(src), "--out", str(tmp_path / "d")], prog="prepare")
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err_lines) == 1 and fragment in err_lines[0]


def test_split_is_at_a_line_start():
    train, val = split_text("aaaa\nbbbb\ncccc\ndddd\n", 0.3)
    assert (train, val) == ("aaaa\nbbbb\ncccc\n", "dddd\n")


def test_blocks_are_line_aligned_and_full_length(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(synthetic_text(200, seed=3), encoding="utf-8")
    data = CharData(tmp_path / "d") if prepare(src, tmp_path / "d", block_size=20) else None
    train = data.tokens["train"]
    nl = data.vocab.newline_id
    g = torch.Generator().manual_seed(0)
    blocks = data.blocks("train", 64, g)
    assert blocks.shape == (64, 20)
    starts = data.starts["train"]
    assert all(s == 0 or train[s - 1] == nl for s in starts)
    assert len(starts) == 200 * 0.9 // 1 or len(starts) > 150  # one per line of the train split
    for row in blocks:  # each block is some line-start slice of the text
        assert any(np.array_equal(train[s : s + 20], row.numpy()) for s in starts)


def test_synthetic_lines_have_their_structure():
    lines = synthetic_text(50, seed=1).splitlines()
    for line in lines:
        left, right = line.split("|")
        assert left == right and len(line) + 1 == LINE_LENGTH
        words = left.split()
        plural = words[0] == "some" or words[-1][-1] != "s"
        assert (words[0] != "a" or not plural) and (words[0] != "some" or plural)


def test_random_and_span_masks_hit_the_count_exactly():
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([0.0, 0.1, 0.5, 1.0])
    for mask in (random_mask(ratios, 40, g), span_mask(ratios, 40, g, span_mean=5.0)):
        assert mask.sum(1).tolist() == [1, 4, 20, 40]  # at least one masked position per row
    spans = span_mask(torch.full((200,), 0.3), 40, g, span_mean=6.0)
    runs = (spans[:, 1:] & ~spans[:, :-1]).sum() + spans[:, 0].sum()
    assert spans.sum() / runs > 3.0  # contiguous spans, not scattered characters


def test_sticky_mask_has_the_stationary_fraction_and_longer_runs():
    g = torch.Generator().manual_seed(0)
    ratios = torch.full((400,), 0.3)
    for p, run_length in ((0.0, 1 / 0.7), (0.8, 1 / (0.7 * 0.2))):
        mask = sticky_mask(ratios, 200, g, p)
        runs = (mask[:, 1:] & ~mask[:, :-1]).sum() + mask[:, 0].sum()
        # 80,000 positions: the fraction and the mean run length are within a few percent of theory
        assert abs(float(mask.float().mean()) - 0.3) < 0.02
        assert abs(float(mask.sum() / runs) / run_length - 1) < 0.1


def test_masked_input_has_only_mask_at_masked_positions(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(synthetic_text(100), encoding="utf-8")
    data = CharData(tmp_path / "d") if prepare(src, tmp_path / "d", block_size=32) else None

    class Settings:
        mask_strategy, mask_min, mask_max, span_mean, sticky_p = "sticky", 0.1, 0.6, 4.0, 0.5

    tokens, inp, mask = masked_blocks(data, "train", 32, Settings, torch.Generator().manual_seed(1))
    assert (inp[mask] == data.vocab.mask_id).all() and torch.equal(inp[~mask], tokens[~mask])
    assert not (tokens == data.vocab.mask_id).any() and mask.any(1).all()
    with pytest.raises(ValueError, match="unknown mask strategy"):
        make_mask(2, 8, torch.Generator(), "bert")
    assert torch.equal(
        apply_mask(torch.tensor([[1, 2]]), torch.tensor([[True, False]]), 9), torch.tensor([[9, 2]])
    )


def test_vocab_mismatch_names_both_sources():
    a, b = Vocab.from_text("abc"), Vocab.from_text("abd")
    check_same_vocab(a, "x", Vocab.from_text("cab"), "y")
    with pytest.raises(UserError, match=r"vocabulary mismatch between gen\.pt .* and meta\.json .*'c'.*'d'"):
        check_same_vocab(a, "gen.pt", b, "meta.json")


def test_tiny_shakespeare_prepares(tmp_path):
    src = SHARED_REFERENCE / "tiny_shakespeare" / "input.txt"
    if not src.is_file():
        pytest.skip(f"{src} is absent (the shared reference data is not checked out next to the repository)")
    meta = prepare(src, tmp_path / "shakespeare", block_size=256)
    assert meta["vocab_size"] == 65 + 3 and meta["train_tokens"] + meta["val_tokens"] == len(src.read_text())
    blocks = CharData(tmp_path / "shakespeare").blocks("val", 4, torch.Generator().manual_seed(0))
    assert blocks.shape == (4, 256)
