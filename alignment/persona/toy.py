"""Tiny local models and a synthetic persona task in which retrieval matters (no hub, seconds).

    python -m alignment.persona.toy                 # into models/toy/persona, where `make demo` builds it

Writes::

    reader/      T5ForConditionalGeneration (d_model 64) + a word-level tokenizer with T5's special
                 ids (pad 0, eos 1, unk 2, then <extra_id_0..3>)
    retriever/   BertModel (hidden 64) + its own word-level tokenizer ([PAD] 0, [UNK], [CLS], [SEP])
    data/        train.jsonl, valid.jsonl (LAPDOG rows), passages.jsonl (the story corpus)
    BUILD.json

The task: every persona loves the stories of one invented keyword ("i love bado stories ."); the
corpus holds one story per keyword, and only that story names the keyword's colour ("in the bado
story everything is teal ."). The gold reply to the last question mentions that colour, so a
reader can only answer right by reading the right passage, and a retriever by finding it from
the persona. Train and valid use disjoint keywords: the held-out colours cannot be memorised.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from alignment import cli
from alignment.atomic import write_text

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
DEFAULT_OUT = "models/toy/persona"  # where `make demo` (alignment.persona.demo) builds it too
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey",
           "gold", "teal", "silver", "violet", "amber")  # fmt: skip
DISTRACTORS = ("i have a dog .", "i work at night .", "i live in a big city .", "i like to swim .",
               "my mother is a nurse .", "i drive a small car .", "i play the guitar .", "i hate mornings .")  # fmt: skip
CHAT = ("hello , how are you ?", "i am fine , thanks .", "what do you do for fun ?", "i read a lot .",
        "nice to meet you .", "do you have pets ?")  # fmt: skip
QUESTIONS = (
    ("what colour do you like ?", "i like {colour} ."),
    ("tell me about your story .", "my story is all {colour} ."),
    ("what is your favourite thing ?", "the colour {colour} , of course ."),
)
QA_PROMPT = "dialog with R's persona: {question} R: <extra_id_0>"
ENCODER_FORMAT = "{query} story title: {title} story: {text}"
RETRIEVER_FORMAT = "{title} {text}"


def keywords(n: int, seed: int) -> list[str]:
    """``n`` distinct invented consonant-vowel words (``bado``, ``kire``, ...)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
        if word not in out:
            out.append(word)
    return out


def passage_text(keyword: str, colour: str) -> str:
    return f"in the {keyword} story everything is {colour} ."


def make_task(seed: int = 0, n_train_kw: int = 200, n_valid_kw: int = 24, per_train_kw: int = 2,
              per_valid_kw: int = 3) -> dict[str, list[dict]]:  # fmt: skip
    """The rows of ``train``, ``valid`` and ``passages`` (LAPDOG's formats).

    Many keywords with few rows each: memorising keyword → colour is then harder for the reader
    than copying the colour from the passage, which is what carries over to held-out keywords.
    """
    rng = random.Random(seed)
    kws = keywords(n_train_kw + n_valid_kw, seed)
    colour = {kw: rng.choice(COLOURS) for kw in kws}
    passages = [
        {"id": f"story-{i}", "title": kw, "text": passage_text(kw, colour[kw])} for i, kw in enumerate(kws)
    ]

    def rows(kw_list: list[str], per_kw: int) -> list[dict]:
        out = []
        for kw in kw_list:
            for _ in range(per_kw):
                persona = [f"i love {kw} stories .", *rng.sample(DISTRACTORS, 2)]
                rng.shuffle(persona)
                turns = rng.sample(CHAT, rng.randint(0, 2))
                question, answer = rng.choice(QUESTIONS)
                spoken = [*turns, question]
                # the last turn is the partner's (Q); earlier turns alternate backwards
                tagged = [
                    ("Q: " if (len(spoken) - 1 - i) % 2 == 0 else "R: ") + t for i, t in enumerate(spoken)
                ]
                out.append({
                    "question": f"persona: {' '.join(persona)} context:  {' '.join(tagged)}",
                    "answers": [answer.format(colour=colour[kw])],
                })  # fmt: skip
        rng.shuffle(out)
        return out

    return {"train": rows(kws[:n_train_kw], per_train_kw), "valid": rows(kws[n_train_kw:], per_valid_kw),
            "passages": passages}  # fmt: skip


