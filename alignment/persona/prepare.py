"""Prepare LAPDOG-format ConvAI2 rows for an offline run: persona-disjoint splits, a stand-in passage
corpus when LAPDOG's story corpus is absent, and a CPU-sized T5 reader whose tokenizer is trained
on the data.

    python -m alignment.persona.prepare --data ../shared/reference/convai2/valid.jsonl
    python -m alignment.persona.prepare --data train.jsonl --passages story.jsonl --out models/my-run

Writes into ``--out`` (default ``models/persona-convai2``, git-ignored)::

    data/train.jsonl            rows of the training personas (LAPDOG's format, unchanged)
    data/valid.jsonl            rows of the held-out personas: no persona of these is in train
    data/passages.jsonl         --passages copied, or else data/passages.standin.jsonl:
    data/passages.standin.jsonl THE STAND-IN CORPUS: one passage per sentence of the "corpus
                                personas", a third group whose dialogues are used nowhere; it is
                                not LAPDOG's story corpus, only something related to retrieve
    reader/                     T5ForConditionalGeneration (random init, --d_model ...) + a
                                SentencePiece T5 tokenizer trained on the training texts
    PREPARED.json               counts, sources, options, the tokenizer's unknown-token rate

Personas are the text after ``persona:``; the split is by persona (a seeded shuffle), so every row
of a persona lands in the same split and held-out evaluation sees only unseen personas. Passage
ids of the stand-in start with ``standin-persona-`` and its rows carry ``"source": "stand-in"``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from alignment import cli
from alignment.atomic import write_text
from alignment.config import field_help as _help
from alignment.persona.data import DataError, DialogueExample, load_examples, load_passages

logger = logging.getLogger(__name__)

DEFAULT_OUT = "models/persona-convai2"
STANDIN_FILE = "passages.standin.jsonl"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# words of the reader's prompt formats, so that the trained tokenizer can spell them
PROMPT_TEXT = "dialog with R's persona: context: Q: R: <extra_id_0> story title: story:"


@dataclass(frozen=True)
class PrepareOptions:
    eval_fraction: float = field(default=0.1, metadata=_help("share of the personas held out for evaluation"))
    corpus_fraction: float = field(
        default=0.15, metadata=_help("share of the personas whose sentences make the stand-in corpus")
    )
    seed: int = field(
        default=0, metadata=_help("seed of the persona shuffle and the reader's initialisation")
    )
    vocab_size: int = field(default=4000, metadata=_help("SentencePiece pieces at most (+ 100 sentinels)"))
    d_model: int = field(default=128, metadata=_help("reader: hidden size"))
    d_ff: int = field(default=512, metadata=_help("reader: feed-forward size (gated GELU)"))
    num_layers: int = field(default=2, metadata=_help("reader: encoder layers, and as many decoder layers"))
    num_heads: int = field(default=4, metadata=_help("reader: attention heads"))

    def __post_init__(self) -> None:
        if not (0 < self.eval_fraction < 1 and 0 <= self.corpus_fraction < 1):
            raise cli.UserError("eval_fraction must be in (0, 1) and corpus_fraction in [0, 1)")
        if self.eval_fraction + self.corpus_fraction >= 1:
            raise cli.UserError("eval_fraction + corpus_fraction must leave personas for training")


def persona_sentences(persona: str) -> list[str]:
    """The sentences of a persona text ("i like cats. i am tall." -> ["i like cats.", "i am tall."])."""
    return [s.strip() for s in _SENTENCE_END.split(persona) if s.strip()]


def split_personas(
    examples: list[DialogueExample], opts: PrepareOptions, with_corpus: bool
) -> dict[str, list[DialogueExample]]:
    """Rows grouped by persona and the personas shuffled (seeded) into ``valid``, ``corpus`` (only
    when the stand-in corpus is wanted) and ``train``; each keeps the file's row order."""
    personas = sorted({e.persona for e in examples})
    random.Random(opts.seed).shuffle(personas)
    n_eval = max(1, round(opts.eval_fraction * len(personas)))
    n_corpus = max(1, round(opts.corpus_fraction * len(personas))) if with_corpus else 0
    if n_eval + n_corpus >= len(personas):
        raise DataError(f"{len(personas)} personas are too few to hold out {n_eval} and set aside {n_corpus}")
    group = {p: "valid" for p in personas[:n_eval]}
    group.update({p: "corpus" for p in personas[n_eval : n_eval + n_corpus]})
    group.update({p: "train" for p in personas[n_eval + n_corpus :]})
    out: dict[str, list[DialogueExample]] = {"train": [], "valid": [], "corpus": []}
    for e in examples:
        out[group[e.persona]].append(e)
    return out


def standin_corpus(corpus_rows: list[DialogueExample]) -> list[dict]:
    """One passage per distinct sentence of the corpus personas, in first-seen order."""
    seen: dict[str, None] = {}
    for e in corpus_rows:
        for s in persona_sentences(e.persona):
            seen.setdefault(s, None)
    return [
        {"id": f"standin-persona-{i}", "title": "", "text": s, "source": "stand-in"}
        for i, s in enumerate(seen)
    ]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _row(e: DialogueExample) -> dict:
    return {"question": e.question, "answers": list(e.answers)}


