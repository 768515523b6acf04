"""Fidelity checks that need no model, and a script-and-stopword language detector.

Every rewrite of a chunk is compared with its source:

* numbers (dates are numbers too: years, days) of the source must all appear in
  the rewrite (digit groups normalised, "1,200" == "1200"; number words
  one..twenty count as their digits);
* month names of the source must appear;
* named entities (capitalised word sequences, sentence-initial words only when
  the source also capitalises them elsewhere) must be kept at a recall of at
  least ``entity_recall``;
* the length ratio (rewrite / source tokens) must lie within bounds;
* the rewrite must not be a near-copy (share at most ``max_copy`` of its word
  trigrams with the source).

``detect_language`` tells the script (Cyrillic, Greek, Han, kana, Hangul,
Arabic, Hebrew, Devanagari, Thai) and, for Latin script, picks among English,
French, German, Spanish, Italian, Portuguese and Dutch by stopword counts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_NUM = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:/\d+)?")
_THOUSANDS = re.compile(r"^\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
MONTHS = ("January February March April May June July August September October November December").split()
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*", re.UNICODE)
_SENT_END = re.compile(r"[.!?:;\n]\s*$")
# capitalised words that are not names
_NOT_NAMES = set("""I A An The This That These Those It Its He She They We You His Her Their Our My Your There Here
What When Where Which Who Whom Whose Why How If In On At By For From To Of And Or But As With Without After Before
During Since Until While Although Because Q A Answer Question Problem Approach Steps Step Key Idea Working Note Notes
Student Teacher Sure Yes No Not Also Then Thus So First Second Third Finally Today Once Part Original
Rewrite""".split())


def normalise_number(s: str) -> str:
    s = s.lstrip("+")
    if _THOUSANDS.match(s.lstrip("-")):
        s = s.replace(",", "")
    s = s.replace(",", ".") if re.fullmatch(r"-?\d+,\d{1,2}", s) else s  # 3,5 (decimal comma) -> 3.5
    if "." in s and "/" not in s:
        try:
            return repr(float(s)).removesuffix(".0")
        except ValueError:
            return s
    return (s.lstrip("0") or "0") if s.isdigit() else s


def numbers(text: str) -> set[str]:
    """The numbers a text states (normalised), number words one..twenty included."""
    out = {normalise_number(m.group()) for m in _NUM.finditer(text)}
    out |= {_NUMBER_WORDS[w.lower()] for w in _WORD.findall(text) if w.lower() in _NUMBER_WORDS}
    return out


def months(text: str) -> set[str]:
    words = set(_WORD.findall(text))
    return {m for m in MONTHS if m in words}


def named_entities(text: str) -> set[str]:
    """Capitalised word sequences ("Port Amsel", "Zorvan Keltiq"); a sentence's first word only counts when
    the text capitalises it somewhere mid-sentence too."""
    mid: set[str] = set()
    spans: list[list[str]] = []
    current: list[str] = []
    for m in _WORD.finditer(text):
        w = m.group()
        start = m.start()
        before = text[max(0, start - 3):start]
        initial = start == 0 or bool(_SENT_END.search(text[:start])) or before.strip() in ('"', "-", "*", "(")
        cap = w[:1].isupper() and not w.isupper() or (w.isupper() and len(w) > 1)
        if cap and w not in _NOT_NAMES and w not in MONTHS:
            if not initial:
                mid.add(w)
            gap = text[m.start() - 1:m.start()] if current else ""
            if current and (gap != " " or initial):
                spans.append(current)
                current = []
            current.append(w if not initial else "\0" + w)
        else:
            if current:
                spans.append(current)
            current = []
    if current:
        spans.append(current)
    out = set()
    for span in spans:
        # a sentence-initial word counts only when the text also capitalises it mid-sentence
        words = [w[1:] if w.startswith("\0") and w[1:] in mid else w for w in span]
        words = [w for w in words if not w.startswith("\0")]
        if words:
            out.add(" ".join(words))
    return out


def _trigrams(text: str) -> list[tuple[str, ...]]:
    w = [x.lower() for x in _WORD.findall(text)]
    return [tuple(w[i:i + 3]) for i in range(len(w) - 2)]


def copy_fraction(source: str, rewrite: str) -> float:
    """Share of the rewrite's word trigrams that occur in the source (1.0: a verbatim copy)."""
    rt = _trigrams(rewrite)
    if not rt:
        return 0.0
    st = set(_trigrams(source))
    return sum(t in st for t in rt) / len(rt)


@dataclass
class CheckResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)  # reason codes: missing_numbers, missing_entities, ...
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckConfig:
    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.5
    max_copy: float = 0.85  # near-copy when more of the rewrite's trigrams than this are the source's
    entity_recall: float = 0.8
    check_numbers: bool = True
    check_entities: bool = True


