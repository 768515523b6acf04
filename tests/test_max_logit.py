"""The model's max-logit statistic: bounded extra memory at any length, tiles equal the whole."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openk2.model.max_logit import DEFAULT_CHUNK_BYTES, max_logit, tile_sizes


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors allocated (and still alive) during the block, from every op's outputs.

    An output that aliases an input (views, in-place and out= ops) allocates nothing; a fresh output's
    storage counts until the last tensor sharing it dies. Deterministic, allocator-independent.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._refs: dict[int, list] = {}  # data_ptr -> [nbytes, live tensor count]

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        aliased = [r.alias_info is not None for r in func._schema.returns]
        for i, t in enumerate(outs):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self._refs.get(ptr)
            if entry is None:
                if (i < len(aliased) and aliased[i]) or func.is_view:
                    continue  # a view / in-place result of a tensor made outside the block
                nbytes = t.untyped_storage().nbytes()
                entry = self._refs[ptr] = [nbytes, 0]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def _reference(q, k, scale, causal=True, mask=None):
    """The whole [B, H, T, S] fp64 logit tensor at once."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(H // KV, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    elif causal:
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    return s.amax(dim=(0, 2, 3)).float()


def test_extra_memory_is_bounded_at_64_heads_and_long_context():
    """64 heads x 2048 positions: 1 GiB of fp32 logits unchunked; the statistic stays under its bound."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 64, 2048, 8
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g)
    for chunk in (DEFAULT_CHUNK_BYTES, 4 << 20):
        with PeakMemory() as mem:
            got = max_logit(q, k, 0.125, chunk_bytes=chunk)
        assert mem.peak <= chunk + 4096, (chunk, mem.peak, mem.largest)
        assert got.shape == (H,) and bool(torch.isfinite(got).all())
    assert H * T * T * 4 >= 16 * DEFAULT_CHUNK_BYTES  # the bound is far below the whole logit tensor


def test_tile_sizes_fit_at_k2_shapes():
    # K2: 64 heads of 192 dims; 4K pre-training, 32K and 128K contexts
    for T in (4096, 32768, 131072):
        nb, hc, tq, tk = tile_sizes(1, 64, 64, T, T, 192)
        assert nb * hc * tq * tk * 6 + 4 * 192 * (hc * tq + hc * tk) <= DEFAULT_CHUNK_BYTES, T


@pytest.mark.parametrize("chunk", [1 << 30, 200_000, 40_000, 6_000, 1_000])
def test_tiles_equal_the_whole(chunk):
    """Every tiling (batch, heads with GQA groups, rows, key columns) gives the unchunked result."""
    g = torch.Generator().manual_seed(1)
    B, H, KV, T, D = 3, 8, 2, 37, 16
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, KV, T + 5, D, generator=g)
    whole = max_logit(q, k, 0.3, chunk_bytes=1 << 40)
    got = max_logit(q, k, 0.3, chunk_bytes=chunk)
    assert torch.allclose(got, whole, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got, _reference(q, k, 0.3), rtol=1e-5, atol=1e-5)
    # non-causal, bool mask, additive mask
    assert torch.allclose(max_logit(q, k, 0.3, causal=False, chunk_bytes=chunk), _reference(q, k, 0.3, causal=False),
                          rtol=1e-5, atol=1e-5)
    m = torch.rand(B, 1, T, T + 5, generator=g) > 0.3
    m[..., 0] = True
    assert torch.allclose(max_logit(q, k, 0.3, mask=m, chunk_bytes=chunk), _reference(q, k, 0.3, mask=m),
                          rtol=1e-5, atol=1e-5)
    add = torch.zeros(B, 1, T, T + 5).masked_fill(~m, float("-inf"))
    assert torch.allclose(max_logit(q, k, 0.3, mask=add, chunk_bytes=chunk), _reference(q, k, 0.3, mask=m),
                          rtol=1e-5, atol=1e-5)


def test_bf16_inputs_are_not_modified_and_give_fp32():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 16, 8, generator=g)
    k = torch.randn(2, 4, 16, 8, generator=g)
    q0 = q.clone()
    out = max_logit(q, k, 0.5, chunk_bytes=2_000)
    assert torch.equal(q, q0) and out.dtype == torch.float32
    outb = max_logit(q.bfloat16(), k.bfloat16(), 0.5)
    assert outb.dtype == torch.float32
    assert torch.allclose(outb, _reference(q.bfloat16().float(), k.bfloat16().float(), 0.5), rtol=1e-5)