def build_reader(out: Path, texts: list[str], opts: PrepareOptions):
    """A randomly initialised T5 sized by ``opts`` and its tokenizer trained on ``texts``."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from alignment.persona.vocab import train_t5_tokenizer

    tokenizer = train_t5_tokenizer(texts, out, opts.vocab_size, seed_text=PROMPT_TEXT)
    torch.manual_seed(opts.seed)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=opts.d_model, d_kv=opts.d_model // opts.num_heads, d_ff=opts.d_ff,
        num_layers=opts.num_layers, num_decoder_layers=opts.num_layers, num_heads=opts.num_heads,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))  # fmt: skip
    # transformers draws an untied head at std 1 (Mesh TensorFlow's scale, meant for the tied head whose
    # input T5 rescales by d_model^-0.5): logits of std √d_model start the loss near 45 nats and SFT
    # crawls. At std d_model^-0.5 the logits start at std ~1, the loss near ln V.
    torch.nn.init.normal_(
        t5.lm_head.weight, std=opts.d_model**-0.5, generator=torch.Generator().manual_seed(opts.seed)
    )
    t5.generation_config.max_length = None
    t5.save_pretrained(out)
    return tokenizer, sum(p.numel() for p in t5.parameters())


def prepare(data: str | Path, out: str | Path = DEFAULT_OUT, passages: str | Path | None = None,
            opts: PrepareOptions | None = None) -> dict:  # fmt: skip
    """Write the splits, the corpus (``passages`` or the stand-in) and the reader into ``out``;
    returns what PREPARED.json records."""
    from alignment.persona.vocab import unk_rate

    opts = opts or PrepareOptions()
    out = Path(out)
    examples = load_examples(data)
    corpus = load_passages(passages) if passages else None  # checked before anything is written
    split = split_personas(examples, opts, with_corpus=corpus is None)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        write_text(out / "data" / f"{name}.jsonl", _jsonl([_row(e) for e in split[name]]))
    if corpus is None:
        rows = standin_corpus(split["corpus"])
        write_text(out / "data" / STANDIN_FILE, _jsonl(rows))
        corpus_file, corpus_note = out / "data" / STANDIN_FILE, (
            f"STAND-IN: {len(rows)} persona sentences of {len({e.persona for e in split['corpus']})} personas "
            "used nowhere else; not LAPDOG's story corpus"
        )  # fmt: skip
        logger.warning("no --passages: the corpus is a stand-in (%s)", corpus_note)
    else:
        corpus_file = out / "data" / "passages.jsonl"
        shutil.copyfile(passages, corpus_file)
        rows = [{"title": p.title, "text": p.text} for p in corpus]
        corpus_note = f"{passages} ({len(rows)} passages)"
    texts = [e.question for e in split["train"]] + [a for e in split["train"] for a in e.answers]
    texts += [f"{r['title']} {r['text']}".strip() for r in rows]
    tokenizer, n_params = build_reader(out / "reader", texts, opts)
    held_out = [e.question for e in split["valid"]] + [a for e in split["valid"] for a in e.answers]
    rate = unk_rate(tokenizer, held_out)
    valid_sentences = {s for e in split["valid"] for s in persona_sentences(e.persona)}
    train_sentences = {s for e in split["train"] for s in persona_sentences(e.persona)}
    report = {
        "source": str(data),
        "options": asdict(opts),
        "rows": {k: len(v) for k, v in split.items()},
        "personas": {k: len({e.persona for e in v}) for k, v in split.items()},
        "held_out_persona_sentences_also_in_train": f"{len(valid_sentences & train_sentences)} of "
        f"{len(valid_sentences)}",
        "passages": str(corpus_file),
        "corpus": corpus_note,
        "reader": {
            "path": str(out / "reader"),
            "parameters": n_params,
            "vocab": len(tokenizer),
            "held_out_unk_fraction": round(rate.fraction, 6),
        },  # fmt: skip
    }
    write_text(out / "PREPARED.json", json.dumps(report, indent=2) + "\n")
    logger.info("prepared %s: %s", out, json.dumps(report["rows"]))
    return report


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, help="LAPDOG-format dialogue rows (jsonl: question, answers)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    p.add_argument("--passages", default=None, help="LAPDOG's story corpus, if you have it (else a stand-in)")
    defaults = PrepareOptions()
    for f in fields(PrepareOptions):
        value = getattr(defaults, f.name)
        p.add_argument(f"--{f.name}", type=type(value), default=value, help=f.metadata["help"])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = PrepareOptions(**{k: getattr(a, k) for k in asdict(defaults)})
    print(json.dumps(prepare(a.data, a.out, a.passages, opts), indent=2))
    return 0


if __name__ == "__main__":
    cli.run(main)
