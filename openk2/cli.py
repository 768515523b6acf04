"""The `openk2` command line.

Each subcommand lives in the module that owns its concern and exposes two
functions: ``add_arguments(parser)`` and ``main(args) -> int``. Modules are
imported lazily so that `openk2 params` does not pay for the serving stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("openk2.model.cli", "print total and activated parameter counts of a preset or config"),
    "generate": ("openk2.model.cli_generate", "sample text from a checkpoint"),
    "tokenizer": ("openk2.data.cli", "train or inspect the byte-level BPE tokenizer"),
    "corpus": ("openk2.data.cli_corpus", "build and describe the multi-domain pre-training corpus"),
    "pretrain": ("openk2.train.cli", "pre-train a K2 model with MuonClip (the main job)"),
    "sft": ("openk2.sft.cli", "supervised fine-tuning: a base model -> a chat and tool-use model (MuonClip)"),
    "plot": ("openk2.train.cli_plot", "draw a run's curves to PNG"),
    "export": ("openk2.train.cli_export", "export a training checkpoint as an HF directory"),
    "experiment": ("openk2.experiments.cli", "run one of the report's training experiments in miniature"),
    "serve": ("openk2.serve.cli", "OpenAI-compatible HTTP server for a checkpoint"),
    "sandbox": ("openk2.sandbox.cli", "run untrusted code in an isolated, limited sandbox; serve the SandboxFusion API"),
    "rephrase": ("openk2.rephrase.cli", "rewrite documents in diverse styles, chunk by chunk, with fidelity checks (K2 §2)"),
    "synth": ("openk2.synth.cli", "agentic data synthesis (K2 §3.1): MCP + synthetic tools, agents, rubric tasks, trajectories, judge"),
    "eval": ("openk2.eval.cli", "evaluate any model (checkpoint, smollm2, OpenAI URL) on HumanEval, math, BFCL, IFEval (K2 §4)"),
}


from openk2.errors import OpenK2Error


class CLIError(Exception):
    """An error caused by user input: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the parser of the requested command (imports stay lazy).
    parser = argparse.ArgumentParser(prog="openk2", description="openk2: the Kimi K2 system, runnable end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == wanted:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("openk2"):
                    print(f"openk2 {name}: not available in this build ({e})", file=sys.stderr)
                    return 2
                raise
            mod.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = importlib.import_module(args._module)
    try:
        return int(mod.main(args) or 0)
    except (CLIError, OpenK2Error) as e:
        print(f"openk2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `openk2 ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"openk2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
