"""A model ready to chat: a backend, its tokenizer, its chat template and its tool-call format.

:class:`ChatModel` turns OpenAI-style messages (and tools, tool_choice) into prompt
ids and sampling constraints, and a completion back into content and tool calls.
K2's format (:mod:`openk2.chat`) serves openk2 checkpoints; an HF model renders
with its tokenizer's own chat template. An HF template that never writes the tools it is
given (SmolLM2's) gets openk2's tool prompt instead (:mod:`openk2.chat.tool_prompt`: the
tools in the system message, calls as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``),
so every model can take part in tool use, ``tool_choice`` included.

An openk2 checkpoint is served with the chat template it ships (``chat_template.jinja``,
else ``chat_template`` in ``tokenizer_config.json``), as transformers and vLLM do, or
with the one ``--chat-template`` names. A template that is byte for byte one of the
named K2 templates renders with openk2's Python renderer (proven equal to it by
tests/test_chat_template.py); any other renders with Jinja. A checkpoint that ships
none gets openk2's default, ``k2-instruct-0905``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from openk2.data import special_tokens as st
from openk2.errors import OpenK2Error
from openk2.chat.tool_prompt import TOOL_CALL_OPEN
from openk2.chat import (
    DEFAULT_TEMPLATE,
    ParseResult,
    ToolChoicePlan,
    encode_conversation,
    parse_tool_calls,
    plan_tool_choice,
    flatten_content,
    parse_tagged_tool_calls,
    render_tool_messages,
    template_renders_tools,
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
    _tool_probe: tuple[Any, bool] | None = field(default=None, repr=False)  # (HF template text, whether it writes tools)

    def template_banner(self) -> str:
        """e.g. ``k2 format, chat template k2-instruct-0905, from the checkpoint``."""
        return f"{self.template} format, chat template {self.template_name}, {self.template_source}"

    # -- tool syntax
    @property
    def uses_tool_prompt(self) -> bool:
        """An HF model whose chat template has no tool syntax: tools go through openk2's tool prompt."""
        if self.template == "k2":
            return False
        text = getattr(self.tokenizer, "chat_template", None)
        if self._tool_probe is None or self._tool_probe[0] != text:  # probed again after set_chat_template
            def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
                return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=True)
            self._tool_probe = (text, template_renders_tools(render))
        return not self._tool_probe[1]

    @property
    def tool_syntax(self) -> str | None:
        """How tool calls are written: ``k2`` (K2's special tokens), ``tagged`` (``<tool_call>{json}</tool_call>``:
        openk2's tool prompt, or an HF template whose own syntax is that one), None (an HF template's own
        syntax openk2 does not read; calls come back as text)."""
        if self.template == "k2":
            return "k2"
        if self.uses_tool_prompt or TOOL_CALL_OPEN in (getattr(self.tokenizer, "chat_template", None) or ""):
            return "tagged"
        return None

    @property
    def tool_call_marker(self) -> str | None:
        """The text that opens a tool call in this model's completions."""
        syntax = self.tool_syntax
        return st.TOOL_CALLS_SECTION_BEGIN if syntax == "k2" else TOOL_CALL_OPEN if syntax == "tagged" else None

    # -- prompts
    def chat_prompt_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        messages = flatten_content(messages)  # content None / text parts, the same for every template
        if self.template == "k2":
            if self.chat_jinja is not None:
                text = render_jinja(self.chat_jinja, messages, tools, add_generation_prompt=True,
                                    bos_token=getattr(self.tokenizer, "bos_token", ""),
                                    eos_token=getattr(self.tokenizer, "eos_token", ""))
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            ids, _ = encode_conversation(self.tokenizer, messages, tools, add_generation_prompt=True,
                                         template=self.template_name)
            return ids
        return list(self.tokenizer.encode(self.chat_prompt_text(messages, tools), add_special_tokens=False))

    def chat_prompt_text(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
        """An HF model's prompt as text (with the tool prompt when its template has no tool syntax)."""
        if self.template == "k2":
            raise ValueError("chat_prompt_text is for HF templates; K2's prompt is rendered by openk2.chat")
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if self.uses_tool_prompt:
            msgs = render_tool_messages(messages, tools)
        else:
            msgs = flatten_content(messages)
            if tools:
                kwargs["tools"] = list(tools)
        return self.tokenizer.apply_chat_template(msgs, **kwargs)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def parse(self, text: str, tools: Sequence[dict[str, Any]] | None = None, first_call_index: int = 0) -> ParseResult:
        """Content and tool calls of a completion (K2's format or the tagged syntax; any other HF
        template's calls stay in the content). ``first_call_index``: calls earlier in the
        conversation (tagged call ids count over it; K2's ids are the model's own)."""
        syntax = self.tool_syntax
        if syntax == "k2":
            return parse_tool_calls(text, tools)
        if syntax == "tagged":
            return parse_tagged_tool_calls(text, tools, self.stop_texts(), first_call_index)
        for s in self.stop_texts():
            if s and s in text:
                text = text[: text.index(s)]
        return ParseResult(content=text)

    def prepare_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                     tool_choice: Any, params: Any) -> tuple[list[int], Any, ToolChoicePlan]:
        """Prompt ids, sampling params and the tool_choice plan for a chat request.

        ``required`` / a named tool: the call's opening text is forced (part of the prompt), then the
        output is constrained to a call of an allowed tool with arguments valid for its schema
        (``params.json_schema`` when one tool is possible, else ``params.grammar``, a ``ChoiceGrammar``
        with one alternative per tool); ``none``: K2 bans the section token, the tagged syntax stops at
        ``<tool_call>``.
        """
        import dataclasses

        syntax = self.tool_syntax
        if syntax is None:
            if tool_choice not in (None, "auto", "none"):
                raise ValueError(f"tool_choice={tool_choice!r} needs a tool-call syntax openk2 reads; this model's "
                                 "chat template has its own")
            return self.chat_prompt_ids(messages, tools), params, ToolChoicePlan(syntax="hf")  # calls stay text
        plan = plan_tool_choice(messages, tools, tool_choice, syntax=syntax)
        ids = self.chat_prompt_ids(messages, tools)
        if plan.prefix:
            ids += self.text_prompt_ids(plan.prefix)
        if plan.arguments_schema is not None:
            params = dataclasses.replace(params, json_schema=plan.arguments_schema, grammar=None)
        if plan.alternatives:
            try:
                from openk2.serve.constrained import ChoiceGrammar
            except ImportError:
                raise ValueError(f"tool_choice={tool_choice!r} with several tools needs "
                                 "openk2.serve.constrained.ChoiceGrammar") from None
            params = dataclasses.replace(params, json_schema=None, grammar=ChoiceGrammar(plan.alternatives))
        if plan.forbid_calls:
            ban = self.tokenizer.token_to_id(st.TOOL_CALLS_SECTION_BEGIN)
            params = dataclasses.replace(params, banned_ids=tuple(params.banned_ids) + ((ban,) if ban is not None else ()))
        if plan.stop:
            params = dataclasses.replace(params, stop=tuple(params.stop) + plan.stop)
        return ids, params, plan

    def finish_chat(self, text: str, plan: ToolChoicePlan, tools: Sequence[dict[str, Any]] | None,
                    complete: bool = True) -> ParseResult:
        """Parse a chat completion, putting back the forced prefix (and the suffix once the arguments are complete)."""
        full = plan.prefix + text + (plan.suffix if complete else "")
        return self.parse(full, tools, plan.first_call_index)

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
