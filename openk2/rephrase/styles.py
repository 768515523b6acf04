"""The prompt library: style- and perspective-diverse rewrites of knowledge text, and math "learning notes".

K2 rephrased its knowledge corpus with "style- and perspective-diverse prompts"
(report §2, "Knowledge Data Rephrasing") and its math corpus into a "learning
notes" style, translating non-English material into English. Each rewrite of a
document picks its style from a seeded permutation of the library, so the
rewrites of one document differ as long as there are no more of them than
styles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from openk2.errors import ConfigError


@dataclass(frozen=True)
class Style:
    name: str
    kind: str  # "knowledge" or "math"
    instruction: str


_KEEP = ("Keep every fact, name, number and date exactly as in the original; add no facts of your own and leave "
         "nothing out. Reply with the rewritten text only.")

KNOWLEDGE_STYLES: dict[str, Style] = {s.name: s for s in [
    Style("encyclopedic", "knowledge", "Rewrite the text as a neutral encyclopedia entry, in the third person."),
    Style("textbook-beginner", "knowledge", "Rewrite the text as a passage of a textbook for a beginner: plain "
          "words, short sentences, each idea explained."),
    Style("qa", "knowledge", "Rewrite the text as a series of questions, each followed by its answer "
          "(\"Q: ...\" then \"A: ...\")."),
    Style("lecture-notes", "knowledge",
          "Rewrite the text as a lecturer's notes: short bullet points, one fact per line."),
    Style("narrative", "knowledge", "Retell the text as a short story told by a narrator, in the past tense."),
    Style("expert-summary", "knowledge", "Rewrite the text as a dense summary written by an expert for other experts."),
    Style("dialogue", "knowledge", "Rewrite the text as a conversation between a student and a teacher who "
          "explains the facts."),
    Style("first-person", "knowledge", "Rewrite the text in the first person, as if the subject of the text "
          "(or a witness) were telling it."),
    Style("news-report", "knowledge", "Rewrite the text as a short news report."),
    Style("flashcards", "knowledge", "Rewrite the text as study flashcards: one line per card, a cue, then "
          "\" - \", then the fact."),
]}

MATH_STYLES: dict[str, Style] = {s.name: s for s in [
    Style("learning-notes", "math", "Rewrite the material as a student's learning notes with four parts: "
          "\"Problem:\" (the problem restated), \"Approach:\" (the idea), \"Steps:\" (numbered steps with every "
          "calculation) and \"Answer:\" (the final answer alone)."),
    Style("learning-notes-concise", "math", "Rewrite the material as concise learning notes: \"Problem:\", "
          "\"Key idea:\", \"Working:\" (each calculation on its own line) and \"Answer:\" (the final answer alone)."),
]}

STYLES: dict[str, Style] = {**KNOWLEDGE_STYLES, **MATH_STYLES}


def get_styles(names: list[str] | tuple[str, ...] | None, kind: str) -> list[Style]:
    """The styles named (all of `kind` when None); unknown names are a ConfigError."""
    pool = KNOWLEDGE_STYLES if kind == "knowledge" else MATH_STYLES
    if not names:
        return list(pool.values())
    out = []
    for n in names:
        if n not in STYLES:
            raise ConfigError(f"unknown rephrasing style {n!r} (known: {', '.join(STYLES)})")
        if STYLES[n].kind == kind:
            out.append(STYLES[n])
    return out or list(pool.values())


def choose_styles(doc_id: str, n: int, styles: list[Style], seed: int = 0) -> list[Style]:
    """The styles of rewrites 0..n-1 of one document: a permutation of `styles` seeded by (seed, doc_id).

    Distinct for n <= len(styles); past that the permutation repeats (the rewrites still differ by sampling seed).
    """
    if not styles:
        raise ConfigError("no rephrasing styles to choose from")
    order = sorted(styles, key=lambda s: hashlib.sha256(f"{seed}:{doc_id}:{s.name}".encode()).hexdigest())
    return [order[k % len(order)] for k in range(n)]


def system_prompt(style: Style, translate_from: str | None = None) -> str:
    """The system message of one rewrite."""
    if style.kind == "math":
        lead = "You turn mathematics material into clear study notes."
        if translate_from:
            lead += f" The material is written in {language_name(translate_from)}: write the notes in English."
        keep = ("Keep every number, expression and the final answer exactly as in the original. "
                "Reply with the notes only.")
        return f"{lead} {style.instruction} {keep}"
    return f"You rewrite text in a new style without changing its content. {style.instruction} {_KEEP}"


def rewrite_messages(style: Style, chunk: str, tail: str, index: int, total: int,
                     translate_from: str | None = None) -> list[dict]:
    """Messages for rewriting chunk `index` of `total`, conditioned on the tail of the rewrite so far."""
    if index == 0 or not tail:
        where = "" if total == 1 else f" (part 1 of {total} of a longer document)"
        user = f"Original text{where}:\n\n{chunk}"
    else:
        user = (f"You are rewriting a long document part by part. Your rewrite so far ends with:\n\n...{tail}\n\n"
                f"Continue it: rewrite the next part of the original (part {index + 1} of {total}) so that it "
                f"follows on from the text above in the same style. Do not repeat what is already written.\n\n"
                f"Next part of the original:\n\n{chunk}")
    return [{"role": "system", "content": system_prompt(style, translate_from)}, {"role": "user", "content": user}]


JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["faithful", "unfaithful"]},
        "differences": {"type": "array", "items": {"type": "string", "maxLength": 160}, "maxItems": 4},
    },
    "required": ["verdict", "differences"],
    "additionalProperties": False,
}


def judge_messages(original: str, rewrite: str) -> list[dict]:
    """Messages asking the judge whether `rewrite` states the same facts as `original`."""
    return [
        {"role": "system", "content": "You check rewrites for faithfulness. A rewrite is faithful when every claim "
         "in it is stated or directly implied by the original and no fact of the original is changed (names, "
         "numbers, dates, places, relations). Style, order and wording may differ. Reply with JSON: "
         "{\"verdict\": \"faithful\" or \"unfaithful\", \"differences\": [claims that differ]}."},
        {"role": "user", "content": f"Original:\n{original}\n\nRewrite:\n{rewrite}"},
    ]


LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "uk": "Ukrainian", "el": "Greek",
                  "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "he": "Hebrew",
                  "hi": "Hindi", "th": "Thai"}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)
