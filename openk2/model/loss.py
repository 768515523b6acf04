"""Fused LM-head + cross-entropy: the training loss without materialising [N, V] logits.

`linear_cross_entropy(h, W, targets)` equals
`F.cross_entropy(h @ W.T, targets, ignore_index=-100)` (mean over the targets
that are not ignored), computed over row chunks. When a gradient is needed the
gradients of h and W are computed in the same pass (the loss is the last node
of the graph, so dL/dlogits = softmax - onehot is known as soon as the chunk's
logits are), and backward only scales them by the incoming gradient. This
removes the full-vocabulary log-softmax backward, the [N, V] logits, their
slice/copy for the label shift and the zero-filled gradient buffers: on the
2-core CPU this is most of the time spent outside the matmuls at vocab 8k
(docs/benchmarks.md), and on a GPU it is the memory of the logits at vocab
160k.

Numerics: matmuls run in the activation dtype (the autocast dtype if autocast
is on), the softmax and the loss in fp32, the weight gradient is accumulated
in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunk_rows(vocab: int, rows: int, chunk_elems: int) -> int:
    return max(1, min(rows, chunk_elems // max(vocab, 1)))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk, dtype):
        n = h.shape[0]
        w = weight.to(dtype)
        x = h.to(dtype)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        safe = torch.where(valid, targets, 0)
        scale = valid.to(torch.float32) / n_valid
        grad_h = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logp = torch.log_softmax((x[s:e] @ w.T).float(), dim=-1)
            tgt = safe[s:e, None]
            total -= (logp.gather(1, tgt).squeeze(1) * valid[s:e]).sum()
            # dL/dlogits = (softmax - onehot) / n_valid on valid rows, in place over logp
            g = logp.exp_()
            g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
            g.mul_(scale[s:e, None])
            g = g.to(dtype)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[s:e])
            if grad_w is not None:
                if dtype == torch.float32:
                    grad_w.addmm_(g.T, x[s:e])
                else:  # low-precision product per chunk, fp32 accumulation across chunks
                    grad_w.add_(g.T @ x[s:e])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


@torch.no_grad()
def _loss_only(h, weight, targets, ignore_index, chunk, dtype, reduction):
    w = weight.to(dtype)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        e = min(h.shape[0], s + chunk)
        logits = (h[s:e].to(dtype) @ w.T).float()
        nll = torch.logsumexp(logits, -1) - logits.gather(1, safe[s:e, None]).squeeze(1)
        total += (nll * valid[s:e]).sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         chunk_elems: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, chunked over rows.

    hidden [..., H], weight [V, H], targets [...] (same leading shape), entries
    equal to `ignore_index` are skipped. reduction "mean" (over non-ignored
    targets, as F.cross_entropy) or "sum" (no gradient: for evaluation).
    A batch whose targets are all ignored gives 0 (F.cross_entropy: nan) and
    zero gradients. `chunk_elems` bounds the fp32 logits held at once (rows x V); default 2M
    on CPU (cache-sized: measured fastest there), 64M on GPUs (256 MB).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(torch.long)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden rows but {t.shape[0]} targets")
    dtype = _compute_dtype(hidden)
    if chunk_elems is None:
        chunk_elems = 1 << 21 if hidden.device.type == "cpu" else 1 << 26
    chunk = _chunk_rows(weight.shape[0], h.shape[0], chunk_elems)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if reduction == "sum" or not needs_grad:
        if reduction == "sum" and needs_grad:
            raise ValueError("linear_cross_entropy: reduction='sum' is for evaluation (no gradient)")
        return _loss_only(h, weight, t, ignore_index, chunk, dtype, reduction)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk, dtype)
