"""Ultra-sparse MoE: the noaux_tc sigmoid router, grouped experts, a shared expert.

Router (DeepSeek-V3, K2): s = sigmoid(x W_r^T), in fp32 even under autocast; the per-expert bias b (not
trained by gradient: the auxiliary-loss-free balancer moves it) is added only
to *choose* the top-k experts; the chosen experts' un-biased scores are
normalised to sum to 1 and multiplied by `routed_scaling_factor`.

Dispatch: the N*k (token, expert) pairs are sorted by expert and each
expert's tokens go through its matrices in one grouped matmul
(`torch._grouped_mm`), no Python loop over experts. Expert weights are stacked
3-D tensors [E, out, in]; HF checkpoints name them per expert, converted at
the checkpoint boundary.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.config import K2Config
from openk2.model.layers import SwiGLU, swiglu

_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _grouped_mm_ok(a: torch.Tensor) -> bool:
    if not _GROUPED_MM:
        return False
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        # the CUDA kernel wants bf16 on sm90+; other cases take the fallback
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device)[0] >= 9
    return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of group e] = x[rows of group e] @ w[e].T for x [M, K] sorted by group, w [E, N, K]."""
    if w.dtype != x.dtype:  # under autocast the activations are bf16, the master weights fp32
        w = w.to(x.dtype)
    if _grouped_mm_ok(x):
        if not x.is_contiguous():  # the kernel wants 16-byte aligned row strides
            x = x.contiguous()
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    # Fallback (older torch / other devices): one matmul per non-empty group.
    outs = []
    for e, chunk in enumerate(torch.split(x, counts.tolist())):
        if chunk.shape[0]:
            outs.append(chunk @ w[e].T)
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def scaled_swiglu(gu: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """silu(g) * u (* scale per row) for gu = [g | u]."""
    if torch.is_grad_enabled() and (gu.requires_grad or (scale is not None and scale.requires_grad)):
        return _ScaledSwiGLU.apply(gu, scale)
    g, u = gu.chunk(2, dim=-1)
    h = swiglu(g, u)
    return h * scale[:, None].to(h.dtype) if scale is not None else h


class _ScaledSwiGLU(torch.autograd.Function):
    """h = silu(g) * u * scale[:, None] with gu = [g | u] ([M, 2I]) and a fused backward.

    The backward writes dL/dg and dL/du into one [M, 2I] buffer (no cat of two
    gradients, which autograd's chunk backward does) and uses the fused SiLU
    backward kernel.
    """

    @staticmethod
    def forward(ctx, gu, scale):
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g).mul_(u)
        ctx.save_for_backward(gu, scale)
        return h.mul_(scale[:, None].to(h.dtype)) if scale is not None else h

    @staticmethod
    def backward(ctx, dh):
        gu, scale = ctx.saved_tensors
        g, u = gu.chunk(2, dim=-1)
        inter = g.shape[-1]
        d_gu = torch.empty_like(gu)
        a = F.silu(g)
        d_scale = None
        if scale is not None:
            if ctx.needs_input_grad[1]:
                d_scale = (dh * a).mul_(u).sum(-1).to(scale.dtype)
            dh = dh * scale[:, None].to(dh.dtype)
        torch.mul(dh, a, out=d_gu[:, inter:])
        torch.ops.aten.silu_backward.grad_input(dh * u, g, grad_input=d_gu[:, :inter])
        return d_gu, d_scale


def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class Router(nn.Module):
    """The noaux_tc top-k router with optional group-limited routing."""

    def __init__(self, config: K2Config):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # fp32 always: the balancer's small steps must not round away
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        b = self.e_score_correction_bias
        if b.is_floating_point() and b.dtype != torch.float32:  # model.to(bf16) keeps the balancer in fp32
            self.e_score_correction_bias = b.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert indices [N, k])."""
        with _no_autocast(x.device.type):  # fp32 logits: autocast would cast F.linear back to bf16
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            N = choice.shape[0]
            grouped = choice.view(N, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # a group's score: its top-2 experts
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, idx


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.recompute = False

    @torch.compiler.disable  # _grouped_mm's meta kernel only takes bf16; keep experts eager under compile
    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x_sorted [M, H]: rows grouped by expert, counts[e] rows for expert e.

        `scale` [M] (the routing weights): row m's output is multiplied by it.
        Applied to the SwiGLU product (width I) before the down projection,
        which is linear, so it equals scaling the output (width H) at I/H of
        the elementwise work (64/256 in k2-tiny, 2048/7168 in K2).
        """
        offsets = counts.cumsum(0).to(torch.int32)
        # one grouped matmul for gate and up (half the kernel launches of two)
        gu = grouped_matmul(x_sorted, torch.cat([self.gate_proj, self.up_proj], dim=1), counts, offsets)
        if self.recompute and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(scaled_swiglu, gu, scale, use_reentrant=False)
        else:
            h = scaled_swiglu(gu, scale)
        return grouped_matmul(h, self.down_proj, counts, offsets)


class MoE(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        # tokens routed to each expert since the last balancer update (fp32 counts)
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.long), persistent=False)
        # expert-parallel hook: replaced by openk2.train.parallel to dispatch with all-to-all
        self.dispatcher = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        flat = idx.reshape(-1)
        # scatter_add, not bincount: a static output shape keeps torch.compile graphs whole
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        if self.training:
            self.tokens_per_expert += counts
        order = flat.argsort(stable=True)
        token = order // self.top_k
        x_sorted = x.index_select(0, token)  # (backward: index_add, ~3x faster than x[token]'s index_put)
        scale = weights.reshape(-1)[order]  # each (token, expert) row's routing weight, applied inside the experts
        if self.dispatcher is not None:
            y_sorted = self.dispatcher(self.experts, x_sorted, counts, scale)
        else:
            y_sorted = self.experts(x_sorted, counts, scale)
        y = torch.zeros_like(x).index_add_(0, token, y_sorted.to(x.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    @torch.no_grad()
    def update_bias(self, rate: float, counts: torch.Tensor | None = None) -> dict[str, float]:
        """Auxiliary-loss-free balancing (DeepSeek-V3): b_i += rate * sign(mean load - load_i).

        `counts` defaults to the tokens seen since the last call (already summed
        across data-parallel ranks by the caller when training distributed).
        Returns load statistics before the update.
        """
        load = (self.tokens_per_expert if counts is None else counts).float()
        total = float(load.sum())
        stats = {"max_over_mean": 0.0, "min_over_mean": 0.0}
        if total > 0:
            mean = load.mean()
            self.gate.e_score_correction_bias += rate * torch.sign(mean - load).to(self.gate.e_score_correction_bias)
            stats = {"max_over_mean": float(load.max() / mean), "min_over_mean": float(load.min() / mean)}
        self.tokens_per_expert.zero_()
        return stats
