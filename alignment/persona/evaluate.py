"""Greedy evaluation on the eval rows: EM, F1, ROUGE-L, BLEU, distinct-1/2, the mean reward, and
(when a reference is given) the KL of the policy to it; plus example dialogues for the log.

``eval/sampled_reward`` is the mean reward of one response per row sampled as RL samples
(``sampling_temperature``, ``sampling_top_p``) from a generator seeded with the run's seed, so
it does not disturb training's random state and is the same draw at every evaluation: the RL
objective itself, on held-out rows.

``eval/kl_to_reference`` is the mean over the greedy responses' tokens of the exact
KL(π‖ref) between the two models' sampling distributions (``sampling_temperature``, special
tokens banned; no nucleus cut) at each position: what GRPO's β·KL term regularises, measured the
same way for every algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from alignment.persona.data import DialogueExample
from alignment.persona.pipeline import Pipeline
from alignment.persona.reader import response_mask
from alignment.persona.reward import distinct_n, exact_match, mean_components
from alignment.persona.sampler import sample_responses
from alignment.pg import exact_kl, sampling_logits


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)  # the first dialogues, for the examples log


@torch.no_grad()
def _kl_sum(pipe: Pipeline, reference: nn.Module, ids, mask, tokens) -> tuple[float, float]:
    keep = response_mask(tokens, pipe.reader_tokenizer.eos_token_id)
    temp = pipe.cfg.sampling_temperature
    pol = sampling_logits(pipe.reader(ids, mask, tokens), temp, 1.0, pipe.banned)[0]
    ref = sampling_logits(reference(ids, mask, tokens), temp, 1.0, pipe.banned)[0]
    kl = exact_kl(pol, ref)
    return float((kl * keep).sum()), float(keep.sum())


@torch.no_grad()
def evaluate(
    pipe: Pipeline,
    examples: Sequence[DialogueExample],
    batch_size: int,
    reference: nn.Module | None = None,
    num_records: int = 5,
) -> EvalResult:
    """Greedy responses to ``examples`` with the reader's top-``n_context`` retrieved passages."""
    was_training = pipe.reader.training
    pipe.reader.eval()
    texts, scores, ems, records, sampled = [], [], [], [], []
    kl_sum, kl_tokens, resp_tokens = 0.0, 0.0, 0.0
    cfg = pipe.cfg
    generator = torch.Generator(device=pipe.device).manual_seed(cfg.seed)
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="evaluating", leave=False, disable=len(starts) < 4):
        batch = examples[start : start + batch_size]
        passages = pipe.retrieve(batch, pipe.cfg.n_context)
        tokens = pipe.greedy_tokens(batch, passages)
        batch_texts = pipe.decode(tokens)
        batch_scores = pipe.score(batch_texts, batch)
        resp_tokens += float(response_mask(tokens, pipe.reader_tokenizer.eos_token_id).sum())
        ids, mask = pipe.reader_inputs(batch, passages)
        samples = sample_responses(pipe.reader, pipe.reader.encode(ids, mask), 1, cfg.generation_max_length,
                                   cfg.sampling_temperature, cfg.sampling_top_p, pipe.banned, generator)  # fmt: skip
        sampled.extend(s.reward for s in pipe.score(pipe.decode(samples.tokens), batch))
        if reference is not None:
            s, n = _kl_sum(pipe, reference, ids, mask, tokens)
            kl_sum, kl_tokens = kl_sum + s, kl_tokens + n
        for example, ps, text, score in zip(batch, passages, batch_texts, batch_scores, strict=True):
            ems.append(exact_match(text, example.answers))
            if len(records) < num_records:
                records.append({"source": example.source, "persona": example.persona, "context": example.context,
                                "passages": [{"id": p.id, "title": p.title, "text": p.text} for p in ps],
                                "gold": example.answers[0],
                                "response": text, "reward": score.reward})  # fmt: skip
        texts.extend(batch_texts)
        scores.extend(batch_scores)
    pipe.reader.train(was_training)
    means = mean_components(scores)
    metrics = {
        "eval/em": sum(ems) / len(ems),
        "eval/f1": means["f1"],
        "eval/rouge_l": means["rouge_l"],
        "eval/bleu": means["bleu"],
        "eval/reward": means["reward"],
        "eval/sampled_reward": sum(sampled) / len(sampled),
        "eval/distinct_1": distinct_n(texts, 1),
        "eval/distinct_2": distinct_n(texts, 2),
        "eval/response_tokens": resp_tokens / len(texts),
    }
    if reference is not None:
        metrics["eval/kl_to_reference"] = kl_sum / max(kl_tokens, 1.0)
    return EvalResult(metrics, records)


def format_records(step: int, records: Sequence[dict]) -> str:
    """Example dialogues as plain text (for ``examples.log`` and TensorBoard), each retrieved
    passage the reader read with its id, title and text."""
    lines = [f"=== step {step} ==="]
    for r in records:
        lines += [f"[{r['source']}]", f"persona:   {r['persona']}", f"context:   {r['context']}", "passages:"]
        for p in r["passages"]:
            title = f"{p['title']}: " if p["title"] else ""
            lines.append(f"  [{p['id']}] {title}{p['text']}")
        lines += [f"gold:      {r['gold']}", f"response:  {r['response']}   (reward {r['reward']:.3f})", ""]
    return "\n".join(lines)
