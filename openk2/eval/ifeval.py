"""IFEval-style instruction following: verifiable constraints on a free-text reply, each checked by code.

Every item is a writing task (one of 24 topics) with one constraint of one of 15 kinds (IFEval's families:
length, detectable format, keywords, case, punctuation, start/end, combinations such as a postscript).
Parameters (word counts, keywords, phrases) come from a generator seeded by the item id, so ids and prompts
are the same everywhere. Metrics: accuracy overall and per constraint kind (strict: the reply as given).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable

from openk2.eval.core import Item, Suite

TOPICS = ["the history of tea", "how bicycles work", "a visit to a lighthouse", "learning a second language",
          "the water cycle", "a small bakery", "why cats sleep so much", "planting a vegetable garden",
          "the first day at a new job", "volcanoes", "a rainy afternoon in a city", "how to train for a 5k run",
          "the invention of the printing press", "octopuses", "saving money on groceries", "a train journey",
          "the moon landing", "composting at home", "a chess tournament", "honeybees", "repairing an old radio",
          "winter in the mountains", "how vaccines work", "a street market"]
KEYWORDS = ["river", "lantern", "copper", "meadow", "harbor", "puzzle", "velvet", "orbit", "pepper", "signal"]
END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all for today."]


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w[\w'-]*\b", text)


def _count_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))


# kind -> (instruction(params), check(reply, params), params(rng))
KINDS: dict[str, tuple[Callable[[dict], str], Callable[[str, dict], bool], Callable[[random.Random], dict]]] = {
    "min_words": (lambda p: f"Answer with at least {p['n']} words.",
                  lambda r, p: len(_words(r)) >= p["n"], lambda g: {"n": g.choice([60, 80, 100, 150])}),
    "bullets": (lambda p: f"Your answer must contain exactly {p['n']} bullet points. Use markdown bullet points "
                          "such as:\n* This is point 1.\n* This is point 2",
                lambda r, p: len(re.findall(r"^\s*[*-]\s", r, re.MULTILINE)) == p["n"],
                lambda g: {"n": g.choice([2, 3, 4, 5])}),
    "keywords": (lambda p: f"Include the keywords {p['k'][0]!r} and {p['k'][1]!r} in the response.",
                 lambda r, p: all(_count_word(r, k) > 0 for k in p["k"]), lambda g: {"k": g.sample(KEYWORDS, 2)}),
    "keyword_frequency": (lambda p: f"In your response, the word {p['w']!r} should appear at least {p['n']} times.",
                          lambda r, p: _count_word(r, p["w"]) >= p["n"],
                          lambda g: {"w": g.choice(KEYWORDS), "n": g.choice([2, 3, 4])}),
    "lowercase": (lambda p: "Your entire response should be in English, and in all lowercase letters. "
                            "No capital letters are allowed.",
                  lambda r, p: bool(r.strip()) and r == r.lower(), lambda g: {}),
    "uppercase": (lambda p: "Your entire response should be in English, and in all capital letters.",
                  lambda r, p: bool(r.strip()) and r == r.upper(), lambda g: {}),
    "no_comma": (lambda p: "In your entire response, refrain from the use of any commas.",
                 lambda r, p: bool(r.strip()) and "," not in r and len(_words(r)) >= 20, lambda g: {}),
    "end_phrase": (lambda p: f"Finish your response with this exact phrase {p['s']!r}. No other words should "
                             "follow this phrase.",
                   lambda r, p: r.strip().endswith(p["s"]), lambda g: {"s": g.choice(END_PHRASES)}),
    "quotation": (lambda p: "Wrap your entire response with double quotation marks.",
                  lambda r, p: len(r.strip()) > 2 and r.strip()[0] == '"' and r.strip()[-1] == '"', lambda g: {}),
    "json": (lambda p: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
             lambda r, p: _is_json(r), lambda g: {}),
    "paragraphs": (lambda p: f"There should be {p['n']} paragraphs. Paragraphs are separated with the markdown "
                             "divider: ***",
                   lambda r, p: len([x for x in re.split(r"\s*\*\*\*\s*", r.strip()) if x.strip()]) == p["n"]
                   and r.count("***") == p["n"] - 1, lambda g: {"n": g.choice([2, 3, 4])}),
    "title": (lambda p: "Your answer must contain a title, wrapped in double angular brackets, such as "
                        "<<poem of joy>>.",
              lambda r, p: re.search(r"<<[^\n<>]+>>", r) is not None, lambda g: {}),
    "postscript": (lambda p: f"At the end of your response, please explicitly add a postscript starting with {p['m']}",
                   lambda r, p: re.search(rf"^\s*{re.escape(p['m'])}\s*\S", r, re.MULTILINE) is not None,
                   lambda g: {"m": g.choice(["P.S.", "P.P.S"])}),
    "highlights": (lambda p: f"Highlight at least {p['n']} sections in your answer with markdown, i.e. "
                             "*highlighted section*.",
                   lambda r, p: len([h for h in re.findall(r"\*([^\n*]+)\*", r) if h.strip()]) >= p["n"],
                   lambda g: {"n": g.choice([2, 3])}),
    "placeholders": (lambda p: f"The response must contain at least {p['n']} placeholders represented by square "
                               "brackets, such as [address].",
                     lambda r, p: len(re.findall(r"\[[^\[\]\n]+\]", r)) >= p["n"], lambda g: {"n": g.choice([2, 3])}),
}


def _is_json(reply: str) -> bool:
    s = reply.strip()
    s = re.sub(r"^```(?:json|JSON)?\s*", "", s)
    s = re.sub(r"\s*```$", "", s)
    try:
        json.loads(s)
        return True
    except json.JSONDecodeError:
        return False


def check(kind: str, reply: str, params: dict[str, Any]) -> bool:
    return bool(KINDS[kind][1](reply or "", params))


class IFEval(Suite):
    name = "ifeval"
    max_tokens = 384
    description = "IFEval-style instruction following: 15 verifiable constraint kinds x 24 topics, checked by code"

    def load(self) -> list[Item]:
        out = []
        for kind, (instr, _, gen) in KINDS.items():
            for i, topic in enumerate(TOPICS):
                params = gen(random.Random(f"ifeval/{kind}/{i}"))
                prompt = f"Write a short piece about {topic}. {instr(params)}"
                out.append(Item(f"{kind}/{i}", [{"role": "user", "content": prompt}],
                                gold={"kind": kind, "params": params, "topic": topic}, category=kind))
        return out

    async def score(self, item: Item, reply: dict[str, Any]) -> dict[str, Any]:
        return {"passed": check(item.gold["kind"], reply.get("content") or "", item.gold["params"])}


def gold_reply(item: Item) -> str:
    """A reply that follows the item's constraint (for the harness test)."""
    kind, p, topic = item.gold["kind"], item.gold["params"], item.gold["topic"]
    base = (f"this is a short piece about {topic} and it tells the reader what matters most about it "
            "in plain words that anyone can follow and enjoy")
    words = base.split()
    long = " ".join(words[i % len(words)] for i in range(160)) + "."
    return {
        "min_words": long,
        "bullets": "\n".join(f"* point {j + 1} about {topic}." for j in range(p.get("n", 0))),
        "keywords": f"{base} with a {p['k'][0] if 'k' in p else ''} and a {p['k'][1] if 'k' in p else ''}.",
        "keyword_frequency": " ".join([f"{base} {p.get('w', '')}."] * p.get("n", 0)),
        "lowercase": base + ".",
        "uppercase": base.upper() + ".",
        "no_comma": base + ".",
        "end_phrase": f"{base}. {p.get('s', '')}",
        "quotation": f'"{base}."',
        "json": json.dumps({"topic": topic, "text": base}),
        "paragraphs": "\n\n***\n\n".join(f"paragraph {j + 1}: {base}." for j in range(p.get("n", 0))),
        "title": f"<<notes on {topic}>>\n{base}.",
        "postscript": f"{base}.\n\n{p.get('m', '')} thanks for reading.",
        "highlights": f"{base}. " + " ".join(f"*part {j + 1}*" for j in range(p.get("n", 0))),
        "placeholders": f"{base} at [place] on [date] with [name].",
    }[kind]
