"""The max-logit statistic S_max^h that QK-Clip reads (K2 report, Algorithm 1 / QK-Clip).

    S_max^h = max over the batch and the allowed pairs (i, j) of  q_i^h . k_j^h * softmax_scale

It belongs to the model (the attention layers record it during training-mode
forwards); the optimizer only reads it. `max_logit(query, key, scale)` forms
the logits without autograd, tile by tile, so a model can keep its fused
attention kernel for the output and pay one extra Q K^T for the statistic.

Memory bound. The extra memory of one call is at most `chunk_bytes` (default
64 MiB) plus O(H) bytes, at any batch, head count and length: the logits are
formed in tiles of (batch elements) x (heads) x (query rows) x (key columns)
whose fp32 logits, mask and fp32 copies of the tile's queries and keys fit in
`chunk_bytes`. Without tiling a K2 layer (64 heads) at 4K context would build
a [1, 64, 4096, 4096] fp32 tensor: 4 GiB per layer per forward. With a causal
mask, tiles above the diagonal are skipped (about half the FLOPs once the
rows are tiled).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 64 << 20
_LOGIT_BYTES = 6  # per logit in a tile: the fp32 value, a bool mask, a bool negation of a user mask


def _tile_bytes(nb: int, hc: int, tq: int, tk: int, kvc: int, D: int) -> int:
    return nb * hc * tq * tk * _LOGIT_BYTES + 4 * D * (nb * hc * tq + nb * kvc * tk)


def _largest(limit: int, fits) -> int:
    """The largest x in [1, limit] with fits(x) (fits is monotone), or 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def tile_sizes(B: int, H: int, KV: int, T: int, S: int, D: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
               ) -> tuple[int, int, int, int]:
    """(batch, heads, query rows, key columns) per tile so that one tile's extra memory <= chunk_bytes.

    Prefers whole problems (one batched matmul), then fewer batch elements, then fewer query rows
    with every head (keeps causal skipping effective), then fewer heads, then fewer key columns.
    """
    G = H // KV

    def kvc(hc: int) -> int:
        return max(1, hc // G) if hc >= G else 1

    def cost(nb, hc, tq, tk):
        return _tile_bytes(nb, hc, tq, tk, kvc(hc), D)

    if cost(1, H, T, S) <= chunk_bytes:
        return _largest(B, lambda n: cost(n, H, T, S) <= chunk_bytes), H, T, S
    min_rows = min(T, 16)
    tq = _largest(T, lambda t: cost(1, H, t, S) <= chunk_bytes)
    if tq >= min_rows:
        return 1, H, tq, S
    hc = _largest(H, lambda h: cost(1, h, min_rows, S) <= chunk_bytes)
    if hc >= G:
        hc -= hc % G
    if hc >= 1:
        return 1, hc, min_rows, S
    tq = _largest(T, lambda t: cost(1, 1, t, S) <= chunk_bytes)
    if tq >= 1:
        return 1, 1, tq, S
    tk = _largest(S, lambda k: cost(1, 1, 1, k) <= chunk_bytes)
    if tk < 1:
        raise ValueError(f"max_logit: chunk_bytes={chunk_bytes} cannot hold one query row and one key (D={D})")
    return 1, 1, 1, tk


def _fp32(t: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """A contiguous fp32 (fp64 stays fp64) copy, times `scale`; never a view of the input."""
    out = torch.empty(t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32, device=t.device)
    out.copy_(t)  # contiguous whatever the input's strides (transformers passes transposed views)
    return out.mul_(scale) if scale is not None else out


def _slice(mask: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    return mask if mask.shape[dim] == 1 else mask.narrow(dim, start, stop - start)


def _head_chunks(H: int, G: int, hc: int):
    """(first head, last head + 1, first key head) per chunk; a chunk is whole key groups or inside one."""
    if hc >= G:
        for h0 in range(0, H, hc):
            yield h0, min(H, h0 + hc), h0 // G
    else:
        for g0 in range(0, H, G):
            for h0 in range(g0, g0 + G, hc):
                yield h0, min(g0 + G, h0 + hc), g0 // G


@torch.no_grad()
def max_logit(query: torch.Tensor, key: torch.Tensor, scale: float, causal: bool = True,
              mask: torch.Tensor | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """S_max per query head: max over batch and allowed (i, j) of query_i . key_j * scale, fp32 [H].

    query [B, H, T, D], key [B, KV, S, D] (query head h reads key head h // (H / KV), as repeat_kv
    does). `mask`: None (causal when `causal`, query row i of T sees keys j <= i + S - T; else all),
    or bool (True = attend) / additive float, broadcastable to [B, H, T, S] (extra key columns are
    ignored). Computed in fp32 (fp64 stays fp64) without autograd, tile by tile: at most `chunk_bytes`
    of extra memory (module docstring).
    """
    B, H, T, D = query.shape
    KV, S = key.shape[1], key.shape[2]
    if H % KV:
        raise ValueError(f"max_logit: {H} query heads is not a multiple of {KV} key heads")
    G = H // KV
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = torch.full((H,), float("-inf"), dtype=acc, device=query.device)
    if B == 0 or T == 0 or S == 0:
        return out.float()
    off = S - T  # query row i sits at key position i + off
    causal_only = mask is None and causal
    if mask is not None:
        while mask.dim() < 4:
            mask = mask[None]
        mask = mask[..., :S]
    nb, hc, tq, tk = tile_sizes(B, H, KV, T, S, D, chunk_bytes)
    for b0 in range(0, B, nb):
        b1 = min(B, b0 + nb)
        n = b1 - b0
        for h0, h1, kv0 in _head_chunks(H, G, hc):
            hn = h1 - h0
            kvn = max(1, hn // G) if hn >= G else 1
            g = hn // kvn
            best = torch.full((hn,), float("-inf"), dtype=acc, device=query.device)
            for t0 in range(0, T, tq):
                t1 = min(T, t0 + tq)
                k_end = min(S, t1 + off) if causal_only else S  # keys past the last row's diagonal: masked
                if k_end <= 0:
                    continue
                # the g query heads of a key head stacked as rows: [n, kvn, g * rows, D]
                q = _fp32(query[b0:b1, h0:h1, t0:t1], scale).view(n, kvn, g * (t1 - t0), D)
                for k0 in range(0, k_end, tk):
                    k1 = min(k_end, k0 + tk)
                    k = _fp32(key[b0:b1, kv0:kv0 + kvn, k0:k1])
                    # [n, kvn, g * rows, D] @ [n, kvn, D, cols] -> [n, hn, rows, cols] (no broadcast copy of k)
                    logits = torch.matmul(q, k.transpose(-1, -2)).view(n, hn, t1 - t0, k1 - k0)
                    if causal_only:
                        if k1 - 1 > t0 + off:  # the tile crosses the diagonal
                            rows = torch.arange(t0 + off, t1 + off, device=query.device)[:, None]
                            cols = torch.arange(k0, k1, device=query.device)[None, :]
                            logits.masked_fill_(cols > rows, float("-inf"))
                    elif mask is not None:
                        mb = _slice(_slice(_slice(mask, 0, b0, b1), 1, h0, h1), 2, t0, t1)[..., k0:k1]
                        if mb.dtype == torch.bool:
                            logits.masked_fill_(mb.logical_not(), float("-inf"))
                        else:
                            logits.add_(mb)  # cast on the fly: no fp32 copy of a bf16 mask tile
                    torch.maximum(best, logits.amax(dim=(0, 2, 3)), out=best)
                    del logits, k
            torch.maximum(out[h0:h1], best, out=out[h0:h1])
    return out.float()
