"""K2's chat templates as Jinja: the named templates' text, a checkpoint's own template, rendering.

    from openk2.chat.template import template_text, render_jinja
    text = template_text("k2-instruct-0905")          # what checkpoints ship as chat_template.jinja
    prompt = render_jinja(text, messages, tools, add_generation_prompt=True)

``render_jinja`` renders the way transformers' ``apply_chat_template`` does (a sandboxed
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, ``tojson`` as ``json.dumps``
with non-ASCII kept), after rewriting tool-call ids to K2's ``functions.NAME:IDX``
(``normalize_messages``), so that any template (a checkpoint's own, or one given with
``openk2 serve --chat-template``) sees the conversations openk2 trains on.

For a template that is not one of the named ones, ``jinja_segments`` /
``encode_conversation_jinja`` give the SFT loss mask from the rendered turns: an
assistant turn's trained text is what rendering the conversation up to it adds
to rendering the conversation before it with the generation prompt.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from openk2.chat.render import (DEFAULT_TEMPLATE, TEMPLATE_NAMES, Message, Segment, TextTokenizer, encode_segments,
                                normalize_messages)

TEMPLATE_DIR = Path(__file__).parent / "templates"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def template_text(name: str = DEFAULT_TEMPLATE) -> str:
    """The Jinja text of a named template (``k2-instruct`` or ``k2-instruct-0905``)."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATE_NAMES)})")
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def template_name(text: str | None) -> str | None:
    """The named template whose text ``text`` is, byte for byte; None for any other text."""
    if text is None:
        return None
    return next((n for n in TEMPLATE_NAMES if template_text(n) == text), None)


def checkpoint_template(directory: str | Path) -> str | None:
    """A checkpoint's own chat template: ``chat_template.jinja``, else ``chat_template`` in
    ``tokenizer_config.json`` (transformers' order); None when it ships neither."""
    d = Path(directory)
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    cfg_path = d / TOKENIZER_CONFIG_FILE
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: malformed JSON ({e})") from e
        tpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(tpl, list):  # transformers' list form: [{"name": "default", "template": ...}, ...]
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(tpl, str):
            return tpl
    return None


def resolve_template(spec: str | Path) -> tuple[str, str]:
    """(label, Jinja text) of a template given by name, by a .jinja file, or by a directory that ships one."""
    s = str(spec)
    if s in TEMPLATE_NAMES:
        return s, template_text(s)
    p = Path(s)
    if p.is_dir():
        text = checkpoint_template(p)
        if text is None:
            raise ValueError(f"{p}: no {CHAT_TEMPLATE_FILE} or chat_template in {TOKENIZER_CONFIG_FILE}")
        return template_name(text) or f"{p} (custom)", text
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        return template_name(text) or f"{p} (custom)", text
    raise ValueError(f"chat template {s!r}: not one of {', '.join(TEMPLATE_NAMES)}, a .jinja file or a directory")


@lru_cache(maxsize=16)
def _compile(text: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text)


def render_jinja(
    text: str,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    normalize: bool = True,
    **kwargs: Any,
) -> str:
    """Render a conversation with a Jinja chat template, as transformers would (ids normalised first)."""
    msgs = normalize_messages(messages) if normalize else [dict(m) for m in messages]
    return _compile(text).render(messages=msgs, tools=list(tools) if tools else None,
                                 add_generation_prompt=add_generation_prompt, **kwargs)


def jinja_segments(
    text: str,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: str = "all",
) -> list[Segment]:
    """A Jinja rendering cut into train/no-train segments at the assistant turns.

    Assistant turn i is trained from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[:i+1])``; both must be prefixes of the full rendering
    (a template that rewrites earlier turns, or names a turn differently from its generation
    prompt, raises ValueError: no loss mask can be cut from it).
    """
    if train_on not in ("all", "last", "none"):
        raise ValueError(f"train_on must be all, last or none, got {train_on!r}")
    msgs = normalize_messages(messages)
    full = render_jinja(text, msgs, tools, add_generation_prompt, normalize=False)
    turns = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    chosen = turns if train_on == "all" else turns[-1:] if train_on == "last" else []
    segs: list[Segment] = []
    pos = 0
    for i in chosen:
        prompt = render_jinja(text, msgs[:i], tools, True, normalize=False)
        upto = render_jinja(text, msgs[: i + 1], tools, False, normalize=False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= pos):
            raise ValueError(f"message {i}: the template's rendering of the turns before it plus the generation "
                             "prompt is not a prefix of the conversation; cannot cut a loss mask from it")
        segs += [Segment(full[pos:len(prompt)], False), Segment(upto[len(prompt):], True)]
        pos = len(upto)
    segs.append(Segment(full[pos:], False))
    return [s for s in segs if s.text]


def encode_conversation_jinja(
    tokenizer: TextTokenizer,
    text: str,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: str = "all",
) -> tuple[list[int], list[int]]:
    """Token ids and SFT loss mask of a conversation rendered with any Jinja template.

    Segments are encoded one by one; for K2's templates they split at special tokens, so the ids
    equal encoding the whole rendering (and equal ``encode_conversation``'s).
    """
    return encode_segments(tokenizer, jinja_segments(text, messages, tools, add_generation_prompt, train_on))
