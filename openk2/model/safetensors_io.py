"""HF-format checkpoint files: sharded safetensors + index, written atomically; reading with FP8 dequantisation.

Works on HF-named state dicts only (names: `openk2.model.hf_adapter`); knows nothing of the model class.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.errors import CheckpointError
from openk2.utils.files import atomic_write

INDEX = "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. '2GB')")
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


@contextmanager
def atomic_dir(path: Path):
    """Write into a temporary sibling directory, then swap it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     max_shard_size: int | str = "2GB", extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """config.json + model.safetensors (or model-0000i-of-0000n.safetensors and the index), atomically.

    Files already in `path` that are not part of the checkpoint (tokenizer.json ...) are kept.
    """
    path = Path(path)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with atomic_dir(path) as tmp:
        if path.exists():  # keep side files and folders (tokenizer, generation config, ...)
            for f in path.iterdir():
                if f.is_dir():
                    shutil.copytree(f, tmp / f.name, symlinks=True)
                elif not (f.name.endswith(".safetensors") or f.name in ("config.json", INDEX)):
                    shutil.copy2(f, tmp / f.name, follow_symlinks=False)
        atomic_write(tmp / "config.json", json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write(tmp / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        for fname, content in (extra_files or {}).items():
            atomic_write(tmp / fname, content)
    return path


def shard_files(path: Path) -> list[str]:
    """The checkpoint's safetensors files, from the index if there is one."""
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{path / f}: shard listed in {index.name} is missing")
        return files
    single = sorted(path.glob("*.safetensors"))
    if not single:
        raise CheckpointError(f"{path}: no model.safetensors, no index, and no *.safetensors files")
    return [f.name for f in single]


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 block-quantised weight -> fp32: each (block[0] x block[1]) tile times its scale."""
    n, m = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :m]
    return w.float() * s


_FP8 = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


def iter_tensors(path: str | os.PathLike, wanted=None, fp8_block: tuple[int, int] = (128, 128)
                 ) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file name, tensor name, tensor) for every tensor of the checkpoint, shard by shard.

    `wanted(name) -> bool` skips tensors before they are read; FP8 weights come back dequantised
    with their ``weight_scale_inv`` (the scales themselves are not yielded).
    """
    path = Path(path)
    for fname in shard_files(path):
        fpath = path / fname
        try:
            handle = safe_open(str(fpath), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means the shard is unreadable
            raise CheckpointError(f"{fpath}: cannot read safetensors shard ({e})") from None
        with handle as f:
            keys = list(f.keys())
            keyset = set(keys)
            for key in keys:
                if key.endswith("weight_scale_inv") or (wanted is not None and not wanted(key)):
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"{fpath}: tensor '{key}' is corrupt or truncated ({e})") from None
                if t.dtype in _FP8:
                    sk = key[: -len("weight")] + "weight_scale_inv"
                    if sk not in keyset:
                        raise CheckpointError(f"{fpath}: FP8 tensor '{key}' has no '{sk}'")
                    t = dequantize_fp8(t, f.get_tensor(sk), fp8_block)
                yield fname, key, t
