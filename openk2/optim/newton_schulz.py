"""Newton-Schulz orthogonalisation: Muon's update direction, batched over matrices.

For a matrix G = U S V^T the iteration X <- a X + (b A + c A^2) X, A = X X^T,
started from X = G / ||G||_F, pushes every singular value towards 1, so X
approaches U V^T without an SVD (report Algorithm 1; Jordan et al. 2024).

Every function here takes a stack [..., n, m] and works on all of its
matrices at once (one batched matmul per product instead of a Python loop
over matrices). X X^T is formed on the smaller side: a tall matrix is
processed as its transpose, since NS(G^T) = NS(G)^T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Coefficients = tuple[float, float, float]

# Jordan's quintic (K2 report, torch.optim.Muon): steep at 0, converges to ~[0.7, 1.2], not to 1.
MUON_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)


def _polar_express() -> tuple[Coefficients, ...]:
    # Amsel et al. 2025, "The Polar Express" (arXiv 2505.16932), Algorithm 1, degree 5: one
    # minimax polynomial per step; all but the last divided by a 1.01 safety factor (x, x^3, x^5).
    raw = (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
        (1.875, -1.25, 0.375),
    )
    s = 1.01
    return tuple((a / s, b / s**3, c / s**5) for a, b, c in raw[:-1]) + (raw[-1],)


# name -> per-step coefficients; a schedule shorter than ns_steps repeats its last entry.
NS_SCHEDULES: dict[str, tuple[Coefficients, ...]] = {
    "muon": (MUON_COEFFICIENTS,),
    "quintic": ((15 / 8, -10 / 8, 3 / 8),),  # classical quintic: p(1) = 1, p'(1) = 0 (slow start, exact limit)
    "cubic": ((1.5, -0.5, 0.0),),  # classical cubic Newton-Schulz
    "polar_express": _polar_express(),
}


def ns_schedule(coefficients: str | Coefficients | Sequence[Coefficients], steps: int) -> tuple[Coefficients, ...]:
    """Resolve a schedule name, one (a, b, c) triple, or a list of per-step triples to `steps` triples."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ns_steps must be a positive integer, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients not in NS_SCHEDULES:
            raise ValueError(f"unknown Newton-Schulz schedule {coefficients!r} (known: {', '.join(NS_SCHEDULES)})")
        table = NS_SCHEDULES[coefficients]
    else:
        seq = tuple(coefficients)
        if len(seq) == 3 and all(isinstance(x, (int, float)) for x in seq):
            table = (tuple(float(x) for x in seq),)
        else:
            table = tuple(tuple(float(x) for x in t) for t in seq)
            if not table or any(len(t) != 3 for t in table):
                raise ValueError("ns_coefficients: expected a schedule name, an (a, b, c) triple or a list of triples, "
                                 f"got {coefficients!r}")
    if not all(math.isfinite(x) for t in table for x in t):
        raise ValueError(f"ns_coefficients must be finite, got {table}")
    return tuple(table[min(i, len(table) - 1)] for i in range(steps))


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str | Coefficients | Sequence[Coefficients] = "muon",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    matmul: str = "auto",
) -> torch.Tensor:
    """Orthogonalise every matrix of G [..., n, m]; returns a tensor of G's shape in `dtype`.

    `matmul` picks the arithmetic of a low-precision `dtype`: "native" (matmuls in `dtype`), "fp32" (the
    same products on fp32 units, each result rounded to `dtype`: what a bf16 GEMM computes, fp32
    accumulation and one rounding per output) or "auto" (`matmul_dtype_for`).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices [..., n, m], got shape {tuple(G.shape)}")
    X = _newton_schulz(G, ns_schedule(coefficients, steps), eps, dtype, matmul_dtype_for(G.device, dtype, matmul))
    return X.to(dtype)


def matmul_dtype_for(device: torch.device, dtype: torch.dtype, matmul: str = "auto") -> torch.dtype:
    """The dtype Newton-Schulz multiplies in. "auto": `dtype` natively where it is measured at least as
    fast as fp32 (GPUs, AMX and AMD CPUs), else fp32 units with every product rounded to `dtype`.

    Both give iterates of `dtype` values; only the speed differs, and CPU flags do not predict it
    (`openk2.hardware`): AVX512-BF16 without AMX ran bf16 matmuls at ~0.5x the fp32 rate, AVX2-only
    CPUs emulate bf16 at ~1/60 of it, AMX and AMD EPYC run bf16 faster than fp32.
    """
    if matmul not in ("auto", "native", "fp32"):
        raise ValueError(f"ns matmul must be 'auto', 'native' or 'fp32', got {matmul!r}")
    if dtype not in (torch.bfloat16, torch.float16) or matmul == "native":
        return dtype
    if matmul == "fp32":
        return torch.float32
    device = torch.device(device)
    if device.type == "cuda":
        return dtype
    if device.type != "cpu":
        return torch.float32
    from openk2 import hardware  # looked up at call time: measured once per process, then cached

    return dtype if hardware.matmul_flops(dtype, device) >= hardware.matmul_flops(torch.float32, device) else torch.float32


def _round_(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None:
        t.copy_(t.to(dtype))  # round to the nearest `dtype` value, keep the wider storage
    return t


def _newton_schulz(G: torch.Tensor, schedule: tuple[Coefficients, ...], eps: float, dtype: torch.dtype,
                   matmul_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   kernel=None) -> torch.Tensor:
    """The batched iteration. The result (in `out`, which may be G itself, else in `matmul_dtype`) has
    values representable in `dtype`. On a CPU the stack goes through in chunks of ~2 MB so that the
    iterates and their roundings stay in L2 (measured 10-15% faster than the whole stack at once)."""
    matmul_dtype = matmul_dtype or dtype
    kernel = kernel or _ns_kernel
    shape = G.shape
    n, m = shape[-2], shape[-1]
    G3 = G.reshape(-1, n, m)
    if out is None:
        out = torch.empty(G3.shape, dtype=matmul_dtype, device=G.device)
    out3 = out.view(-1, n, m)
    total = G3.shape[0]
    per = total if G.device.type != "cpu" else max(1, (2 << 20) // (n * m * max(G.element_size(), 4)))
    for i in range(0, total, per):
        X = kernel(G3[i:i + per], schedule, eps, dtype, matmul_dtype)
        if X is not out3[i:i + per]:
            out3[i:i + per].copy_(X)
    return out3.view(shape)


def _ns_kernel(G: torch.Tensor, schedule: tuple[Coefficients, ...], eps: float, dtype: torch.dtype,
               matmul_dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz on a stack [B, n, m]: matmuls in `matmul_dtype`, every product rounded to `dtype`."""
    rnd = dtype if matmul_dtype != dtype else None
    X = G
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    # ||X||_F >= ||X||_2: dividing by the Frobenius norm puts every singular value in [0, 1].
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(X.dtype, torch.float32))
    norm = norm.clamp_(min=eps)
    Y = torch.empty(X.shape, dtype=matmul_dtype, device=X.device)  # contiguous in the wide orientation
    torch.div(X, norm, out=Y)
    X = _round_(Y, rnd)
    for a, b, c in schedule:
        A = _round_(torch.bmm(X, X.mT), rnd)
        B = _round_(torch.baddbmm(A, A, A, beta=b, alpha=c), rnd)  # b A + c A^2
        X = _round_(torch.baddbmm(X, B, X, beta=a), rnd)  # a X + B X
    return X.mT if tall else X


def newton_schulz_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per MAC) of `steps` iterations on one [n, m] matrix (n, m in either order)."""
    n, m = sorted(shape[-2:])
    return steps * (2 * n * n * m + 2 * n * n * n + 2 * n * n * m)
