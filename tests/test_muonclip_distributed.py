"""MuonClip under FSDP2 (torchrun, 2 CPU processes, gloo) equals the single-process optimizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_fsdp2_muonclip_equals_single_process():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_muonclip_fsdp.py")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "\nOK" in "\n" + out.stdout, log[-4000:]
    assert "reference grads: max |fsdp - single| / max |update| = 0.00e+00" in out.stdout, out.stdout
