"""Forward+backward throughput: openk2 vs transformers' DeepseekV3ForCausalLM on the same config and batch.

Alternates the two models for several rounds in one process and reports
tokens/s, the ratio, and achieved FLOP/s against this machine's matmul peak.

Two ways to get the loss, both timed:
  labels: each model's own training loss, `model(ids, labels=ids).loss`
          (transformers: logits + ForCausalLMLoss; openk2: the fused LM-head +
          cross-entropy that `openk2 pretrain` uses);
  logits: `model(ids).logits` and one shared F.cross_entropy outside the model
          (the same loss code for both: isolates the decoder stack).

    python benchmarks/bench_model.py [--preset k2-tiny] [--batch 4] [--seq 512] [--rounds 5] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from openk2.model.config import get_preset
from openk2.model.transformer import build_model
from openk2.train.flops import train_flops_per_token


def hf_model(cfg, dtype):
    import transformers

    hcfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    hcfg._attn_implementation = "sdpa"
    m = transformers.DeepseekV3ForCausalLM(hcfg)
    return m.to(dtype).train()


def matmul_peak(dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul at the current thread count (the best of a few)."""
    a = torch.randn(1536, 1536, dtype=dtype)
    b = torch.randn(1536, 1536, dtype=dtype)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 1536**3 / (time.perf_counter() - t))
    return best


def step(model, ids, mode: str):
    if mode == "labels":
        loss = model(ids, labels=ids).loss
    else:
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="k2-tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(openk2) (compile time excluded)")
    ap.add_argument("--modes", default="labels,logits", help="comma list of loss modes: labels, logits")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 gives stable ratios on a shared machine: no OpenMP spin contention)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    ours = build_model(cfg, dtype=dtype).train()
    theirs = hf_model(cfg, dtype)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    modes = [m for m in args.modes.split(",") if m]
    models = [(ours, "openk2"), (theirs, "transformers")]
    if args.compile:
        models.append((torch.compile(ours), "openk2_compiled"))
    cases = [(m, name, mode) for mode in modes for m, name in models]
    times = {f"{name}/{mode}": [] for _, name, mode in cases}
    for m, name, mode in cases:  # warm-up (and compilation)
        step(m, ids, mode)
        m.zero_grad(set_to_none=True)
    for _ in range(args.rounds):
        for m, name, mode in cases:
            t = time.perf_counter()
            step(m, ids, mode)
            times[f"{name}/{mode}"].append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
    flops = train_flops_per_token(cfg, args.seq) * tokens
    peak = matmul_peak(dtype)
    res = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "threads": torch.get_num_threads(), "matmul_peak_gflops": round(peak / 1e9, 1)}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"median_s": round(med, 4), "tokens_per_s": round(tokens / med, 1),
                     "gflops": round(flops / med / 1e9, 1), "frac_of_peak": round(flops / med / peak, 3)}
    for mode in modes:
        base = res[f"transformers/{mode}"]["tokens_per_s"]
        for name in ("openk2", "openk2_compiled"):
            if f"{name}/{mode}" in res:
                res[f"ratio {name}/{mode} over transformers/{mode}"] = round(res[f"{name}/{mode}"]["tokens_per_s"] / base, 2)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
