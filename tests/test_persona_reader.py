"""The T5 Fusion-in-Decoder reader and the sampler: fused encodings, greedy decoding, and log-probs in
the losses equal to those of the distribution that was sampled, on the tokens that were sampled."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from transformers.modeling_outputs import BaseModelOutput

from alignment.persona.data import Passage
from alignment.persona.reader import (
    FiDReader,
    banned_ids,
    response_mask,
    sft_loss,
    tokenize_fid,
    tokenize_targets,
)
from alignment.persona.sampler import response_logprobs, sample_responses, sampled_logits
from alignment.persona.toy import ENCODER_FORMAT
from alignment.pg import sampling_logits

QUERIES = ["dialog with R's persona: persona: i love bado stories . context: Q: what colour do you like ? R:",
           "dialog with R's persona: persona: i have a dog . context: Q: hello , how are you ? R:"]  # fmt: skip
PASSAGES = [[Passage("1", "in the bado story everything is red .", "bado"), Passage("2", "i like to swim .")],
            [Passage("3", "nice to meet you .", "x"), Passage("4", "in the story everything is blue .")]]  # fmt: skip


@pytest.fixture(scope="module")
def reader(persona_toy):
    torch.manual_seed(0)
    model = FiDReader.from_pretrained(persona_toy / "reader").eval()
    with torch.no_grad():  # a random reader spreads its probability: more for the sampler tests to see
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, AutoTokenizer.from_pretrained(persona_toy / "reader")


def test_special_ids_are_t5s(reader):
    _, tok = reader
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("i like red .")["input_ids"][-1] == 1  # T5 appends EOS
    assert 1 not in banned_ids(tok) and {0, 2} <= set(banned_ids(tok))


def test_fid_encodes_each_passage_alone_and_concatenates(reader):
    model, tok = reader
    ids, mask = tokenize_fid(tok, QUERIES, PASSAGES, ENCODER_FORMAT, 64)
    assert ids.shape[:2] == (2, 2)
    with torch.no_grad():
        fused = model.encode(ids, mask)
        length = ids.shape[2]
        for b in range(2):
            for k in range(2):
                alone = model.t5.get_encoder()(input_ids=ids[b, k : k + 1], attention_mask=mask[b, k : k + 1])
                part = fused.hidden[b : b + 1, k * length : (k + 1) * length]
                # one row vs a batch of four: matmul blocking differs in the last bits only
                torch.testing.assert_close(part, alone.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.mask, mask.reshape(2, -1))


def test_single_passage_fid_is_plain_t5_and_sft_loss_is_its_cross_entropy(reader):
    model, tok = reader
    ids, mask = tokenize_fid(tok, QUERIES, [[p[0]] for p in PASSAGES], ENCODER_FORMAT, 64)
    targets, tmask = tokenize_targets(tok, ["i like red .", "hello"], 16)
    with torch.no_grad():
        logits = model(ids, mask, targets)
        plain = model.t5(
            input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=targets.masked_fill(~tmask, -100)
        )
    torch.testing.assert_close(logits, plain.logits)
    torch.testing.assert_close(sft_loss(logits, targets, tmask), plain.loss)


def test_greedy_is_the_argmax_of_its_own_teacher_forced_logits(reader):
    model, tok = reader
    ids, mask = tokenize_fid(tok, QUERIES, PASSAGES, ENCODER_FORMAT, 64)
    ban = banned_ids(tok)
    out = model.greedy(ids, mask, 8, ban)
    keep = response_mask(out, tok.eos_token_id)
    with torch.no_grad():
        logits = model(ids, mask, out)
    logits[..., ban] = float("-inf")
    assert torch.equal(logits.argmax(-1)[keep], out[keep])
    assert not torch.isin(out[keep], torch.tensor(ban)).any()


def test_response_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    assert response_mask(tokens, 1).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_loss_logprobs_are_the_sampled_distributions_on_the_sampled_tokens(reader, temperature, top_p):
    model, tok = reader
    ids, mask = tokenize_fid(tok, QUERIES, PASSAGES, ENCODER_FORMAT, 64)
    ban = banned_ids(tok)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        samples = sample_responses(model, model.encode(ids, mask), 3, 10, temperature, top_p, ban, gen)
    n, t = samples.tokens.shape
    assert n == 6 and samples.mask.sum() > n  # several tokens per response
    assert (samples.keep is None) == (top_p == 1.0)
    assert torch.equal(samples.mask, response_mask(samples.tokens, tok.eos_token_id))
    assert (samples.tokens[~samples.mask] == tok.pad_token_id).all()
    dist = sampled_logits(model(ids, mask, samples.tokens, repeats=3), samples, temperature, top_p, ban)
    logp = response_logprobs(dist, samples)
    # incremental decoding with a key/value cache vs one teacher-forced pass: summation order only
    torch.testing.assert_close(logp, samples.logprobs, rtol=1e-5, atol=1e-5)
    # ≤ 0, not < 0: a token alone in its nucleus (top_p < 1) has probability exactly 1
    assert torch.isfinite(logp).all() and (logp[samples.mask] <= 0).all()
    # the rebuilt distribution is the sampled one: tempered, special ids out, nucleus as recorded
    support = torch.isfinite(dist)
    assert not support[..., ban].any()
    if samples.keep is not None:
        assert torch.equal(support, samples.keep) and (support.sum(-1) < support.shape[-1] - len(ban)).any()
    raw = model(ids, mask, samples.tokens, repeats=3).detach()
    expect = sampling_logits(raw, temperature, keep=support)[0]
    assert torch.equal(dist.detach(), expect)


def test_sampled_distribution_enumerated_on_the_first_token(reader):
    """Drawn first tokens follow the sampled distribution (a statistical check with a wide margin)."""
    model, tok = reader
    ids, mask = tokenize_fid(tok, QUERIES[:1], PASSAGES[:1], ENCODER_FORMAT, 64)
    ban = banned_ids(tok)
    with torch.no_grad():
        encoded = model.encode(ids, mask)
        samples = sample_responses(model, encoded, 4000, 1, 1.0, 0.9, ban, torch.Generator().manual_seed(0))
        start = torch.zeros(1, 1, dtype=torch.long)
        first = model.t5(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.hidden),
                         attention_mask=encoded.mask, decoder_input_ids=start).logits[0, 0]  # fmt: skip
    probs = torch.softmax(sampling_logits(first, 1.0, 0.9, ban)[0], -1)
    freq = torch.bincount(samples.tokens[:, 0], minlength=probs.numel()).float() / 4000
    assert (probs > 0).sum() >= 3  # a real choice to check
    assert (freq[probs == 0] == 0).all()  # nothing outside the nucleus, nothing banned
    assert (freq - probs).abs().max() < 0.04  # 4000 draws: binomial std ≤ 0.008
