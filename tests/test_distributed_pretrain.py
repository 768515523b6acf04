"""torchrun, 2 processes, gloo: FSDP2 + expert parallelism gives the single-process losses."""

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


@pytest.fixture()
def data_dir(tiny_data_dir):
    return tiny_data_dir


def _run(tmp_path, data_dir, name, nproc, optimizer):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"corpus": "tiny", "vocab_size": 1024, "val_batches": 2, "plots": False}))
    args = ["-m", "openk2.cli", "pretrain", "--config", str(cfg), "--preset", "k2-nano", "--data-dir", str(data_dir),
            "--runs-dir", str(tmp_path / "runs"), "--name", name, "--steps", "4", "--batch-size", "8",
            "--seq-len", "32", "--optimizer", optimizer, "--lr", "3e-3", "--dtype", "float32", "--val-every", "2",
            "--ckpt-every", "2", "--no-progress"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.parametrize("optimizer", ["adamw", "muonclip"])
def test_two_ranks_match_one_process(tmp_path, data_dir, optimizer):
    if optimizer == "muonclip":
        pytest.importorskip("openk2.optim.muonclip")
    loss1, val1 = _run(tmp_path, data_dir, "one", 1, optimizer)
    loss2, val2 = _run(tmp_path, data_dir, "two", 2, optimizer)
    assert len(loss1) == len(loss2) == 4
    assert loss1 == pytest.approx(loss2, abs=2e-4)
    assert val1 == pytest.approx(val2, abs=2e-4)
    assert loss1[-1] < loss1[0]
