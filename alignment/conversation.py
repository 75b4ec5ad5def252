"""The Beaver / safe-rlhf conversation template: the one place that knows its text.

Every engine that generates, every trainer that builds prompts and the scorer that builds the text a
reward or cost model reads go through these functions, so the policy is trained and scored on
exactly the layout the Beaver models were trained on:

    BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}</s>
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"
PROMPT_INPUT = PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT

# A policy that was never taught to end its turn writes the next user turn itself (the published
# Alpaca outputs do so in 2,126 of 3,036 answers); generation stops at whichever marker comes first.
STOP_MARKERS: tuple[str, ...] = ("USER:", "ASSISTANT:", "BEGINNING OF CONVERSATION:")


def prompt_text(prompt: str) -> str:
    """The text a policy is given to answer ``prompt``; the response follows it directly."""
    return PROMPT_INPUT.format(input=prompt)


def scoring_text(prompt: str, response: str, eos_token: str = "") -> str:
    """The text a Beaver reward or cost model scores: prompt, response and end-of-sequence token.

    The score is read at the last token, so the EOS token marks the end of the answer as it did in
    the score models' training data.
    """
    return prompt_text(prompt) + response + eos_token


def scoring_texts(prompts: Sequence[str], responses: Sequence[str], eos_token: str = "") -> list[str]:
    """:func:`scoring_text` over aligned lists; raises ``ValueError`` if their lengths differ."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length: {len(prompts)} != {len(responses)}")
    return [scoring_text(p, r, eos_token) for p, r in zip(prompts, responses, strict=True)]


def truncate_at_stop(response: str, stop_markers: Sequence[str] = STOP_MARKERS) -> str:
    """Cut ``response`` at the first stop marker (exclusive) and strip trailing whitespace.

    Engines stop generation at these markers, but a stop string can be produced across token
    boundaries, so every generated text also goes through this function.
    """
    cut = len(response)
    for marker in stop_markers:
        idx = response.find(marker)
        if idx != -1:
            cut = min(cut, idx)
    return response[:cut].rstrip()


class GumbelNoise:
    """A logits processor that turns greedy decoding into sampling with its own ``torch.Generator``.

    argmax(scores + G) with G i.i.d. standard Gumbel is an exact sample of softmax(scores), so
    ``generate(do_sample=False)`` with this processor last samples without touching torch's global
    RNG (HF ``generate`` takes no generator: its sampler calls ``torch.multinomial`` on the global
    one, which every thread shares and reseeds).
    """

    def __init__(self, generator) -> None:
        self.generator = generator

    def __call__(self, input_ids, scores):
        """``scores``: (batch, vocab) float logits after the warpers; -inf entries stay impossible."""
        import torch

        u = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        u.clamp_(min=torch.finfo(torch.float32).tiny)
        return scores - torch.log(-torch.log(u)).to(scores.dtype)


def seeded_sampling(temperature: float, top_p: float, generator):
    """HF's own temperature and top-p warpers, then :class:`GumbelNoise` from ``generator``: pass as
    ``logits_processor`` to ``generate(do_sample=False)`` to sample softmax(logits / T) within the
    top-p nucleus, as the vLLM engine does (sampling settings of the model's generation config, such
    as top_k, are not applied)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    processors = [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*processors, GumbelNoise(generator)])


_STOP_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {markers: criteria}
_STOP_CRITERIA_LOCK = threading.Lock()


def stop_criteria(tokenizer, stop_markers: Sequence[str] = STOP_MARKERS, device: object = "cpu"):
    """transformers' ``StopStringCriteria`` for ``stop_markers``, built once per tokenizer and device.

    ``generate(stop_strings=...)`` builds it on every call by scanning the whole vocabulary, and its
    own cache never hits for a fast tokenizer (``get_vocab()`` comes back in another order each
    time, and the order is part of the key): ~6 ms of CPU per call with the toy's 449 tokens, 15-20 %
    of a toy ES member's generation, and ~70x that with a 32K vocabulary. It holds no state between
    calls but the device its tables were moved to, so one object serves every call on ``device``.
    """
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    markers = (tuple(stop_markers), str(device))
    with _STOP_CRITERIA_LOCK:
        try:
            per_tokenizer = _STOP_CRITERIA.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer that cannot be weakly referenced: build it each time
            per_tokenizer = {}
        if markers not in per_tokenizer:
            per_tokenizer[markers] = StopStringCriteria(tokenizer, list(markers[0]))
        return StoppingCriteriaList([per_tokenizer[markers]])


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    stop_markers: Sequence[str] = STOP_MARKERS,
) -> list[str]:
    """Answers of a Hugging Face causal LM to raw prompts, in the template, cut at the next turn.

    Left-padded batches of ``batch_size``; greedy when ``temperature <= 0``, else sampling seeded
    with ``seed + start`` for the batch starting at prompt ``start``, from a generator of this call
    (:func:`seeded_sampling`), so engines sampling in several threads at once stay reproducible.
    Shared by the ES transformers engine and the GRPO evaluation so both answer the same way.
    """
    import torch

    tokenizer.padding_side = "left"
    greedy = temperature <= 0
    out: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_text(p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        processors = None
        if not greedy:
            generator = torch.Generator(device=device).manual_seed(seed + start)
            processors = seeded_sampling(temperature, top_p, generator)
        with torch.inference_mode():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                logits_processor=processors,
                stopping_criteria=stop_criteria(tokenizer, stop_markers, device),
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [truncate_at_stop(t, stop_markers) for t in texts]
    return out
