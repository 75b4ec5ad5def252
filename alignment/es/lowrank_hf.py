"""Low-rank members on a Hugging Face model: one batched ``generate`` for several members at once.

:class:`MemberAdapters` puts a forward hook on every target linear layer (q/k/v/o, gate/up/down)
that adds each batch row's own member adapter, so that row b computes

    y_b = x_b·Wᵀ + (x_b·lora_a_mᵀ)·lora_b_mᵀ = x_b·Wᵀ + sign_m·σ·(x_b·B_m)·A_mᵀ/√r,   m = member of row b,

with exactly the factors vLLM is given (:func:`alignment.es.lowrank.adapter_factors`). The weights
themselves are never changed, so there is nothing to restore. Rows are member-major (the prompts of
member 0, then of member 1, ...), so the adapter is two batched matrix products over a
(members, rows·tokens, features) view; with no members active the hooks return the output as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from alignment.conversation import generate_answers
from alignment.es.lowrank import adapter_pair, factor_table

Member = tuple[int, float]
OnMember = Callable[[int, list[str]], None]


class MemberAdapters:
    """Per-row low-rank adapters on ``model``'s target linear layers (by HF parameter name)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self._modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in self.names}
        for name, module in self._modules.items():
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(f"{name}: low-rank ES adapts nn.Linear layers, found {type(module).__name__}")
        self._active: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hooks = [m.register_forward_hook(self._hook) for m in self._modules.values()]

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._active is None:
            return None
        a_t, b_t = self._active[module]  # (g, in, r), (g, r, out)
        x = args[0]
        members = a_t.shape[0]
        if x.shape[0] % members:
            raise RuntimeError(f"batch of {x.shape[0]} rows is not {members} members' equal shares")
        delta = torch.bmm(torch.bmm(x.reshape(members, -1, x.shape[-1]), a_t), b_t)
        return output + delta.reshape(output.shape)

    @contextmanager
    def use(self, members: Sequence[Member], sigma: float, rank: int) -> Iterator[None]:
        """Within the block, rows [k·n/g, (k+1)·n/g) of every batch are member k's (g members)."""
        active = {}
        weights = {name: module.weight for name, module in self._modules.items()}
        device = next(iter(weights.values())).device
        table = factor_table([seed for seed, _ in members], {n: tuple(w.shape) for n, w in weights.items()},
                             rank, device)  # fmt: skip
        for name, module in self._modules.items():
            dtype = weights[name].dtype
            pairs = [adapter_pair(*table[(seed, name)], sign, sigma, rank, dtype) for seed, sign in members]
            a_t = torch.stack([a.t() for a, _ in pairs])
            b_t = torch.stack([b.t() for _, b in pairs])
            active[module] = (a_t, b_t)
        self._active = active
        try:
            yield
        finally:
            self._active = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def members_per_call(num_prompts: int, batch_size: int, greedy: bool) -> int:
    """Members that share one ``generate``: as many as fit ``batch_size`` rows when greedy; one when
    sampling, so that every member draws the same random numbers as in full mode (common random
    numbers: batch composition would change which draws a row gets)."""
    return max(1, batch_size // max(1, num_prompts)) if greedy else 1


def generate_members(
    model: torch.nn.Module,
    tokenizer,
    adapters: MemberAdapters,
    members: Sequence[Member],
    prompts: list[str],
    sigma: float,
    rank: int,
    settings,
    on_member: OnMember | None = None,
) -> list[list[str]]:
    """Every member's answers to ``prompts`` (``settings``: :class:`GenerationSettings`), members
    grouped into shared batched calls; ``on_member(i, answers)`` as each group finishes."""
    greedy = settings.temperature <= 0
    group = members_per_call(len(prompts), settings.batch_size, greedy)
    out: list[list[str]] = []
    for start in range(0, len(members), group):
        chunk = list(members[start : start + group])
        rows = prompts * len(chunk)
        with adapters.use(chunk, sigma, rank):
            answers = generate_answers(
                model, tokenizer, rows, settings.max_new_tokens, settings.temperature, settings.top_p,
                settings.seed, len(rows) if greedy else settings.batch_size, settings.stop,
            )  # fmt: skip
        for k in range(len(chunk)):
            out.append(answers[k * len(prompts) : (k + 1) * len(prompts)])
            if on_member is not None:
                on_member(start + k, out[-1])
    return out
