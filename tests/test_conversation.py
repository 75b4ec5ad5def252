import pytest

from alignment.conversation import prompt_text, scoring_text, scoring_texts, truncate_at_stop


def test_prompt_text_is_the_beaver_template():
    assert prompt_text("hello") == "BEGINNING OF CONVERSATION: USER: hello ASSISTANT:"


def test_scoring_text_appends_response_then_eos():
    text = scoring_text("hello", " Hi there!", "</s>")
    assert text == "BEGINNING OF CONVERSATION: USER: hello ASSISTANT: Hi there!</s>"


def test_scoring_texts_rejects_misaligned_lists():
    with pytest.raises(ValueError, match="differ in length: 2 != 1"):
        scoring_texts(["a", "b"], ["c"])


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" Sure. USER: and now?", " Sure."),
        (" Fine.\nUSER: next ASSISTANT: more", " Fine."),
        (" Done BEGINNING OF CONVERSATION: USER: x", " Done"),
        (" No marker here ", " No marker here"),
        ("", ""),
    ],
)
def test_truncate_at_stop_cuts_at_first_marker(generated, expected):
    assert truncate_at_stop(generated) == expected


def test_seeded_sampling_draws_the_tempered_top_p_distribution():
    """Gumbel-max inside greedy decoding samples exactly softmax(logits / T) within the nucleus."""
    import torch

    from alignment.conversation import seeded_sampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    temperature, top_p, n = 0.7, 0.9, 40_000
    probs = torch.softmax(logits[0] / temperature, dim=-1).double()
    # the nucleus: the most likely tokens whose mass reaches top_p (here the first three)
    keep = (probs.cumsum(0) - probs) < top_p
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()
    processors = seeded_sampling(temperature, top_p, torch.Generator().manual_seed(0))
    picks = processors(None, logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    # 5 binomial standard deviations per token
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-12)
    assert freq[~keep].sum() == 0


def test_sampling_engines_in_threads_are_reproducible(toy_models):
    """Two engines sampling at once give what each gives alone (no shared, reseeded global RNG)."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.conversation import generate_answers
    from alignment.toy import TOY_EVAL_PROMPTS

    # One tokenizer per engine, as TransformersEngine has: a fast tokenizer is not thread-safe.
    toks = [AutoTokenizer.from_pretrained(toy_models / "policy") for _ in range(2)]
    models = [AutoModelForCausalLM.from_pretrained(toy_models / "policy").eval() for _ in range(2)]
    prompts = list(TOY_EVAL_PROMPTS[:8])

    def answer(k: int) -> list[str]:
        return generate_answers(models[k], toks[k], prompts, max_new_tokens=24, temperature=1.0, seed=10 * k)

    alone = [answer(0), answer(1)]
    assert alone[0] != alone[1]
    together: dict[int, list[list[str]]] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=120)  # a failing thread must not leave the other waiting

    def run(k: int) -> None:
        try:
            for _ in range(3):
                barrier.wait()
                together[k].append(answer(k))
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert together[0] == [alone[0]] * 3 and together[1] == [alone[1]] * 3


def test_stop_criteria_are_built_once_and_stop_answers_as_stop_strings_do(toy_models):
    """The cached criteria give the answers of ``generate(stop_strings=...)`` (greedy, bit for bit),
    and one object serves every call with that tokenizer and device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.conversation import STOP_MARKERS, generate_answers, stop_criteria
    from alignment.toy import TOY_EVAL_PROMPTS

    tok = AutoTokenizer.from_pretrained(toy_models / "policy")
    model = AutoModelForCausalLM.from_pretrained(toy_models / "policy").eval()
    prompts = TOY_EVAL_PROMPTS[:8]
    tok.padding_side = "left"  # as generate_answers pads
    enc = tok([prompt_text(p) for p in prompts], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=24, do_sample=False, temperature=None, top_p=None,
                             stop_strings=list(STOP_MARKERS), tokenizer=tok, pad_token_id=tok.pad_token_id)  # fmt: skip
    texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert generate_answers(model, tok, prompts, 24) == [truncate_at_stop(t) for t in texts]
    first = stop_criteria(tok, STOP_MARKERS, "cpu")[0]
    assert stop_criteria(tok, STOP_MARKERS, "cpu")[0] is first
    assert stop_criteria(tok, ("USER:",), "cpu")[0] is not first
