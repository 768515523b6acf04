"""`openk2 sft` under torchrun (2 processes, gloo, FSDP2 + expert parallelism) gives the single-process run."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import TRAINING_CONVERSATIONS, tiny_tokenizer  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_give_the_single_process_losses(tmp_path):
    import openk2
    from openk2.model.config import get_preset

    torch.manual_seed(0)
    base = tmp_path / "base"
    openk2.K2ForCausalLM(dataclasses.replace(get_preset("k2-nano"), vocab_size=1024)).save_pretrained(base)
    tiny_tokenizer().save(base)
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps({"id": f"{r}-{i}", "messages": m, **({"tools": t} if t else {})}) + "\n"
                            for r in range(8) for i, (m, t) in enumerate(TRAINING_CONVERSATIONS)))
    args = ["-m", "openk2.cli", "sft", "--base", str(base), "--sources", json.dumps({str(data): 1}),
            "--runs-dir", str(tmp_path / "runs"), "--steps", "3", "--batch-size", "4", "--seq-len", "256",
            "--dtype", "float32", "--muon-ns-dtype", "float32", "--val-every", "3", "--eval-tasks", "0",
            "--time-budget", "0", "--no-progress", "--no-plots", "--val-fraction", "0.2"]
    losses = {}
    for n in (1, 2):
        pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if n == 2 \
            else [sys.executable]
        r = subprocess.run(pre + args + ["--name", f"r{n}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / "runs" / f"r{n}" / "metrics.jsonl").read_text().splitlines()]
        losses[n] = [r["loss"] for r in rows if "loss" in r] + [rows[-1]["val_loss"]]
        assert (tmp_path / "runs" / f"r{n}" / "hf" / "config.json").is_file()
    assert losses[1] == pytest.approx(losses[2], rel=1e-4, abs=1e-5)
