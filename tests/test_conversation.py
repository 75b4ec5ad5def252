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

    tok = AutoTokenizer.from_pretrained(toy_models / "policy")
    models = [AutoModelForCausalLM.from_pretrained(toy_models / "policy").eval() for _ in range(2)]
    prompts = list(TOY_EVAL_PROMPTS[:8])

    def answer(k: int) -> list[str]:
        return generate_answers(models[k], tok, prompts, max_new_tokens=24, temperature=1.0, seed=10 * k)

    alone = [answer(0), answer(1)]
    assert alone[0] != alone[1]
    together: dict[int, list[list[str]]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def run(k: int) -> None:
        for _ in range(3):
            barrier.wait()
            together[k].append(answer(k))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together[0] == [alone[0]] * 3 and together[1] == [alone[1]] * 3
