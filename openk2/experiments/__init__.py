"""The report's training claims in miniature: `openk2 experiment NAME` (see docs/results.md).

Each experiment module has NAME, TITLE, `default_settings()`,
`quick_settings()` (seconds-long, for tests) and `run(settings, runner)`
returning the report body and its numbers; `run_experiment` ties them to a
Runner and writes RUNS/experiments/NAME/report.md and results.json.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

EXPERIMENTS = {
    "muon-vs-adamw": "openk2.experiments.muon_vs_adamw",
    "qk-clip": "openk2.experiments.qk_clip",
    "sparsity": "openk2.experiments.sparsity",
    "heads": "openk2.experiments.heads",
    "rephrase": "openk2.experiments.rephrase",
}


def load(name: str):
    from openk2.errors import ConfigError

    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
    return importlib.import_module(EXPERIMENTS[name])


def run_experiment(name: str, settings: Any = None, runs_root: str | Path = "runs", command: str | None = None,
                   quick: bool = False, progress: bool = False, fresh: bool = False, log=print) -> dict:
    """Run one experiment (reusing finished runs) and write its report; returns results.json's content."""
    import json

    from openk2.experiments.common import Runner, write_report

    mod = load(name)
    s = settings if settings is not None else (mod.quick_settings() if quick else mod.default_settings())
    runner = Runner(name, s, runs_root=runs_root, log=log, progress=progress, fresh=fresh)
    body, results = mod.run(s, runner)
    cmd = command or f"openk2 experiment {name}" + (" --quick" if quick else "")
    path = write_report(runner.out_dir, mod.TITLE, cmd, s, body, results, runner.run_seconds)
    log(f"{name}: report {path} ({runner.elapsed() / 60:.1f} min)")
    return json.loads((runner.out_dir / "results.json").read_text())
