"""MuonClip under FSDP2 equals MuonClip in one process (run by tests/test_muonclip_distributed.py).

    torchrun --nproc_per_node 2 tests/dist_muonclip_fsdp.py

Each rank trains a fully_shard-ed tiny K2 on its half of the global batch
and, beside it, an unsharded copy on the whole batch (the single-process
reference). Sharded matrices are gathered, orthogonalised and scattered;
expert stacks sharded along E are orthogonalised in place; QK-Clip's S_max
is MAX-reduced over the ranks, each of which saw only half the batch.
Shapes are chosen so that some shards are uneven (25 rows, 3 experts).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from openk2.model.config import K2Config
from openk2.model.transformer import build_model
from openk2.optim import MuonClip


def tiny() -> K2Config:
    return K2Config(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=17, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=3, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1, rope_scaling=None, max_position_embeddings=64, bos_token_id=0,
                    eos_token_id=1)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run(ns_dtype: torch.dtype, same_grads: bool, steps: int = 3) -> tuple[float, float, list[dict]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = build_model(tiny())
    model = copy.deepcopy(ref)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    kw = dict(lr=2e-2, weight_decay=0.1, ns_dtype=ns_dtype)
    opt, opt_ref = MuonClip.for_model(model, **kw), MuonClip.for_model(ref, **kw)
    data = torch.randint(0, 96, (steps, 2 * world, 24), generator=torch.Generator().manual_seed(1))
    worst, worst_change, stats = 0.0, 0.0, []
    for step in range(steps):
        batch = data[step]
        mine = batch[rank * 2:(rank + 1) * 2]
        model(mine, labels=mine).loss.backward()
        ref(batch, labels=batch).loss.backward()
        if same_grads:  # isolate the optimizer: the shards of exactly the reference gradients
            for p, q in zip(model.parameters(), ref.parameters()):
                p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements, src_data_rank=None)
        if step == 0:  # a tau that clips about half the heads of the whole batch
            tau = float(ref.max_logits().flatten().median())
            opt.qk_clip.tau = opt_ref.qk_clip.tau = tau
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        stats.append((opt.clip_stats, opt_ref.clip_stats))
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            f = full(p.detach())
            change = (q.detach() - before[n]).abs().max().item()
            diff = (f - q.detach()).abs().max().item()
            worst = max(worst, diff / max(change, 1e-12)) if change > 0 else max(worst, diff)
            worst_change = max(worst_change, change)
    return worst, worst_change, stats


def main() -> int:
    dist.init_process_group("gloo")
    ok = True
    # (NS precision, gradients, tolerance on max |fsdp - single| / max |update|); with data-parallel
    # gradients the two runs differ by fp32 rounding of the gradient average, which bf16 NS would amplify
    for ns_dtype, same_grads, tol in ((torch.bfloat16, True, 1e-4), (torch.float32, True, 1e-4),
                                      (torch.float32, False, 1e-3)):
        worst, change, stats = run(ns_dtype, same_grads)
        clipped = [s[0]["heads_clipped"] for s in stats]
        same_stats = all(a["heads_clipped_per_layer"] == b["heads_clipped_per_layer"] for a, b in stats)
        good = worst < tol and same_stats and sum(clipped) > 0
        ok &= good
        if dist.get_rank() == 0:
            grads = "reference grads" if same_grads else "own half-batch grads"
            print(f"ns_dtype={ns_dtype}, {grads}: max |fsdp - single| / max |update| = {worst:.2e} (tol {tol:g}), "
                  f"largest update {change:.2e}, heads clipped per step {clipped}, clip stats equal {same_stats}")
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if ok and rank == 0:
        print("OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
