"""Retrieve-then-read for a batch of dialogue rows: what the training steps and the evaluation share.

:class:`Pipeline` holds the (unwrapped) reader and retriever, their tokenizers, the passage index
and the options; it turns rows into retrieved passages, reader inputs [B, K, L], targets, greedy
responses and per-passage rewards. Everything here runs without gradients except
:meth:`Pipeline.retriever_inputs`, which only tokenises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignment.persona.config import PersonaConfig
from alignment.persona.data import DialogueExample, Passage, format_passage, reader_query, retrieval_query
from alignment.persona.index import PassageIndex
from alignment.persona.reader import FiDReader, banned_ids, tokenize_fid, tokenize_targets
from alignment.persona.retriever import Retriever, encode_texts, tokenize
from alignment.persona.reward import RewardScore, score_batch

BERT_MAX_LENGTH = 512


@dataclass
class Pipeline:
    cfg: PersonaConfig
    reader: FiDReader
    retriever: Retriever
    reader_tokenizer: object
    retriever_tokenizer: object
    index: PassageIndex
    device: torch.device

    def __post_init__(self) -> None:
        self.banned = banned_ids(self.reader_tokenizer)
        self.weights = self.cfg.reward_weights()
        # a frozen retriever embeds a query text the same way every time: embed each text once
        # (LAPDOG rows repeat their persona in every turn, so retrieving by persona repeats a lot)
        self._query_cache: dict[str, torch.Tensor] | None = None if self.cfg.train_retriever else {}

    @property
    def retriever_max_length(self) -> int:
        return min(self.cfg.text_maxlength, BERT_MAX_LENGTH)

    @torch.no_grad()
    def retrieve(self, examples: Sequence[DialogueExample], k: int) -> list[list[Passage]]:
        """The top-``k`` passages of each row, by the retriever's current query embedding."""
        queries = [retrieval_query(e, self.cfg.retriever_from) for e in examples]
        cache = self._query_cache
        if cache is None:
            emb = encode_texts(self.retriever, self.retriever_tokenizer, queries, self.retriever_max_length)
        else:
            new = list(dict.fromkeys(q for q in queries if q not in cache))
            if new:
                # one text per forward: its embedding is then a function of the text alone, not of
                # the padding of whichever batch first held it (a resumed run retrieves the same)
                fresh = encode_texts(
                    self.retriever, self.retriever_tokenizer, new, self.retriever_max_length, 1
                )
                cache.update(zip(new, fresh, strict=True))
            emb = torch.stack([cache[q] for q in queries])
        _, rows = self.index.search(emb, k)
        return self.index.lookup(rows)

    def reader_inputs(
        self, examples: Sequence[DialogueExample], passages: Sequence[Sequence[Passage]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, K, L] of each row's query with each of its passages."""
        queries = [reader_query(e, self.cfg.qa_prompt_format) for e in examples]
        return tokenize_fid(
            self.reader_tokenizer,
            queries,
            passages,
            self.cfg.encoder_format,
            self.cfg.text_maxlength,
            self.device,
        )

    def targets(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ids and mask [B, T] of gold texts (EOS-terminated, truncated to target_maxlength)."""
        return tokenize_targets(self.reader_tokenizer, texts, self.cfg.target_maxlength, self.device)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return self.reader_tokenizer.batch_decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def greedy_tokens(
        self, examples: Sequence[DialogueExample], passages: Sequence[Sequence[Passage]]
    ) -> torch.Tensor:
        """Greedy response ids [B, T] (pad after EOS), in eval mode."""
        ids, mask = self.reader_inputs(examples, passages)
        was_training = self.reader.training
        self.reader.eval()
        out = self.reader.greedy(ids, mask, self.cfg.generation_max_length, self.banned)
        self.reader.train(was_training)
        return out

    def score(
        self, texts: Sequence[str], examples: Sequence[DialogueExample], repeats: int = 1
    ) -> list[RewardScore]:
        """Rewards of ``texts`` (``repeats`` consecutive responses per row) against the rows' answers."""
        answers = [e.answers for e in examples for _ in range(repeats)]
        return score_batch(texts, answers, self.weights)

    @torch.no_grad()
    def passage_rewards(
        self, examples: Sequence[DialogueExample], passages: Sequence[Sequence[Passage]]
    ) -> tuple[torch.Tensor, list[RewardScore]]:
        """LAPDOG's distillation target: the reward of the greedy response given each passage alone.

        Returns rewards [B, K] and the scores (row-major) for logging."""
        k = len(passages[0])
        flat_examples = [e for e in examples for _ in range(k)]
        flat_passages = [[p] for ps in passages for p in ps]
        texts = self.decode(self.greedy_tokens(flat_examples, flat_passages))
        scores = self.score(texts, flat_examples)
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)
        return rewards.view(len(examples), k), scores

    def retriever_inputs(
        self, examples: Sequence[DialogueExample], passages: Sequence[Sequence[Passage]]
    ) -> dict[str, torch.Tensor]:
        """Tokens of the B queries followed by their B·K passages (for :meth:`Retriever.forward`)."""
        queries = [retrieval_query(e, self.cfg.retriever_from) for e in examples]
        texts = queries + [format_passage(p, self.cfg.retriever_format) for ps in passages for p in ps]
        return tokenize(self.retriever_tokenizer, texts, self.retriever_max_length, self.device)
