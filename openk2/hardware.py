"""What the machine's matmuls actually do: measured FLOP rates per dtype, and the fastest training dtype.

CPU flags do not predict it. Measured on machines of the kind openk2 runs on (square fp32 / bf16
matmuls): Intel AVX512-BF16 without AMX ~340 / ~170 GFLOP/s (bf16 slower), AMD EPYC ~170 / ~410
(bf16 faster), AVX2-only ~60 / ~1 (bf16 emulated, 60x slower), AMX CPUs and GPUs far faster in bf16.
So the choice is made from a short measurement (a few tens of ms per dtype, cached per device,
dtype and thread count):

    matmul_flops(torch.bfloat16)          # FLOP/s of a square matmul in that dtype
    fastest_matmul_dtype("cpu")           # torch.bfloat16 if measured >= 1.15x fp32, else torch.float32
"""

from __future__ import annotations

import time

import torch

BF16_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much to be worth its rounding on a CPU
_CACHE: dict[tuple[str, torch.dtype, int], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(dtype: torch.dtype, device: torch.device, budget_s: float) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    n_max = 4096 if device.type == "cuda" else 1024
    n = 128
    while True:  # grow the matrix while one product stays well inside the budget
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernel selection, weight packing
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        dt = max(time.perf_counter() - t, 1e-9)
        if n >= n_max or dt * 8 * 4 > budget_s:  # the next size would cost 8x
            break
        n *= 2
    best = dt
    deadline = time.perf_counter() + budget_s
    reps = 0
    while reps < 3 or (time.perf_counter() < deadline and reps < 50):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, max(time.perf_counter() - t, 1e-9))  # best-of: robust to other work on shared cores
        reps += 1
    return 2.0 * n**3 / best


def matmul_flops(dtype: torch.dtype, device: str | torch.device = "cpu") -> float:
    """Measured FLOP/s (2 per multiply-add) of a square matmul in `dtype` on `device`.

    A short micro-benchmark (~20-40 ms; an emulated dtype stops growing the matrix early), run once per
    (device, dtype, torch.get_num_threads()) and cached.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _CACHE:
        _CACHE[key] = _measure(dtype, device, budget_s=0.02)
    return _CACHE[key]


def fastest_matmul_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to train / multiply in: bfloat16 on CUDA; on a CPU bfloat16 only if measured
    >= 1.15x the fp32 rate, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type != "cpu":
        return torch.float32
    if matmul_flops(torch.bfloat16, device) >= BF16_MIN_SPEEDUP * matmul_flops(torch.float32, device):
        return torch.bfloat16
    return torch.float32
