"""The core's GRPO loss equals TRL 1.16's on the same batch of the toy causal LM, for each of TRL's
loss aggregations, with the KL term on and a ratio ≠ 1 (a second inner update), in value and in
gradient: ``alignment.grpo`` (TRL) and ``alignment.pg`` optimise the same objective."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from alignment.pg import clipped_pg_loss, kl_k3, sampling_logits, token_logprobs

TEMPERATURE = 0.7
TRL_TO_CORE = {"grpo": "sequence", "bnpo": "token", "dapo": "token"}


def trainer_for(toy_models, tmp_path, loss_type: str, kl_correction: bool = True) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=str(tmp_path / loss_type), use_cpu=True, bf16=False, beta=0.1, loss_type=loss_type,
        temperature=TEMPERATURE, num_generations=2, per_device_train_batch_size=4, max_completion_length=6,
        epsilon=0.2, use_bias_correction_kl=kl_correction, report_to=[], gradient_checkpointing=False, logging_steps=1,
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": "hello there"}] * 4)
    trainer = GRPOTrainer(
        model=str(toy_models / "policy"), reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args, train_dataset=data,
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def batch(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(5, vocab, (4, 5), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding, as TRL produces it
    completion_ids = torch.randint(5, vocab, (4, 6), generator=g)
    completion_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 2.0, -1.5])}  # fmt: skip


def core_logps(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs of the completion tokens under the tempered distribution TRL samples from: [B, T]."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    t = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -t - 1 : -1]
    tempered, _ = sampling_logits(logits, temperature=TEMPERATURE)
    return token_logprobs(tempered, inputs["completion_ids"])


@pytest.mark.parametrize(
    ("loss_type", "kl_correction"), [("grpo", True), ("bnpo", True), ("dapo", True), ("dapo", False)]
)
def test_core_grpo_loss_equals_trls(toy_models, tmp_path, loss_type, kl_correction):
    trainer = trainer_for(toy_models, tmp_path, loss_type, kl_correction)
    model = trainer.model
    model.train()
    inputs = batch(trainer)
    with torch.no_grad():
        current = core_logps(model, inputs)
        ref = core_logps(trainer.ref_model, inputs)
    # Old log-probs from "before the previous inner update": ratios spread over [0.6, 1.5], so both
    # clip edges are crossed for both advantage signs.
    shift = torch.linspace(-0.5, 0.4, current.numel()).reshape(current.shape)
    inputs["old_per_token_logps"] = current + shift
    inputs["ref_per_token_logps"] = ref + 0.3 * shift.flip(0)  # a reference that really differs
    num_items = inputs["completion_mask"].sum()
    inputs["num_items_in_batch"] = num_items

    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logp = core_logps(model, inputs)
    ours = clipped_pg_loss(
        logp, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
        eps_low=0.2, eps_high=0.2, agg=TRL_TO_CORE[loss_type],
        kl=kl_k3(logp, inputs["ref_per_token_logps"]), beta=0.1,
        num_items=float(num_items) if loss_type == "dapo" else None, kl_importance_weight=kl_correction,
    )  # fmt: skip
    ours.loss.backward()
    assert 0 < ours.clip_fraction < 1  # the clip is active on some tokens, not all

    # TRL takes log-probs through a chunked fused LM head, we through the full logits: the same
    # maths summed in another order, so agreement is to fp32 rounding of O(1) values, not bits.
    torch.testing.assert_close(ours.loss.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert their_grads
    for name, g in their_grads.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, g, rtol=1e-4, atol=1e-6, msg=name
        )
