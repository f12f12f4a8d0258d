"""Choosing each row's next token from its logits: greedy (argmax) or temperature + nucleus (top-p) sampling.

A sampled row draws from its own ``torch.Generator`` (seeded by the request's ``seed``), so its tokens do not
depend on which other rows share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a non-deterministic seed
    else:
        generator.manual_seed(seed)
    return generator


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``softmax(logits / temperature)`` restricted to the smallest set of mass >= ``top_p``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Row ``i``'s token: argmax where ``temperatures[i] == 0``, else a draw with ``generators[i]``."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, temperature in enumerate(temperatures):
        if temperature > 0:
            tokens[i] = sample_top_p(logits[i], temperature, top_ps[i], generators[i])
    return tokens