def check_rewrite(source: str, rewrite: str, cfg: CheckConfig, count_tokens=None,
                  translated: bool = False) -> CheckResult:
    """Model-free fidelity of one rewritten chunk. `translated`: the rewrite is in another language (names and
    month words may be translated, so only numbers are compared and no near-copy test applies)."""
    reasons: list[str] = []
    details: dict = {}
    if not rewrite.strip():
        return CheckResult(False, ["empty_rewrite"], {})
    count = count_tokens or (lambda t: len(t.split()))
    n_src, n_new = max(1, count(source)), count(rewrite)
    ratio = n_new / n_src
    details["length_ratio"] = round(ratio, 3)
    if not cfg.min_length_ratio <= ratio <= cfg.max_length_ratio:
        reasons.append("length_ratio")
    if cfg.check_numbers:
        missing = sorted(numbers(source) - numbers(rewrite))
        if not translated:
            missing += sorted(months(source) - months(rewrite))
        if missing:
            reasons.append("missing_numbers")
            details["missing_numbers"] = missing[:20]
    if cfg.check_entities and not translated:
        ents = named_entities(source)
        if ents:
            kept = [e for e in ents if e in rewrite]
            recall = len(kept) / len(ents)
            details["entity_recall"] = round(recall, 3)
            if recall < cfg.entity_recall:
                reasons.append("missing_entities")
                details["missing_entities"] = sorted(ents - set(kept))[:20]
    if not translated and len(_trigrams(source)) >= 8:
        cf = copy_fraction(source, rewrite)
        details["copy_fraction"] = round(cf, 3)
        if cf > cfg.max_copy:
            reasons.append("near_copy")
    return CheckResult(not reasons, reasons, details)


# --------------------------------------------------------------------------- language detection
_STOPWORDS = {
    "en": ("the of and to in is that it was for on are with as be by this at from or an which have has were not a "
           "he she his her they their we you i but so had been will can how many what each").split(),
    "fr": "le la les de des du et est un une en que qui dans pour pas sur au avec il elle sont ce par on nous".split(),
    "de": "der die das und ist ein eine zu den von mit sich des auf für nicht im dem es sie wir wie auch aus".split(),
    "es": "el la los las de y que en un una es por con para del se no al lo como su más pero sus hay".split(),
    "it": "il lo la gli le di e che è un una per con del della non si sono al nel da come anche ma".split(),
    "pt": "o a os as de e que em um uma é do da para com não no na por se dos das mais ao".split(),
    "nl": "de het een en van is dat op te in zijn met voor niet aan er ook als bij door wordt".split(),
}
_SCRIPTS = [  # (unicode name prefix, language)
    ("CYRILLIC", "ru"), ("GREEK", "el"), ("HIRAGANA", "ja"), ("KATAKANA", "ja"), ("HANGUL", "ko"),
    ("CJK UNIFIED", "zh"), ("ARABIC", "ar"), ("HEBREW", "he"), ("DEVANAGARI", "hi"), ("THAI", "th"),
]


def _script_of(ch: str) -> str:
    if ch.isascii():
        return "LATIN" if ch.isalpha() else ""
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return ""
    for prefix, _ in _SCRIPTS:
        if name.startswith(prefix):
            return prefix
    return "LATIN" if name.startswith("LATIN") else ""


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code or "und", confidence in [0, 1]) of `text`."""
    counts: dict[str, int] = {}
    for ch in text:
        s = _script_of(ch)
        if s:
            counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    if not total:
        return "und", 0.0
    script, n = max(counts.items(), key=lambda kv: kv[1])
    if script != "LATIN":
        lang = dict(_SCRIPTS)[script]
        if script in ("CJK UNIFIED",) and (counts.get("HIRAGANA", 0) + counts.get("KATAKANA", 0)) > 0.05 * total:
            lang = "ja"
        if script == "CYRILLIC" and re.search(r"[іїєґ]", text.lower()):
            lang = "uk"
        return lang, round(n / total, 3)
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return "und", 0.0
    scores = {lang: sum(w in sw for w in words) for lang, sw in _STOPWORDS_SETS.items()}
    best = max(scores, key=lambda k: scores[k])
    hits = scores[best]
    if hits < 3:  # too little text to tell Latin-script languages apart
        return "und", 0.0
    second = max(v for k, v in scores.items() if k != best) if len(scores) > 1 else 0
    return best, round((hits - second) / hits, 3)


_STOPWORDS_SETS = {k: set(v) for k, v in _STOPWORDS.items()}