def _corpus(task: dict[str, list[dict]]) -> list[str]:
    texts = [QA_PROMPT, ENCODER_FORMAT, "persona context q r story title"]
    texts += [r["question"] + " " + " ".join(r["answers"]) for r in task["train"] + task["valid"]]
    texts += [p["title"] + " " + p["text"] for p in task["passages"]]
    return texts


def build_word_tokenizer(corpus: list[str], specials: list[str], template: str, **special_names):
    """A lower-casing word-level tokenizer whose ids start with ``specials`` in order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unk = special_names["unk_token"]
    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **special_names)


def pretrain_retriever(
    bert, tokenizer, words: list[str], seed: int, steps: int = 120, batch: int = 32
) -> None:
    """Contrastive pre-training (in-batch negatives) on persona/story pairs of ``words``: the toy's
    stand-in for Contriever's unsupervised pre-training. It learns to match a persona's rare word
    with a story's, which carries over to the held-out keywords it never saw."""
    import torch

    from alignment.persona.retriever import Retriever, tokenize

    rng = random.Random(seed)
    model = Retriever(bert)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        picked = rng.sample(words, batch)
        queries = [
            " ".join(rng.sample([f"i love {w} stories .", *rng.sample(DISTRACTORS, 2)], 3)) for w in picked
        ]
        stories = [f"{w} {passage_text(w, rng.choice(COLOURS))}" for w in picked]
        emb = model.embed(**tokenize(tokenizer, queries + stories, 64))
        loss = torch.nn.functional.cross_entropy(emb[:batch] @ emb[batch:].T, torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_models(out: Path, corpus: list[str], seed: int, pretrain_words: list[str]) -> None:
    import torch
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    extra = [f"<extra_id_{i}>" for i in range(4)]
    t5_tok = build_word_tokenizer(corpus, ["<pad>", "</s>", "<unk>", *extra], "$A </s>", pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>", additional_special_tokens=extra)  # fmt: skip
    assert (t5_tok.pad_token_id, t5_tok.eos_token_id, t5_tok.unk_token_id) == (0, 1, 2)
    torch.manual_seed(seed)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(t5_tok), d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, relative_attention_num_buckets=16, relative_attention_max_distance=64,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip
    t5.generation_config.max_length = None
    t5.save_pretrained(out / "reader")
    t5_tok.save_pretrained(out / "reader")

    bert_specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    bert_tok = build_word_tokenizer(corpus, bert_specials, "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                    cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    torch.manual_seed(seed + 1)
    bert = BertModel(BertConfig(
        vocab_size=len(bert_tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    ))  # fmt: skip
    pretrain_retriever(bert, bert_tok, pretrain_words, seed)
    bert.save_pretrained(out / "retriever")
    bert_tok.save_pretrained(out / "retriever")


def _is_current(out: Path, seed: int) -> bool:
    try:
        build = json.loads((out / "BUILD.json").read_text())
    except (OSError, ValueError):
        return False
    return build.get("version") == BUILD_VERSION and build.get("seed") == seed


def build_persona_toy(out: str | Path = DEFAULT_OUT, seed: int = 0, force: bool = False) -> Path:
    """Build everything into ``out`` (kept when an up-to-date build is there); returns ``out``."""
    out = Path(out)
    if not force and _is_current(out, seed):
        return out
    task = make_task(seed)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "passages"):
        write_text(out / "data" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in task[name]))
    held_out = {p["title"] for p in task["passages"]} - {
        w for r in task["train"] for w in r["question"].split()
    }
    words = sorted({w for t in _corpus(task) for w in t.split() if w.isalpha() and w not in held_out})
    build_models(out, _corpus(task), seed, words)
    report = {"version": BUILD_VERSION, "seed": seed, **{k: len(v) for k, v in task.items()}}
    write_text(out / "BUILD.json", json.dumps(report, indent=2) + "\n")
    logger.info("persona toy built in %s: %s", out, report)
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, help="folder to build into (make demo builds the same one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task and the models")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date build is there")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build_persona_toy(a.out, a.seed, a.force))
    return 0


if __name__ == "__main__":
    cli.run(main)
