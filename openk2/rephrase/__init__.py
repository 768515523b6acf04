"""Pre-training data rephrasing (K2 report §2): style-diverse, chunk-wise autoregressive rewrites with fidelity checks.

    from openk2.llm import make_client
    from openk2.rephrase import Rephraser, RephraseConfig, read_inputs, corpus_config

    docs, bad = read_inputs(["corpus:default/text"], limit=100)
    summary = Rephraser(make_client("smollm2"), RephraseConfig(rephrasings=2), "runs/rephrase/text").run(docs, bad)
    cfg = corpus_config({"text-rephrased": "runs/rephrase/text"})   # a corpus with the rewrites as a domain

| module | what it does |
|---|---|
| ``styles``    | the prompt library (10 knowledge styles, 2 math learning-notes styles), the judge prompt and schema |
| ``chunking``  | token-budgeted splitting at paragraph / sentence / word boundaries, tail of the rewrite so far |
| ``checks``    | model-free fidelity checks (numbers, dates, names, length ratio, near-copy) and language detection |
| ``mathcheck`` | final answers of worked problems, compared with math-verify |
| ``pipeline``  | ``Rephraser``: work units, waves of concurrent requests, retries, journal (resume), outputs, summary |
| ``inputs``    | JSONL / text files / corpus domains in; the output as a corpus domain |
| ``ray_stage`` | the same stage over shards on a Ray cluster (optional dependency) |

See docs/rephrase.md.
"""

from openk2.rephrase.checks import CheckConfig, check_rewrite, detect_language
from openk2.rephrase.chunking import split_document
from openk2.rephrase.inputs import corpus_config, read_inputs
from openk2.rephrase.pipeline import Rephraser, RephraseConfig, SourceDoc, Summary, read_output, token_counter
from openk2.rephrase.styles import KNOWLEDGE_STYLES, MATH_STYLES, STYLES

__all__ = ["CheckConfig", "KNOWLEDGE_STYLES", "MATH_STYLES", "Rephraser", "RephraseConfig", "STYLES", "SourceDoc",
           "Summary", "check_rewrite", "corpus_config", "detect_language", "read_inputs", "read_output",
           "split_document", "token_counter"]
