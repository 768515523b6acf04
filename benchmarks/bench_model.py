"""Forward+backward throughput: openk2 vs transformers' DeepseekV3ForCausalLM on the same config and batch.

Alternates the two models for several rounds in one process and reports
tokens/s, the ratio, and achieved FLOP/s against this machine's matmul peak.

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


def step(model, ids, hf: bool):
    out = model(ids)
    logits = out.logits
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
    models = [(ours, "openk2"), (theirs, "transformers")]
    if args.compile:
        models.append((torch.compile(ours), "openk2_compiled"))
    times = {name: [] for _, name in models}
    for m, name in models:  # warm-up (and compilation)
        step(m, ids, name == "transformers")
        m.zero_grad(set_to_none=True)
    for _ in range(args.rounds):
        for m, name in models:
            t = time.perf_counter()
            step(m, ids, name == "transformers")
            times[name].append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
    flops = train_flops_per_token(cfg, args.seq) * tokens
    peak = {"float32": 180e9, "bfloat16": 830e9}[args.dtype]
    res = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "threads": torch.get_num_threads()}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"median_s": round(med, 4), "tokens_per_s": round(tokens / med, 1),
                     "gflops": round(flops / med / 1e9, 1), "frac_of_peak": round(flops / med / peak, 3)}
    res["ratio_openk2_over_transformers"] = round(res["openk2"]["tokens_per_s"] / res["transformers"]["tokens_per_s"], 2)
    if args.compile:
        res["ratio_compiled_openk2_over_transformers"] = round(
            res["openk2_compiled"]["tokens_per_s"] / res["transformers"]["tokens_per_s"], 2)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
