"""A model ready to chat: a backend, its tokenizer, its chat template and its tool-call format.

:class:`ChatModel` turns OpenAI-style messages (and tools, tool_choice) into prompt
ids and sampling constraints, and a completion back into content and tool calls.
K2's format (:mod:`openk2.chat`) serves openk2 checkpoints; an HF model renders
with its tokenizer's own chat template.

An openk2 checkpoint is served with the chat template it ships (``chat_template.jinja``,
else ``chat_template`` in ``tokenizer_config.json``), as transformers and vLLM do, or
with the one ``--chat-template`` names. A template that is byte for byte one of the
named K2 templates renders with openk2's Python renderer (proven equal to it by
tests/test_chat_template.py); any other renders with Jinja. A checkpoint that ships
none gets openk2's default, ``k2-instruct-0905``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from openk2.data import special_tokens as st
from openk2.errors import OpenK2Error
from openk2.chat import (
    DEFAULT_TEMPLATE,
    ParseResult,
    ToolChoicePlan,
    encode_conversation,
    parse_tool_calls,
    plan_tool_choice,
    render_jinja,
    resolve_template,
    template_name,
)


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
