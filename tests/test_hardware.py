"""Precision from measurement: openk2.hardware and Newton-Schulz's "auto" arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import openk2.hardware as hw
from openk2.optim import MuonClip
from openk2.optim.newton_schulz import matmul_dtype_for


def _rates(monkeypatch, fp32: float, bf16: float) -> None:
    """Pretend the machine measured these GFLOP/s (e.g. AVX2-only: fp32 60, bf16 1)."""
    table = {torch.float32: fp32 * 1e9, torch.bfloat16: bf16 * 1e9, torch.float16: bf16 * 1e9}
    monkeypatch.setattr(hw, "matmul_flops", lambda dtype, device="cpu": table[dtype])


def test_matmul_flops_is_measured_once_per_device_dtype_and_threads(monkeypatch):
    monkeypatch.setattr(hw, "_CACHE", {})
    f = hw.matmul_flops(torch.float32)
    assert 1e8 < f < 1e14
    calls = []
    real = hw._measure
    monkeypatch.setattr(hw, "_measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert hw.matmul_flops(torch.float32, "cpu") == f and not calls  # cached
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        hw.matmul_flops(torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 1  # another thread count is another measurement


@pytest.mark.parametrize("fp32,bf16,want", [(340, 170, torch.float32), (170, 410, torch.bfloat16),
                                            (60, 1, torch.float32), (100, 110, torch.float32),
                                            (300, 1400, torch.bfloat16)])
def test_fastest_matmul_dtype_follows_the_measurement(monkeypatch, fp32, bf16, want):
    _rates(monkeypatch, fp32, bf16)
    assert hw.fastest_matmul_dtype("cpu") == want
    assert hw.fastest_matmul_dtype("cuda") == torch.bfloat16


@pytest.mark.parametrize("fp32,bf16,want", [(340, 170, torch.float32), (60, 1, torch.float32),
                                            (170, 410, torch.bfloat16)])
def test_newton_schulz_auto_arithmetic_follows_the_measurement(monkeypatch, fp32, bf16, want):
    _rates(monkeypatch, fp32, bf16)
    assert matmul_dtype_for(torch.device("cpu"), torch.bfloat16, "auto") == want
    assert matmul_dtype_for(torch.device("cpu"), torch.bfloat16, "native") == torch.bfloat16
    assert matmul_dtype_for(torch.device("cpu"), torch.float32, "auto") == torch.float32


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
                                   torch.ops.aten.addmm, torch.ops.aten.matmul):
            self.seen.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_default_muonclip_step_does_no_bf16_matmul_where_bf16_is_slow(monkeypatch):
    _rates(monkeypatch, 60, 1)  # an AVX2-only machine: bf16 matmuls emulated, ~60x slower
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in [(64, 32), (4, 16, 24)]]
    opt = MuonClip([{"params": ps, "use_muon": True}])  # defaults: ns_dtype=bf16, ns_matmul="auto"
    for p in ps:
        p.grad = torch.randn_like(p)
    with _MatmulDtypes() as mm:
        opt.step()
    assert mm.seen == {torch.float32}
    _rates(monkeypatch, 170, 410)  # AMD EPYC-like: bf16 faster, so native bf16
    opt._workspace.clear()
    with _MatmulDtypes() as mm:
        opt.step()
    assert mm.seen == {torch.bfloat16}
