"""`openk2 params PRESET|CONFIG`: parameter counts on the meta device (nothing allocated)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="kimi-k2",
                   help="a preset name (kimi-k2, deepseek-v3, k2-tiny, ...), a config.json, or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _human(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def main(args: argparse.Namespace) -> int:
    import json

    from openk2.model.config import load_config
    from openk2.model.transformer import build_model

    cfg = load_config(args.model)
    counts = build_model(cfg, device="meta").num_parameters()
    cache = cfg.kv_cache_values_per_token
    if args.json:
        print(json.dumps({"model": args.model, **counts, "kv_cache_values_per_token_per_layer": cache}))
        return 0
    print(f"model:      {args.model} ({cfg.model_type}, {cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} experts, {cfg.num_experts_per_tok} active + {cfg.n_shared_experts} shared)")
    print(f"total:      {counts['total']:,} ({_human(counts['total'])})")
    print(f"activated:  {counts['activated']:,} ({_human(counts['activated'])})")
    if cfg.model_type == "kimi_k2" and counts["total"] == 1_026_408_209_408:
        print("            (the K2 report rounds these to 1.04T total / 32.6B activated)")
    print(f"MLA cache:  {cache} values per token per layer (kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim})")
    return 0
