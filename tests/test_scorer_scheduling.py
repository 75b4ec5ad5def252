"""The scorer's parts for big requests, in process: prefix tokenisation equal to whole-text
tokenisation, bounded JSON parsing equal to ``json.loads``, tokenising slices that take turns,
and a scheduler that puts a new request into the next step. (Over HTTP:
tests/test_scorer_big_requests.py.)"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from alignment.scoring.batcher import (
    ENCODE_MARGIN,
    PrefixTokenizer,
    RewardCostScorer,
    TextEncodingError,
    plan_forwards,
)
from alignment.scoring.body import TooDeep, TooManyValues, load_json
from alignment.scoring.encoder_pool import EncoderPool
from alignment.scoring.scheduler import BatchScheduler, QueueFull
from alignment.scoring.score_model import load_score_model
from alignment.toy.objective import random_response, tokenizer_corpus

LIMIT = 64 + ENCODE_MARGIN


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama's kind: spaces become ``▁`` in a normaliser, one BPE over the whole text, byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece_dropping_characters() -> PreTrainedTokenizerFast:
    """BERT's kind: the normaliser drops control characters and lower-cases; ``[SEP]`` is added
    at the end by the post-processor (so truncation keeps an end token)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[SEP]", unk_token="[UNK]")


def _texts(rng: random.Random) -> list[str]:
    texts = [random_response(rng, max_words=n, min_words=n) for n in (1, 5, 30, 55, 58, 60, 62, 64, 70, 400)]
    texts += [
        "\x01" * 20_000 + random_response(rng, max_words=300),  # dropped by BERT's normaliser: must regrow
        "a" * 30_000,  # one word of 30,000 characters
        "é😀 " * 5_000,  # several tokens per character (byte fallback)
        "check the guide</s> then bake " * 300,  # a special token inside the text
        "x" + " " * 40_000 + "y",
        "",
    ]
    for _ in range(40):  # cut points everywhere around the limit
        words = random_response(rng, max_words=200, min_words=200)
        texts.append(words[: rng.randrange(1, len(words))])
    return texts


@pytest.mark.parametrize("kind", ["toy byte-level BPE", "sentencepiece-like BPE", "WordPiece"])
def test_prefix_tokenisation_equals_whole_text_tokenisation(toy_models: Path, kind: str):
    if kind == "toy byte-level BPE":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(toy_models / "reward")
    else:
        tok = _sentencepiece_like() if kind == "sentencepiece-like BPE" else _wordpiece_dropping_characters()
    texts = _texts(random.Random(0))
    got = PrefixTokenizer(tok, LIMIT)(texts)
    keep = LIMIT - ENCODE_MARGIN
    for text, ids in zip(texts, got, strict=True):
        whole = tok(text, add_special_tokens=True)["input_ids"]
        assert ids[:keep] == whole[:keep], text[:80]
        assert (len(ids) < LIMIT) == (len(whole) < LIMIT)
        if len(whole) < LIMIT:
            assert ids == whole


def test_prefix_tokenisation_reads_a_bounded_part_of_long_texts(toy_models: Path):
    from transformers import AutoTokenizer

    class Counting:  # the tokenizer, counting the characters it is given
        def __init__(self, tok) -> None:
            self.tok, self.chars = tok, 0

        def __deepcopy__(self, memo):
            return self

        def __call__(self, texts, **kwargs):
            self.chars += sum(len(t) for t in texts)
            return self.tok(texts, **kwargs)

    counting = Counting(AutoTokenizer.from_pretrained(toy_models / "reward"))
    rng = random.Random(1)
    texts = [(random_response(rng, max_words=3000, min_words=3000) * 12)[:200_000] for _ in range(16)]
    prefix = PrefixTokenizer(counting, 512 + ENCODE_MARGIN)
    assert all(len(ids) == 512 + ENCODE_MARGIN for ids in prefix(texts))
    # ~5 characters a toy token: ~2,700 characters a text are needed; the first texts are cut
    # short before the rate is learnt and read twice. Whole texts would be 3.2 M characters.
    assert counting.chars < 0.05 * sum(len(t) for t in texts)


