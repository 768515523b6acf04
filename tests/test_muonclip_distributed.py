"""MuonClip under FSDP2 (torchrun, 2 CPU processes, gloo) equals the single-process optimizer."""

from __future__ import annotations

import os
import signal
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
    # own process group: on a timeout the workers die with torchrun instead of lingering
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0 and "\nOK" in "\n" + stdout, (stdout + stderr)[-4000:]
    # each case is within its tolerance (the script checks; "OK" above). Equal to the bit with AVX512/AMX
    # kernels (0.00e+00 measured), not with AVX2 kernels (5.3e-7 of the update measured): the matmul
    # kernels may block the gathered-and-sharded and the single-process products differently, and fp32
    # sums in another order differ in the last bits, so exact equality is not asserted
    assert "reference grads: max |fsdp - single| / max |update|" in stdout, stdout
