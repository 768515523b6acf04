"""Sampling with MLA's absorbed latent KV cache: greedy, temperature, top-p."""

from __future__ import annotations

import torch

from openk2.model.attention import MLACache
from openk2.model.sampling import sample_next  # noqa: F401  (re-exported: model.generate.sample_next)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Returns [B, T + n] ids (n <= max_new_tokens; finished rows are padded with their EOS).

    Batched prompts of different lengths are left-padded with `attention_mask`
    (1 = real token) marking the padding.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    was_training = model.training
    model.eval()
    B, T = input_ids.shape
    device = input_ids.device
    param = model.lm_head.weight
    cache = MLACache(model.config, B, T + max_new_tokens, cache_dtype or param.dtype, device)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if attention_mask is not None:
        attention_mask = attention_mask.to(device).bool()
        cache.valid = torch.ones(B, cache.capacity, dtype=torch.bool, device=device)
        cache.valid[:, :T] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(T, device=device)[None].expand(B, T)
    try:
        out = model(input_ids, position_ids=positions, cache=cache, logits_to_keep=1)
        next_pos = positions[:, -1:] + 1
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            nxt = sample_next(out.logits[:, -1], temperature, top_p, generator)
            if eos:
                nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)
                done |= torch.isin(nxt, torch.tensor(eos, device=device))
            tokens.append(nxt[:, None])
            if (eos and bool(done.all())) or step == max_new_tokens - 1:
                break
            out = model(nxt[:, None], position_ids=next_pos, cache=cache)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
