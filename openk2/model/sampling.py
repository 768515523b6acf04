"""Next-token sampling shared by `model.generate`, the serving engine and constrained decoding.

Temperature scales the logits (0 means greedy argmax); top-p (nucleus
sampling, Holtzman et al. 2020, arXiv 1904.09751) keeps the smallest set of
most likely tokens whose probability mass reaches p, always at least one.
"""

from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every probability outside the nucleus of `probs` [..., V] (not renormalised; a copy)."""
    if top_p >= 1.0:
        return probs.clone()
    sorted_p, sorted_idx = probs.sort(-1, descending=True)
    # a token is dropped when the mass strictly before it already reaches top_p
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    drop[..., 0] = False  # the most likely token always stays (top_p <= 0 is greedy, not empty)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_p.masked_fill(drop, 0.0))


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the top-p nucleus, in fp32 (temperature > 0)."""
    return top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...]: argmax when temperature <= 0, else a draw from `sampling_probs`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
