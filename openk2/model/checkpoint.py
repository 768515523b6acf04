"""HF-format checkpoint I/O (config.json + sharded safetensors + index).

openk2 keeps each MoE layer's experts as stacked 3-D tensors
(`mlp.experts.gate_proj` [E, I, H]); HF checkpoints name them per expert
(`mlp.experts.E.gate_proj.weight`). This module is the only place that
converts. It also reads transformers-5 fused expert tensors
(`mlp.experts.gate_up_proj`), skips multi-token-prediction layers
(`model.layers.{L}.*` for L >= num_hidden_layers), and dequantises FP8
block-quantised weights (`weight_scale_inv`, as in the released
DeepSeek-V3 / Kimi-K2 checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.errors import CheckpointError, ConfigError
from openk2.model.config import K2Config
from openk2.model.transformer import K2ForCausalLM

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. '2GB')")
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


# ------------------------------------------------------------------------ save
def hf_state_dict(model: K2ForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF DeepseekV3 names (experts split per expert)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


@contextmanager
def _atomic_dir(path: Path):
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


def save_pretrained(model: K2ForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "2GB",
                    dtype: torch.dtype | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write an HF-format directory atomically: config.json, model-0000i-of-0000n.safetensors, index.

    Files already in `path` that are not part of the checkpoint (e.g. tokenizer.json) are kept.
    """
    path = Path(path)
    limit = _parse_size(max_shard_size)
    sd = hf_state_dict(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = sd[name]
        size += nbytes
    with _atomic_dir(path) as tmp:
        if path.exists():  # keep side files (tokenizer, generation config, ...)
            for f in path.iterdir():
                if f.is_file() and not (f.name.endswith(".safetensors") or f.name in (
                        "config.json", "model.safetensors.index.json")):
                    shutil.copy2(f, tmp / f.name)
        cfg = model.config
        cfg.save(tmp)
        hf = json.loads((tmp / "config.json").read_text())
        hf["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        n = len(shards)
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for fname, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / fname, mode) as f:
                f.write(content)
    return path


# ------------------------------------------------------------------------ load
def _shard_files(path: Path) -> dict[str, list[str]]:
    """file name -> tensor names, from the index if there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files: dict[str, list[str]] = {}
        for k, f in weight_map.items():
            files.setdefault(f, []).append(k)
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{path / f}: shard listed in {index.name} is missing")
        return files
    single = sorted(path.glob("*.safetensors"))
    if not single:
        raise CheckpointError(f"{path}: no model.safetensors, no index, and no *.safetensors files")
    return {f.name: None for f in single}  # type: ignore[misc]


def _dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    n, m = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :m]
    return w.float() * s


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", strict: bool = True) -> K2ForCausalLM:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        config = K2Config.from_json_file(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _shard_files(path)
    qcfg = config.extra.get("quantization_config") or {}
    block = tuple(qcfg.get("weight_block_size", (128, 128)))
    if dtype is None:
        stored = config.extra.get("torch_dtype") or config.extra.get("dtype")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            str(stored), torch.bfloat16 if qcfg else torch.float32)

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = K2ForCausalLM(config, init_weights=False)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    params.update({k: v for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")})
    expected: set[str] = set()
    for name, p in params.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            expected.update(f"{name}#{e}" for e in range(p.shape[0]))
        elif not (config.tie_word_embeddings and name == "lm_head.weight"):
            expected.add(name)
    filled: set[str] = set()
    L = config.num_hidden_layers

    def put(target: str, tensor: torch.Tensor, src: str, fname: str, expert: int | None = None) -> None:
        if target not in params:
            if strict:
                raise CheckpointError(f"{path / fname}: unexpected tensor '{src}' (no such parameter in the model)")
            return
        dst = params[target] if expert is None else params[target][expert]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path / fname}: tensor '{src}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dst.shape)} (check config.json)")
        with torch.no_grad():
            dst.copy_(tensor.to(dst.dtype))
        filled.add(target if expert is None else f"{target}#{expert}")

    for fname, names in files.items():
        fpath = path / fname
        try:
            handle = safe_open(str(fpath), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means the shard is unreadable
            raise CheckpointError(f"{fpath}: cannot read safetensors shard ({e})") from None
        with handle as f:
            keys = list(f.keys())
            keyset = set(keys)
            for key in keys:
                if key.endswith("weight_scale_inv") or key.endswith(_IGNORED_SUFFIXES):
                    continue
                lm = _LAYER_RE.match(key)
                if lm and int(lm.group(1)) >= L:
                    continue  # multi-token-prediction layers
                try:
                    t = f.get_tensor(key)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"{fpath}: tensor '{key}' is corrupt or truncated ({e})") from None
                if t.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
                    sk = key[: -len("weight")] + "weight_scale_inv"
                    if sk not in keyset:
                        raise CheckpointError(f"{fpath}: FP8 tensor '{key}' has no '{sk}'")
                    t = _dequantize_fp8(t, f.get_tensor(sk), block)
                em = _EXPERT_RE.match(key)
                fm = _FUSED_RE.match(key)
                if em:
                    put(f"{em.group(1)}.{em.group(3)}", t, key, fname, int(em.group(2)))
                elif fm and fm.group(2) == "gate_up_proj":
                    g, u = t.chunk(2, dim=1)
                    for e in range(t.shape[0]):
                        put(f"{fm.group(1)}.gate_proj", g[e], key, fname, e)
                        put(f"{fm.group(1)}.up_proj", u[e], key, fname, e)
                elif fm:
                    for e in range(t.shape[0]):
                        put(f"{fm.group(1)}.down_proj", t[e], key, fname, e)
                else:
                    put(key, t, key, fname)
    missing = sorted(expected - filled)
    if missing and strict:
        shown = ", ".join(m.replace("#", " expert ") for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: checkpoint is missing tensors: {shown}{more}")
    model.reset_buffers(device)
    model.eval()
    return model