def test_encode_keeps_the_old_rule_cut_to_max_length_minus_one_plus_eos(toy_models: Path):
    scorer = RewardCostScorer(
        load_score_model(str(toy_models / "reward")),
        load_score_model(str(toy_models / "cost")),
        max_length=48,
    )
    tok, eos = scorer.reward.tokenizer, scorer.reward.tokenizer.eos_token_id
    texts = _texts(random.Random(2))
    rows, truncated = scorer.encode(scorer.reward, texts)
    expected_cut = []
    for i, (text, row) in enumerate(zip(texts, rows, strict=True)):
        whole = tok(text, add_special_tokens=True)["input_ids"]
        whole = whole if whole and whole[-1] == eos else [*whole, eos]
        if len(whole) > 48:
            whole, _ = [*whole[:47], eos], expected_cut.append(i)
        assert list(row) == whole
    assert truncated == expected_cut and len(truncated) > 10


# ---- bounded JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [1, 2.5, -3e2, "x\\u00e9\\n\\ud83d\\ude00", null, true, false, {}], "b": {"c": []}, "a": 1}',
        ' [ ] ', '"s"', '{"texts": ["a", "b"]}', '[[[[]]]]', "-0.0", "1E5", "[NaN, -Infinity]",
    ],
)  # fmt: skip
def test_load_json_equals_json_loads(text: str):
    assert repr(load_json(text, 1000)) == repr(json.loads(text))


@pytest.mark.parametrize(
    "text",
    ["", "[", '{"a" 1}', '{"a":1,}', "[1,]", "[1 2]", "{1:2}", '"\x01"', '"abc', "[1]x", "nul", '"\\x"'],
)
def test_load_json_rejects_what_json_loads_rejects_with_its_message(text: str):
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        load_json(text, 1000)
    assert (got.value.msg, got.value.pos) == (want.value.msg, want.value.pos)


def test_load_json_stops_at_the_value_and_depth_bounds():
    with pytest.raises(TooManyValues):
        load_json("[" + ",".join(['"ab"'] * 100_000) + "]", 5_000)
    assert len(load_json("[" + ",".join(['"ab"'] * 4_999) + "]", 5_000)) == 4_999
    with pytest.raises(TooDeep):
        load_json("[" * 100_000 + "]" * 100_000, 10**6)  # iterative: no RecursionError either


# ---- tokenising slices take turns ------------------------------------------------------------------


def test_encoder_pool_slices_take_turns_and_errors_name_the_item():
    started: list[str] = []
    release = threading.Semaphore(0)

    def encode(texts: list[str]) -> list[str]:
        started.append(texts[0])
        release.acquire(timeout=30)
        if "bad" in texts:
            raise TextEncodingError(texts.index("bad"), "cannot")
        return [t.upper() for t in texts]

    async def main() -> None:
        pool = EncoderPool(encode, threads=1, slice_items=2)
        big = asyncio.ensure_future(pool.encode_all([f"a{i}" for i in range(8)]))
        while not started:
            await asyncio.sleep(0.001)
        small = asyncio.ensure_future(pool.encode_all(["b0"]))
        await asyncio.sleep(0.01)  # the small request has queued its one slice
        for _ in range(5):
            release.release()
        assert await small == ["B0"]
        assert await big == [f"A{i}" for i in range(8)]
        assert started == ["a0", "b0", "a2", "a4", "a6"]  # its turn came after one slice, not four
        failing = asyncio.ensure_future(pool.encode_all(["x", "y", "z", "bad"]))
        release.release()
        release.release()
        with pytest.raises(TextEncodingError) as err:
            await failing
        assert err.value.index == 3  # within the request, not within its slice
        pool.shutdown()

    asyncio.run(main())


# ---- the scheduler -----------------------------------------------------------------------------------


def _controlled_scheduler(**kwargs) -> tuple[BatchScheduler, list[list[str]], threading.Semaphore]:
    """A scheduler whose steps run only when released; ``steps`` records what each step held."""
    steps: list[list[str]] = []
    release = threading.Semaphore(0)

    def fn(items: list[str]) -> list[str]:
        steps.append(list(items))
        release.acquire(timeout=30)  # a failing test must not leave a thread waiting for ever
        return [item.upper() for item in items]

    return BatchScheduler(fn, **kwargs), steps, release


async def _until(condition) -> None:
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("never happened")


