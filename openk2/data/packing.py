"""Packed, domain-mixed, resumable batches for pre-training.

Each (split, domain) shard is one token stream in which documents are already
separated by [EOS]. The stream is cut into windows of seq_len + 1 tokens with
stride seq_len (inputs = w[:-1], labels = w[1:], so every token is a label
once per epoch). The global sample stream is a pure function of the seed:

    sample i:  domain d_i ~ mixture (uniform draw from a seeded block RNG)
               k = number of earlier samples that drew d_i
               window = permutation(seed, d_i, epoch = k // n_windows)[k % n_windows]

Global batch b is samples [b*B, (b+1)*B); rank r of W takes rows
[r*B/W, (r+1)*B/W), so W ranks together see exactly the single-rank batch.
The state (next sample, draws per domain) is the same on every rank, and a
resumed run (even on a different number of ranks) continues the same stream.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from openk2.data.corpus import DEFAULT_MIXTURE, DOMAINS  # noqa: F401  (DEFAULT_MIXTURE re-exported here)
from openk2.data.dataset import CorpusIndex, load_index
from openk2.errors import DataError

_BLOCK = 4096  # domain draws are made this many samples at a time
_SPLIT_CODE = {"train": 0, "val": 1}


def _domain_code(domain: str) -> int:
    return zlib.crc32(domain.encode("utf-8"))


class PackedDataset:
    """Fixed-length windows [seq_len + 1] drawn from the domains by `mixture`."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        seq_len: int = 256,
        mixture: dict[str, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if split not in _SPLIT_CODE:
            raise DataError(f"split {split!r} is not 'train' or 'val'")
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.index: CorpusIndex = load_index(data_dir)
        self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)

        weights = dict(DEFAULT_MIXTURE if mixture is None else mixture)
        for d, w in weights.items():
            if not (isinstance(w, (int, float)) and w >= 0 and np.isfinite(w)):
                raise DataError(f"mixture weight for {d!r} must be a finite number >= 0, got {w!r}")
        known = sorted({s.domain for s in self.index.shards})
        unknown = [d for d in weights if d not in known]
        if unknown:
            raise DataError(f"mixture names domain(s) {unknown} that the corpus lacks (it has {known})")
        order = [d for d in DOMAINS if d in weights] + sorted(d for d in weights if d not in DOMAINS)
        self.domains = [d for d in order if weights[d] > 0]
        if not self.domains:
            raise DataError("mixture has no domain with weight > 0")
        total = float(sum(weights[d] for d in self.domains))
        self.mixture = {d: weights[d] / total for d in self.domains}
        self._cum = np.cumsum([self.mixture[d] for d in self.domains])
        self._cum[-1] = 1.0

        self._streams: dict[str, np.ndarray] = {}
        self.num_windows: dict[str, int] = {}
        for d in self.domains:
            shard = self.index.shard(split, d)
            n = 0 if shard is None else (shard.num_tokens - 1) // self.seq_len
            if n < 1:
                have = 0 if shard is None else shard.num_tokens
                raise DataError(
                    f"{self.index.data_dir}: split {split!r} domain {d!r} has {have} tokens, fewer than one window of {self.seq_len + 1}"
                )
            self._streams[d] = shard.tokens()
            self.num_windows[d] = n

        self.sample_index = 0
        self.draws = {d: 0 for d in self.domains}
        self._block_id = -1
        self._block: np.ndarray | None = None
        self._perms: dict[str, tuple[int, np.ndarray]] = {}

    # -- the deterministic global stream ---------------------------------------
    def _domain_of(self, i: int) -> str:
        block = i // _BLOCK
        if block != self._block_id:
            rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], block])
            self._block = np.searchsorted(self._cum, rng.random(_BLOCK), side="right")
            self._block_id = block
        return self.domains[int(self._block[i % _BLOCK])]

    def _window_start(self, domain: str, k: int) -> int:
        n = self.num_windows[domain]
        epoch, j = divmod(k, n)
        cached = self._perms.get(domain)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], _domain_code(domain), epoch])
            cached = (epoch, rng.permutation(n))
            self._perms[domain] = cached
        return int(cached[1][j]) * self.seq_len

    def _next(self) -> tuple[str, int]:
        d = self._domain_of(self.sample_index)
        start = self._window_start(d, self.draws[d])
        self.draws[d] += 1
        self.sample_index += 1
        return d, start

    def _window(self, domain: str, start: int) -> np.ndarray:
        return np.asarray(self._streams[domain][start : start + self.seq_len + 1], dtype=np.int64)

    # -- public iteration ------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless windows; with world_size W this rank gets samples i = rank (mod W)."""
        while True:
            i = self.sample_index
            d, start = self._next()
            if i % self.world_size == self.rank:
                yield torch.from_numpy(self._window(d, start))

    def batches(self, batch_size: int, with_domains: bool = False) -> Iterator:
        """Endless LongTensor[batch_size // world_size, seq_len + 1] batches.

        `batch_size` is the global batch; this rank gets its contiguous rows.
        With `with_domains`, yields (batch, list of domain names per row).
        """
        if batch_size < 1 or batch_size % self.world_size:
            raise DataError(f"global batch_size {batch_size} is not a positive multiple of world_size {self.world_size}")
        local = batch_size // self.world_size
        lo, hi = self.rank * local, (self.rank + 1) * local
        while True:
            specs = [self._next() for _ in range(batch_size)][lo:hi]
            batch = torch.from_numpy(np.stack([self._window(d, s) for d, s in specs]))
            yield (batch, [d for d, _ in specs]) if with_domains else batch

    # -- resume ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """The same on every rank; load it to continue with exactly the next batch."""
        return {
            "sample_index": self.sample_index,
            "draws": dict(self.draws),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
            "mixture": dict(self.mixture),
            "fingerprint": self.index.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "seq_len": self.seq_len, "split": self.split, "fingerprint": self.index.fingerprint}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(f"data state mismatch: {key} is {state.get(key)!r} in the checkpoint, {value!r} here")
        saved = state.get("mixture", {})
        if set(saved) != set(self.mixture) or any(abs(saved[d] - self.mixture[d]) > 1e-12 for d in saved):
            raise DataError(f"data state mismatch: mixture {saved} in the checkpoint, {self.mixture} here")
        self.sample_index = int(state["sample_index"])
        self.draws = {d: int(state["draws"][d]) for d in self.domains}

    # -- description -----------------------------------------------------------
    @property
    def tokens_per_epoch(self) -> dict[str, int]:
        return {d: n * self.seq_len for d, n in self.num_windows.items()}

    def __repr__(self) -> str:
        return (
            f"PackedDataset(split={self.split!r}, seq_len={self.seq_len}, mixture={self.mixture}, "
            f"windows={self.num_windows}, rank={self.rank}/{self.world_size})"
        )
