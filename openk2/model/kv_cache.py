"""A row-slot KV cache with per-row lengths, shared by every model the engine runs.

Each layer keeps, per named feature (K2's absorbed MLA: the latent c^KV and k^R;
a Llama-family model: k and v), one tensor ``[rows, capacity, *feature]``. A row
holds one sequence: its tokens sit at positions ``0 .. lengths[row]`` of that row,
so rows of different lengths need no padding and a row is reused as soon as its
sequence finishes (:meth:`KVCache.reset_row`), which keeps memory and per-step work
flat under steady load. Capacity grows in blocks of ``block`` positions as the
longest row needs them, and shrinks back when long sequences have gone.

A forward pass works on a :class:`CacheView`: a contiguous range of rows that each
append ``T`` new tokens at their own length. Attention reads ``[B, S, *feature]``
views (no copy) with ``S`` the longest row's new length, masked per row.

Why rows and not pages: with a block table, every decode step has to gather each
sequence's pages into a contiguous tensor before attention (a copy as large as the
attention read itself); the CPU kernels read a strided row view directly. Prefix
sharing copies a cached prefix into the new row (:meth:`KVCache.copy_prefix`),
which costs a small fraction of prefilling it again.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _round_up(n: int, block: int) -> int:
    return max(block, -(-n // block) * block)


class KVCache:
    """Per layer and feature ``[rows, capacity, *shape]``; ``lengths[row]`` tokens cached in each row."""

    def __init__(self, num_layers: int, features: dict[str, tuple[int, ...]], rows: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", block: int = 256,
                 max_capacity: int | None = None) -> None:
        self.num_layers, self.features, self.dtype = num_layers, dict(features), dtype
        self.device = torch.device(device)
        self.block = block
        self.max_capacity = max_capacity
        cap = min(_round_up(capacity, block), max_capacity) if max_capacity else _round_up(capacity, block)
        self.data = {k: torch.zeros(num_layers, rows, cap, *shape, dtype=dtype, device=self.device)
                     for k, shape in self.features.items()}
        self.lengths = torch.zeros(rows, dtype=torch.long)  # on the CPU: read every step
        # optional [rows, capacity] bool: False marks left padding (batched `model.generate`)
        self.valid: torch.Tensor | None = None

    # ------------------------------------------------------------ geometry
    @property
    def rows(self) -> int:
        return next(iter(self.data.values())).shape[1]

    @property
    def capacity(self) -> int:
        return next(iter(self.data.values())).shape[2]

    @property
    def max_len(self) -> int:  # the name model.generate's callers know
        return self.capacity

    @property
    def length(self) -> int:
        """The longest row's length (all rows' for a batch decoded in lockstep)."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def bytes_per_token(self) -> int:
        one = self.num_layers * sum(int(torch.Size(s).numel()) for s in self.features.values())
        return one * torch.empty((), dtype=self.dtype).element_size()

    def _resize(self, cap: int) -> None:
        keep = min(cap, self.capacity)
        for k, t in self.data.items():
            new = torch.zeros(t.shape[0], t.shape[1], cap, *t.shape[3:], dtype=t.dtype, device=t.device)
            new[:, :, :keep] = t[:, :, :keep]
            self.data[k] = new
        if self.valid is not None:
            v = torch.ones(self.valid.shape[0], cap, dtype=torch.bool, device=self.valid.device)
            v[:, :keep] = self.valid[:, :keep]
            self.valid = v

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in every row (grows in whole blocks)."""
        if length > self.capacity:
            if self.max_capacity is not None and length > self.max_capacity:
                raise ValueError(f"KV cache full: {length} positions > max_len {self.max_capacity}")
            cap = _round_up(length, self.block)
            if self.max_capacity is not None:
                cap = min(cap, self.max_capacity)
            self._resize(cap)

    def trim(self) -> None:
        """Give back capacity beyond the longest row (plus one block of headroom)."""
        want = _round_up(self.length + self.block, self.block)
        if want < self.capacity:
            self._resize(want)

    # ------------------------------------------------------------ rows
    def reset_row(self, row: int) -> None:
        """Forget a row's tokens; its memory is reused by the next sequence written there."""
        self.lengths[row] = 0

    def copy_prefix(self, src: int, dst: int | Sequence[int], n: int) -> None:
        """Rows ``dst`` start with the first ``n`` cached positions of row ``src`` (prefix sharing)."""
        dst = [dst] if isinstance(dst, int) else list(dst)
        if n > int(self.lengths[src]):
            raise ValueError(f"row {src} has {int(self.lengths[src])} cached positions, not {n}")
        for d in dst:
            if d == src:
                continue
            for t in self.data.values():
                t[:, d, :n] = t[:, src, :n]
            self.lengths[d] = n

    def move_row(self, src: int, dst: int) -> None:
        """Row ``dst`` takes over row ``src``'s whole sequence (compaction)."""
        if src != dst:
            self.copy_prefix(src, dst, int(self.lengths[src]))
            self.lengths[src] = 0

    def store(self, features: dict[str, torch.Tensor], row: int) -> None:
        """Write a saved prefix (``{name: [layers, n, *shape]}``) into a row."""
        n = next(iter(features.values())).shape[1]
        self.reserve(n)
        for k, t in features.items():
            self.data[k][:, row, :n] = t.to(self.dtype)
        self.lengths[row] = n

    def snapshot(self, row: int, n: int) -> dict[str, torch.Tensor]:
        """A copy of a row's first ``n`` positions (``{name: [layers, n, *shape]}``)."""
        return {k: t[:, row, :n].clone() for k, t in self.data.items()}

    def view(self, rows: slice | int, T: int) -> "CacheView":
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return CacheView(self, rows, T)


