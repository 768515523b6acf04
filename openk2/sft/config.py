"""`openk2 sft` settings: the shared `TrainConfig` (optimizer, schedule, batch, checkpoints) plus SFT's own.

The pre-training data fields (preset, corpus, vocab, mixture, data dir) do not apply: the model and
its tokenizer come from `base`. Defaults differ where SFT differs: a lower peak learning rate, a
shorter run, longer sequences (tool declarations are long), no WSD stable phase to speak of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openk2.errors import ConfigError
from openk2.train.config import TrainConfig, setting

RESUME_MUST_MATCH = ("base", "sources", "seq_len", "batch_size", "pack", "optimizer", "max_steps", "val_fraction",
                     "chat_format", "math_count")


@dataclass
class SFTConfig(TrainConfig):
    # not used by SFT (the model and tokenizer come from --base)
    preset: str = setting("k2-tiny", cli=False)
    corpus: str = setting("default", cli=False)
    vocab_size: int = setting(8192, cli=False)
    mixture: dict[str, float] | None = setting(None, cli=False)
    data_dir: str | None = setting(None, cli=False)
    model_overrides: dict[str, Any] = setting(default_factory=dict, cli=False)
    # SFT's defaults for the shared settings
    run_name: str | None = setting(None, "run name: outputs go to RUNS_DIR/NAME (default: sft)", flag="--name")
    seq_len: int = setting(768, "positions per training row (a longer conversation is cut at a turn boundary)")
    batch_size: int = setting(8, "global rows per optimizer step")
    max_steps: int = setting(150, "optimizer steps (with a time budget: at most this many)", flag="--steps")
    time_budget_min: float | None = setting(
        10.0, "end training within this many minutes (the WSD stable phase stops early; 0: no budget)",
        flag="--time-budget", zero_is_none=True)
    lr: float = setting(1e-3, "peak learning rate")
    decay_fraction: float = setting(0.5, "fraction of the run spent in the decay (1: cosine from the warm-up)")
    warmup_steps: int | None = setting(None, "warm-up steps (default: 5%% of max_steps, at most 30)")
    val_every: int = setting(50, "evaluate the held-out assistant-token loss every N steps")
    val_batches: int = setting(8, "held-out batches in that evaluation")
    ckpt_every: int = setting(50, "checkpoint every N steps")
    # SFT
    base: str | None = setting(None, "the model to fine-tune: an openk2 run directory (its hf/), an openk2 or "
                                     "transformers HF directory, a .gguf file, or 'smollm2'")
    sources: dict[str, float] = setting(
        help="JSON object: data source -> mixture weight; a source is a .jsonl of OpenAI messages (+ tools), "
             "'bfcl' (BFCL single-call questions with gold calls) or 'math' (reasoning-gym worked solutions)",
        default_factory=lambda: {"bfcl": 1.0, "math": 0.25})
    val_fraction: float = setting(0.1, "fraction of every source held out (by a hash of its id)")
    pack: bool = setting(True, "pack several conversations per row (attention confined to each)")
    chat_format: str = setting("auto", "render in K2's format (k2) or the base tokenizer's template with openk2's "
                                       "tool prompt (hf, what openk2 serve uses for it); auto: k2 for openk2 models",
                               choices=("auto", "k2", "hf"))
    math_count: int = setting(400, "reasoning-gym problems generated for the 'math' source")
    eval_tasks: int = setting(60, "held-out single-call tool tasks generated live at the end (0: none)")
    eval_max_tokens: int = setting(192, "token budget of each generated answer in that evaluation")
    eval_base: bool = setting(True, "run the same tool-call evaluation on the base model, for comparison")

    def validate(self) -> None:
        super().validate()
        if not self.base:
            raise ConfigError("training setting 'base': give the model to fine-tune (--base DIR or 'smollm2')")
        if not isinstance(self.sources, dict) or not self.sources:
            raise ConfigError("training setting 'sources': a JSON object of source -> weight")
        for k, v in self.sources.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ConfigError(f"training setting 'sources': weight of {k!r} must be a number >= 0, got {v!r}")
        if not any(v > 0 for v in self.sources.values()):
            raise ConfigError("training setting 'sources': no source has a weight > 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"training setting 'val_fraction': must be in (0, 1), got {self.val_fraction}")
        if self.eval_tasks < 0 or self.eval_max_tokens < 1 or self.math_count < 1:
            raise ConfigError("training settings 'eval_tasks' >= 0, 'eval_max_tokens' >= 1, 'math_count' >= 1")

    @property
    def name(self) -> str:
        return self.run_name or "sft"
