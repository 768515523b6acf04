"""The final answer of a worked problem, and whether a rewrite kept it (math-verify where it parses).

The answer is what follows the last "####" (GSM8K), the last ``\\boxed{...}``, an
"Answer:" / "answer is" / "Réponse :" / "Antwort:" / "答案" line, or else the
last number of the text. Two answers match when math-verify
(https://github.com/huggingface/Math-Verify) proves them equal; when it is not
installed or cannot parse one of them, when their normalised forms are equal.
"""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(
    r"(?:####|\banswer\s*(?:is|:)|\bfinal answer\s*(?:is|:)?|réponse\s*:|respuesta\s*:|antwort\s*:|risposta\s*:|"
    r"resposta\s*:|ответ\s*:|答案\s*[:：是]?)\s*(.+)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*(?:/\d+)?")


def final_answer(text: str) -> str | None:
    """The stated final answer of a solution, or None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    lines = [m.group(1).strip() for m in _ANSWER_LINE.finditer(text)]
    for line in reversed(lines):
        line = line.strip(" *.$")
        if line:
            unit = re.match(r"([-+]?\d+(?:[.,]\d+)*(?:/\d+)?)\s*[^\d=+*/^\\]*$", line)  # "42 km" -> 42
            if unit:
                return unit.group(1)
            nums = _NUMBER.findall(line)
            return nums[0] if nums and len(line) > 24 else line
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def _norm(a: str) -> str:
    a = a.strip().strip("$ .").replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    try:
        f = float(a)
        return repr(f).removesuffix(".0")
    except ValueError:
        return a.lower()


def answers_match(reference: str, candidate: str) -> tuple[bool, str]:
    """(equal?, how it was decided: "math-verify" or "string")."""
    try:
        from math_verify import parse, verify

        gold, pred = parse(f"${reference}$"), parse(f"${candidate}$")
        if gold and pred:
            return bool(verify(gold, pred)), "math-verify"
    except ImportError:
        pass
    except Exception:  # math-verify raises on some inputs; fall back to the string comparison
        pass
    return _norm(reference) == _norm(candidate), "string"


def looks_like_math(text: str) -> bool:
    """A worked problem or math notes: an answer marker, LaTeX, or several equations."""
    if re.search(r"####|\\boxed|\\frac|\$[^$]+\$", text):
        return True
    return len(re.findall(r"\d\s*[-+*/×÷=]\s*\d", text)) >= 2