class CacheView:
    """Rows ``rows`` of a cache, each appending ``T`` tokens at its own length, for one forward pass.

    ``positions`` [B, T] are the new tokens' positions; ``mask`` [B, 1, T, S] (True = attend)
    or None when plain causal attention over the whole view is exact (``causal``).
    Layers call :meth:`write` then :meth:`read`; the model calls :meth:`commit` at the end.
    """

    def __init__(self, cache: KVCache, rows: slice, T: int) -> None:
        self.cache, self.rows, self.T = cache, rows, T
        self.starts = cache.lengths[rows].clone()
        B = self.starts.numel()
        if B == 0:
            raise ValueError("a cache view needs at least one row")
        self.S = int(self.starts.max()) + T
        cache.reserve(self.S)
        self.uniform = bool((self.starts == self.starts[0]).all())
        pos = self.starts[:, None] + torch.arange(T)[None]
        self.positions = pos.to(cache.device)
        has_pad = cache.valid is not None and not bool(cache.valid[rows, : self.S].all())
        # plain causal attention is exact when every row starts together with no padding
        self.causal = self.uniform and not has_pad
        if self.causal and (T == 1 or int(self.starts[0]) == 0):
            self.mask = None
        else:
            m = torch.arange(self.S)[None, None, :] <= pos[:, :, None]  # [B, T, S]
            if cache.valid is not None:
                m = m & cache.valid[rows, : self.S].cpu()[:, None, :]
            self.mask = m[:, None].to(cache.device)
        self._index = None if self.uniform else (torch.arange(rows.start, rows.start + B).to(cache.device),
                                                 self.starts.to(cache.device))

    @property
    def start(self) -> int:
        """The first new position when every row starts together."""
        return int(self.starts[0])

    def write(self, layer: int, name: str, x: torch.Tensor) -> None:
        """Append ``x`` [B, T, *shape] to the rows of feature ``name`` in ``layer``."""
        t = self.cache.data[name][layer]
        x = x.to(t.dtype)
        if self.uniform:
            s = int(self.starts[0])
            t[self.rows, s : s + self.T] = x
        elif self.T == 1:
            rows, starts = self._index
            t[rows, starts] = x[:, 0]
        else:
            for b in range(x.shape[0]):
                s = int(self.starts[b])
                t[self.rows.start + b, s : s + self.T] = x[b]

    def read(self, layer: int, name: str) -> torch.Tensor:
        """[B, S, *shape]: every cached and new position of the rows (a view)."""
        return self.cache.data[name][layer][self.rows, : self.S]

    def commit(self) -> None:
        self.cache.lengths[self.rows] += self.T
