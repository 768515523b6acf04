"""Training-step throughput of a preset: fp32 vs bf16 autocast, alternating in one run.

A step = forward + backward + MuonClip step (QK-Clip included) + router bias update,
exactly as `openk2 pretrain` does it, on random tokens of the preset's vocabulary.

    python benchmarks/bench_pretrain.py [--preset k2-tiny] [--batch 16] [--seq 256] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from openk2.model.config import get_preset
from openk2.model.transformer import build_model
from openk2.optim import MuonClip
from openk2.train.flops import train_flops_per_token
from openk2.hardware import matmul_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="k2-tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: stable on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    setups = {}
    for dt in args.dtypes.split(","):
        model = build_model(cfg, device=dev).train()
        model.set_track_max_logit(True)
        opt = MuonClip.for_model(model, lr=3e-3, weight_decay=0.1, qk_clip_tau=100.0)
        setups[dt] = (model, opt)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1), device=dev)

    def step(dt):
        model, opt = setups[dt]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dt == "bfloat16"):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.reset_max_logits()
        model.update_router_biases()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for dt in setups:
        step(dt)
    times = {dt: [] for dt in setups}
    for _ in range(args.rounds):
        for dt in setups:
            t = time.perf_counter()
            step(dt)
            times[dt].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    fpt = train_flops_per_token(cfg, args.seq)
    counts = setups[next(iter(setups))][0].num_parameters()
    res = {"preset": args.preset, "params": counts, "batch": args.batch, "seq": args.seq, "device": str(dev),
           "threads": torch.get_num_threads(), "train_flops_per_token": fpt}
    for dt, ts in times.items():
        med = statistics.median(ts)
        peak = matmul_flops(getattr(torch, dt), dev.type)  # measured in this process, same thread count
        res[dt] = {"step_s": round(med, 4), "spread_s": [round(min(ts), 4), round(max(ts), 4)],
                   "tokens_per_s": round(tokens / med, 1), "achieved_gflops": round(fpt * tokens / med / 1e9, 1),
                   "mfu": round(fpt * tokens / med / peak, 4), "peak_gflops": peak / 1e9}
    if "float32" in res and "bfloat16" in res:
        res["bf16_speedup"] = round(res["bfloat16"]["tokens_per_s"] / res["float32"]["tokens_per_s"], 2)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
