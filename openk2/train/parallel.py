"""Distributed training: FSDP2 data parallelism and expert parallelism (torchrun).

Model math stays in openk2.model; this module only wraps it:

* `init_distributed()` starts the process group from torchrun's environment
  (gloo on CPU, nccl on GPU);
* expert parallelism (EP): each rank keeps E/W experts of every MoE layer;
  tokens travel to their expert's rank and back with all-to-all
  (`ExpertParallelDispatcher`);
* FSDP2 (`fully_shard`) shards every other parameter across the ranks;
  expert weights are ignored by FSDP (each already lives on one rank).

A global batch split over W ranks gives the same loss and gradients as one
process with the whole batch: FSDP averages the dense gradients over ranks,
and expert gradients (which arrive from all ranks' tokens) are divided by W.
Pipeline parallelism is not built yet.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from openk2.model.moe import GroupedExperts, MoE


def init_distributed() -> tuple[int, int]:
    """Initialise from torchrun's env (no-op for a single process). Returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        # on GPUs NCCL for CUDA tensors and gloo for the few CPU ones (loss sums, checkpoint metadata)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ExpertParallelDispatcher:
    """all-to-all token dispatch to the rank that owns each expert, and back.

    Input: this rank's (token, expert) rows sorted by global expert id, and the
    per-expert counts [E]. Rank r owns experts [r*E/W, (r+1)*E/W).
    """

    def __init__(self, n_experts: int, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.world:
            raise ValueError(f"expert parallelism: {n_experts} experts do not divide over {self.world} ranks")
        self.n_experts = n_experts
        self.local = n_experts // self.world

    def __call__(self, experts: GroupedExperts, x_sorted: torch.Tensor, counts: torch.Tensor,
                 scale: torch.Tensor | None = None) -> torch.Tensor:

        W, Le = self.world, self.local
        counts = counts.to(torch.long)
        # recv_counts[s, e]: rows rank s sends to my local expert e
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(W, Le)
        send_splits = counts.view(W, Le).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        if scale is not None:  # the routing weights travel as one more column (one all-to-all, not two)
            x_sorted = torch.cat([x_sorted, scale[:, None].to(x_sorted.dtype)], dim=1)
        received = _all_to_all(x_sorted, recv_splits, send_splits, self.group)
        # received rows are ordered (source rank, local expert); regroup by local expert
        src_expert = torch.arange(W * Le, device=x_sorted.device).view(W, Le) % Le
        key = torch.repeat_interleave(src_expert.flatten(), recv_counts.flatten())
        perm = key.argsort(stable=True)
        received = received.index_select(0, perm)
        if scale is not None:
            received, rscale = received[:, :-1], received[:, -1]
        else:
            rscale = None
        y = experts(received, recv_counts.sum(0), rscale)
        y = torch.empty_like(y).index_copy(0, perm, y)
        return _all_to_all(y, send_splits, recv_splits, self.group)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all (its backward is the reverse all-to-all)."""
    import warnings

    # torch.distributed.nn.functional is marked deprecated in favour of functional
    # collectives, but its autograd all-to-all is the one verified here to give
    # single-process-equal losses under gloo.
    warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated.*")
    from torch.distributed.nn.functional import all_to_all_single

    return all_to_all_single(x.new_empty(sum(out_splits), x.shape[1]), x, out_splits, in_splits, group=group)


def apply_expert_parallel(model: nn.Module) -> None:
    """Keep only this rank's slice of each MoE layer's experts and dispatch with all-to-all."""
    for m in model.modules():
        if isinstance(m, MoE):
            d = ExpertParallelDispatcher(m.n_experts)
            lo, hi = d.rank * d.local, (d.rank + 1) * d.local
            for name in ("gate_proj", "up_proj", "down_proj"):
                full = getattr(m.experts, name)
                setattr(m.experts, name, nn.Parameter(full.detach()[lo:hi].clone()))
            m.experts.n_experts = d.local
            m.experts.ep_range = (lo, hi)
            m.dispatcher = d


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]


def apply_fsdp(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    ignored = set(expert_parameters(model)) if any(
        getattr(m, "dispatcher", None) is not None for m in model.modules() if isinstance(m, MoE)) else set()
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=ignored & set(layer.parameters()) or None)
    fully_shard(model, ignored_params=ignored or None)


def maybe_parallelize(model: nn.Module, expert_parallel: bool = True) -> nn.Module:
    """Under torchrun: EP for the experts (when they divide over the ranks), FSDP2 for the rest."""
    if not is_distributed():
        return model
    if expert_parallel and all(m.n_experts % dist.get_world_size() == 0 for m in model.modules() if isinstance(m, MoE)):
        apply_expert_parallel(model)
    apply_fsdp(model)
    return model


def post_backward(model: nn.Module) -> None:
    """Expert gradients summed the contributions of every rank's mean loss: average them like FSDP does."""
    if not is_distributed():
        return
    W = dist.get_world_size()
    for p in expert_parameters(model):
        if p.grad is not None and any(getattr(m, "dispatcher", None) is not None for m in model.modules() if isinstance(m, MoE)):
            p.grad.div_(W)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient-norm clipping that works for plain, FSDP2-sharded (DTensor) and expert-parallel grads."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    if not is_distributed():
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    experts = {id(p) for p in expert_parameters(model)} if any(
        getattr(m, "dispatcher", None) is not None for m in model.modules() if isinstance(m, MoE)) else set()
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum().cpu()
        elif id(p) in experts:
            sharded += g.double().pow(2).sum().cpu()
        else:
            replicated += g.double().pow(2).sum().cpu()
    dist.all_reduce(sharded)
    norm = float((sharded + replicated).sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(coef)
    return norm


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict with openk2 names, on every rank; experts gathered from EP ranks."""
    out = {}
    ep = {}
    for m_name, m in model.named_modules():
        if isinstance(m, MoE) and m.dispatcher is not None:
            ep[m_name + ".experts"] = m
    for k, v in model.state_dict().items():
        v = _full(v).detach()
        prefix = k.rsplit(".", 1)[0]
        if prefix in ep and is_distributed():
            parts = [torch.empty_like(v) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, v.contiguous())
            v = torch.cat(parts)
        out[k] = v.cpu().clone()
    return out


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a (possibly sharded / expert-parallel) model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = model.state_dict()
    with torch.no_grad():
        for k, cur in own.items():
            if k not in state:
                raise KeyError(f"checkpoint lacks '{k}'")
            src = state[k]
            mod = model.get_submodule(k.rsplit(".", 1)[0]) if "." in k else model
            rng = getattr(mod, "ep_range", None)
            if rng is not None:
                src = src[rng[0]:rng[1]]
            if isinstance(cur, DTensor):
                cur.copy_(distribute_tensor(src.to(cur.dtype), cur.device_mesh, cur.placements))
            else:
                cur.copy_(src)
