"""The bi-encoder and the passage index: mean pooling, exact top-k, an index saved and reused, and a
toy task in which the answer's fact lives only in the retrieved passage."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from alignment.cli import UserError
from alignment.persona.data import Passage, format_passage, load_examples, load_passages, retrieval_query
from alignment.persona.index import PassageIndex, load_index, load_or_build_index
from alignment.persona.retriever import Retriever, encode_texts, mean_pool, tokenize
from alignment.persona.toy import COLOURS, RETRIEVER_FORMAT


@pytest.fixture(scope="module")
def retriever(persona_toy):
    return Retriever.from_pretrained(persona_toy / "retriever").eval(), AutoTokenizer.from_pretrained(
        persona_toy / "retriever"
    )


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_forward_scores_queries_against_their_own_passages(retriever):
    model, tok = retriever
    queries = ["i love bado stories .", "i have a dog ."]
    passages = ["in the bado story everything is red .", "a dog", "the cat", "i love dogs", "red", "blue"]
    enc = tokenize(tok, queries + passages, 64)
    with torch.no_grad():
        scores = model(enc["input_ids"], enc["attention_mask"], num_queries=2)
    q = encode_texts(model, tok, queries, 64)
    p = encode_texts(model, tok, passages, 64).view(2, 3, -1)
    expected = torch.einsum("bd,bkd->bk", q, p) / math.sqrt(model.dim)
    # one padded batch vs two: the attention sums run over different padded lengths (float noise only)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_index_search_is_exact_top_k():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 8, generator=gen)
    index = PassageIndex(emb, [Passage(str(i), f"t{i}") for i in range(50)], "fp")
    queries = torch.randn(3, 8, generator=gen)
    scores, rows = index.search(queries, 5)
    brute = queries @ emb.T
    for b in range(3):
        assert rows[b].tolist() == brute[b].argsort(descending=True)[:5].tolist()
        torch.testing.assert_close(scores[b], brute[b][rows[b]])
    assert [p.id for p in index.lookup(rows[:1])[0]] == [str(int(r)) for r in rows[0]]
    with pytest.raises(ValueError, match="k must be in 1..50"):
        index.search(queries, 51)
    with pytest.raises(ValueError, match="do not match"):
        PassageIndex(emb[:3], [Passage("a", "x")], "fp")


def test_faiss_mode_agrees_with_flat_or_says_what_is_missing():
    emb = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    passages = [Passage(str(i), "t") for i in range(20)]
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install faiss-cpu"):
            PassageIndex(emb, passages, "fp", mode="faiss")
        return
    q = torch.randn(2, 4)
    flat, fs = PassageIndex(emb, passages, "fp"), PassageIndex(emb, passages, "fp", mode="faiss")
    assert torch.equal(flat.search(q, 3)[1], fs.search(q, 3)[1])


def test_index_saved_reused_and_rebuilt_for_another_retriever(retriever, persona_toy, tmp_path):
    model, tok = retriever
    passages = load_passages(persona_toy / "data" / "passages.jsonl")
    first = load_or_build_index(tmp_path, model, tok, passages, RETRIEVER_FORMAT, 64)
    folder = tmp_path / first.fingerprint[:32]
    stamp = (folder / "embeddings.safetensors").stat().st_mtime_ns
    again = load_or_build_index(tmp_path, model, tok, passages, RETRIEVER_FORMAT, 64, build=False)
    assert torch.equal(again.embeddings, first.embeddings)
    assert (folder / "embeddings.safetensors").stat().st_mtime_ns == stamp  # read, not rewritten
    texts = [format_passage(p, RETRIEVER_FORMAT) for p in passages]
    torch.testing.assert_close(first.embeddings, encode_texts(model, tok, texts, 64, batch_size=7))
    with pytest.raises(ValueError, match="does not belong"):
        load_index(tmp_path, first.fingerprint, passages[::-1])
    other = Retriever.from_pretrained(persona_toy / "retriever")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(FileNotFoundError, match="no saved index"):
        load_or_build_index(tmp_path, other, tok, passages, RETRIEVER_FORMAT, 64, build=False)
    rebuilt = load_or_build_index(tmp_path, other, tok, passages, RETRIEVER_FORMAT, 64)
    assert rebuilt.fingerprint != first.fingerprint and len(list(tmp_path.iterdir())) == 2


def test_toy_task_needs_retrieval(retriever, persona_toy):
    """The colour in a gold reply is nowhere in its question, only in the keyword's story; the
    pre-trained toy retriever finds that story from the persona for most held-out rows."""
    model, tok = retriever
    passages = load_passages(persona_toy / "data" / "passages.jsonl")
    by_title = {p.title: p for p in passages}
    index = load_or_build_index(None, model, tok, passages, RETRIEVER_FORMAT, 64)
    for split in ("train", "valid"):
        rows = load_examples(persona_toy / "data" / f"{split}.jsonl")
        for row in rows:
            (colour,) = [w for w in row.answers[0].split() if w in COLOURS]
            (keyword,) = [w for w in row.persona.split() if w in by_title]
            assert colour not in row.question.split()
            assert colour in by_title[keyword].text.split()
    queries = encode_texts(model, tok, [retrieval_query(r, "persona") for r in rows], 64)
    _, top = index.search(queries, 1)
    hits = sum(passages[int(t)].title in r.persona.split() for r, t in zip(rows, top[:, 0], strict=True))
    assert hits / len(rows) >= 0.6, hits / len(rows)  # held-out keywords: chance is 1/224
    train_kw = {w for r in load_examples(persona_toy / "data" / "train.jsonl") for w in r.persona.split()}
    assert not {w for r in rows for w in r.persona.split() if w in by_title} & train_kw