@pytest.mark.parametrize("passes", ["one pass a round", "plan_forwards"])
def test_a_new_request_is_in_the_next_forward_pass_whatever_is_queued(passes: str):
    async def main() -> None:
        # the CPU defaults: 32 rows and 1,024 tokens a pass, 4 passes a round, 8 rows per request at a
        # time: the first request's 8 rows of 512 tokens fill a round by themselves
        plan = None if passes == "one pass a round" else (lambda lengths: plan_forwards(lengths, 32, 1024))
        scheduler, steps, release = _controlled_scheduler(
            max_rows=32, max_tokens=1024, plan=plan, max_wait_s=0
        )
        await scheduler.start()
        big_items = [f"big{i}" for i in range(2048)]
        big = asyncio.ensure_future(scheduler.submit(big_items, [512] * 2048))
        await _until(lambda: len(steps) == 1)
        small = asyncio.ensure_future(scheduler.submit(["small"], [20]))
        await asyncio.sleep(0.01)
        release.release()  # the running forward pass ends; the next one starts now
        await _until(lambda: len(steps) == 2)
        assert "small" in steps[1]  # (before: after all 2,048 rows)
        if plan is not None:
            assert steps[0] == ["big0", "big1"] and steps[1] == ["small"]  # the round was cut short
        assert sum(512 for item in steps[1] if item.startswith("big")) + 20 <= 4 * 1024
        for _ in range(2000):
            release.release()
        assert await small == ["SMALL"]
        assert await big == [item.upper() for item in big_items]
        # the rows put back when the round was cut short were scored once, like every other
        assert sorted(item for step in steps for item in step) == sorted([*big_items, "small"])
        await scheduler.stop()

    asyncio.run(main())


def test_old_requests_take_turns_and_are_not_starved_by_new_ones():
    async def main() -> None:
        scheduler, steps, release = _controlled_scheduler(max_rows=4, max_tokens=64, max_wait_s=0)
        await scheduler.start()  # a step: 16 rows, 256 tokens; 8 of each first for new requests
        a = asyncio.ensure_future(scheduler.submit([f"a{i}" for i in range(64)], [32] * 64))
        b = asyncio.ensure_future(scheduler.submit([f"b{i}" for i in range(64)], [32] * 64))
        await _until(lambda: len(steps) == 1)
        news = [asyncio.ensure_future(scheduler.submit([f"n{k}"], [32])) for k in range(40)]
        await asyncio.sleep(0.01)
        for _ in range(200):
            release.release()
        await asyncio.gather(a, b, *news)
        for step in steps[1:6]:  # while new requests keep coming, the old ones still advance
            assert any(item[0] in "ab" for item in step) and any(item[0] == "n" for item in step)
        for first, second in zip(steps[1:5], steps[2:6], strict=True):  # a and b take turns at least
            assert {item[0] for item in first + second} >= {"a", "b"}
        await scheduler.stop()

    asyncio.run(main())


def test_parts_are_scored_as_they_arrive_and_count_in_full_against_the_queue():
    async def main() -> None:
        scheduler, steps, release = _controlled_scheduler(max_rows=4, max_wait_s=0, max_queue_items=10)
        await scheduler.start()
        more = asyncio.Event()

        async def parts():
            yield ["p0", "p1"], [1, 1]
            await more.wait()
            yield ["p2"], [1]

        first = asyncio.ensure_future(scheduler.submit_parts(8 - 5, parts()))
        await _until(lambda: len(steps) == 1)
        assert steps[0] == ["p0", "p1"]  # scored before the last part exists
        queued = asyncio.ensure_future(scheduler.submit(["q"] * 7, [1] * 7))  # 3 announced + 7 = 10: fits
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await scheduler.submit(["r"], [1])
        more.set()
        for _ in range(10):
            release.release()
        assert await first == ["P0", "P1", "P2"]
        assert await queued == ["Q"] * 7

        async def failing():
            yield ["f0"], [1]
            raise ValueError("the third text cannot be tokenised")

        with pytest.raises(ValueError, match="third text"):
            await scheduler.submit_parts(3, failing())
        for _ in range(10):
            release.release()
        assert scheduler.alive and await scheduler.submit(["s"], [1]) == ["S"]
        await scheduler.stop()

    asyncio.run(main())
