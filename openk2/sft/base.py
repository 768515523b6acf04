"""The model SFT starts from: an openk2 checkpoint or any transformers causal LM, with K2's special tokens.

| `--base` | loaded as |
|---|---|
| an openk2 run directory (``openk2 pretrain``'s output) | its ``hf/`` checkpoint |
| an HF directory whose config is DeepSeek-V3 / Kimi-K2 | ``K2ForCausalLM`` + openk2's tokenizer |
| ``smollm2``, a ``.gguf`` file, or another transformers directory | ``AutoModelForCausalLM`` + ``AutoTokenizer`` |

A transformers tokenizer that lacks K2's chat and tool-call tokens gets them added as special tokens
and the model's embeddings (and untied head) grow to match (new rows: transformers' mean-resizing).
openk2 tokenizers always reserve them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openk2.data import special_tokens as st
from openk2.errors import CheckpointError, OpenK2Error


@dataclass
class Base:
    model: Any
    tokenizer: Any
    kind: str  # "k2" (openk2 K2ForCausalLM) or "hf" (a transformers model)
    path: Path  # the directory the model came from
    spec: str  # what --base said (what `openk2 serve` loads the base from)
    gguf_file: str | None = None
    added_tokens: list[str] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        if self.kind == "k2":
            return int(self.tokenizer.pad_id)
        t = self.tokenizer
        return int(t.pad_token_id if t.pad_token_id is not None else t.eos_token_id)


def resolve_base(spec: str) -> tuple[str, Path, str | None]:
    """(kind, directory, gguf file) of a --base value, without loading anything."""
    from openk2.model.config import SUPPORTED_MODEL_TYPES

    s = str(spec)
    if s.lower() in ("smollm2", "smollm2-135m-instruct"):
        from openk2.serve.backends import SMOLLM2_FILE, smollm2_path

        return "hf", smollm2_path(), SMOLLM2_FILE
    p = Path(s)
    if p.suffix == ".gguf" and p.is_file():
        return "hf", p.parent, p.name
    if p.is_dir() and not (p / "config.json").is_file() and (p / "hf" / "config.json").is_file():
        p = p / "hf"  # an openk2 run directory: its exported checkpoint
    if not (p.is_dir() and (p / "config.json").is_file()):
        hint = " (an openk2 run without hf/: run `openk2 export` first)" if (p / "checkpoints").is_dir() else ""
        raise CheckpointError(f"--base {s}: not a checkpoint directory, a run directory, a .gguf file or "
                              f"'smollm2'{hint}")
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type", "")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'config.json'}: malformed JSON ({e})") from None
    return ("k2" if model_type in SUPPORTED_MODEL_TYPES else "hf"), p, None


def add_k2_tokens(tokenizer: Any, model: Any) -> list[str]:
    """Add K2's special tokens a transformers tokenizer lacks; grow the model's embeddings. Returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in st.K2_SPECIAL_TOKENS[4:] if t not in vocab]  # the chat / tool-call markers
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    n = len(tokenizer)
    if model.get_input_embeddings().weight.shape[0] < n:
        model.resize_token_embeddings(n)
    return missing


def load_base(spec: str, dtype: torch.dtype = torch.float32) -> Base:
    kind, path, gguf_file = resolve_base(spec)
    if kind == "k2":
        import openk2
        from openk2.data.tokenizer import load_tokenizer

        model = openk2.from_pretrained(path, dtype=dtype)
        tok = load_tokenizer(path)
        missing = [t for t in st.K2_SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise CheckpointError(f"{path}: the tokenizer lacks K2's special tokens {missing}")
        return Base(model, tok, "k2", path, str(spec))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise OpenK2Error("a transformers base model needs transformers: pip install 'openk2[hf]'") from e
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, dtype=dtype)
    if gguf_file and all(p.dtype.is_floating_point for p in model.parameters()):
        # transformers dequantised the GGUF blocks into ordinary weights: train and save them as a plain model
        # (its GGUF quantizer marker would make save_pretrained refuse)
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    added = add_k2_tokens(tok, model)
    return Base(model, tok, "hf", path, str(spec), gguf_file, added)
