"""SFT throughput with and without packing, on the same data, side by side (issue 14).

    python benchmarks/bench_sft.py [--steps 6] [--seq-len 768] [--batch-size 8] [--tokenizer DIR]

The same sample stream (BFCL single-call questions + reasoning-gym worked solutions, K2 format, loss on
assistant tokens) is trained three ways with the shared Trainer's step (MuonClip, QK-Clip on) on a
k2-tiny model:

* packed: conversations packed first-fit into rows, attention confined per conversation (SDPA with
  the block-diagonal causal mask built from document_ids) - what `openk2 sft` does;
* packed-leaky: the same rows with plain causal attention (no confinement): the speed of the fused
  causal kernel, i.e. what confinement costs; not a correct training setup;
* unpacked: one conversation per row, padded to the batch's longest.

Layouts alternate step by step (A B C A B C ...) so machine load hits them alike; the first round is
warm-up. It prints, per layout, positions/s, loss tokens/s (the tokens that train), the fraction of
computed positions that carry loss and the padding fraction, and the ratios packed / unpacked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _tokenizer(path: str | None):
    from openk2.data.tokenizer import load_tokenizer, train_tokenizer

    if path:
        return load_tokenizer(path), path
    default = Path("runs/_data/default-v8192/tokenizer")
    if (default / "tokenizer.json").exists():
        return load_tokenizer(default), str(default)
    tok, _ = train_tokenizer("tiny", 4096)
    return tok, "trained on the 'tiny' corpus (4096)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per layout (after one warm-up step)")
    ap.add_argument("--seq-len", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the main job's, else trained)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    from openk2.model.config import get_preset
    from openk2.model.transformer import build_model
    from openk2.sft.config import SFTConfig
    from openk2.sft.data import ChatFormat, SFTDataset, encode_all, token_stats
    from openk2.sft.data import bfcl_conversations, math_conversations
    from openk2.sft.train import _build_optimizer, _sft_count, sft_loss
    from openk2.train.trainer import Trainer, resolve_precision

    tok, tok_from = _tokenizer(args.tokenizer)
    fmt = ChatFormat(tok, "k2")
    examples = {"bfcl": encode_all(fmt, bfcl_conversations(), args.seq_len),
                "math": encode_all(fmt, math_conversations(200), args.seq_len)}
    weights = {"bfcl": 1.0, "math": 0.25}
    cfg = SFTConfig(base="bench", seq_len=args.seq_len, batch_size=args.batch_size, max_steps=10_000,
                    time_budget_min=None, progress=False, dtype=args.dtype, lr=1e-4)
    mcfg = get_preset("k2-tiny").replace(vocab_size=tok.vocab_size, max_position_embeddings=max(1024, args.seq_len))
    precision = resolve_precision(cfg, torch.device("cpu"))

    layouts = {}
    for name, pack, confine in (("packed", True, True), ("packed-leaky", True, False), ("unpacked", False, False)):
        torch.manual_seed(0)
        model = build_model(mcfg)
        model.set_track_max_logit(True)
        opt = _build_optimizer(model, cfg, precision["ns_matmul"])
        ds = SFTDataset(examples, weights, args.seq_len, tok.pad_id, pack=pack, seed=0)

        def loss_fn(m, b, confine=confine):
            if not confine:
                b = {k: v for k, v in b.items() if k not in ("document_ids", "position_ids")}
            return sft_loss(m, b)

        tr = Trainer(model, opt, cfg, ds, loss_fn=loss_fn, count_fn=_sft_count, precision=precision,
                     run_dir="/tmp/openk2-bench-sft")
        layouts[name] = {"trainer": tr, "it": ds.batches(args.batch_size), "time": 0.0, "positions": 0,
                         "loss_tokens": 0, "real": 0, "steps": 0}

    def step(L, timed: bool):
        tr = L["trainer"]
        batch = next(L["it"])
        s = token_stats(batch)
        t0 = time.perf_counter()
        tr.forward_backward([batch])
        tr.optimizer_step()
        dt = time.perf_counter() - t0
        if timed:
            L["time"] += dt
            L["positions"] += s["positions"]
            L["loss_tokens"] += s["loss_tokens"]
            L["real"] += s["real_tokens"]
            L["steps"] += 1

    load0 = os.getloadavg()
    for r in range(args.steps + 1):
        for L in layouts.values():
            step(L, timed=r > 0)
    load1 = os.getloadavg()
    out = {"tokenizer": tok_from, "seq_len": args.seq_len, "batch_rows": args.batch_size, "steps": args.steps,
           "dtype": precision["dtype"], "loadavg_1m": [round(load0[0], 2), round(load1[0], 2)], "layouts": {}}
    print(f"SFT step on k2-tiny, {args.batch_size} rows x <= {args.seq_len} positions, {args.steps} timed steps per "
          f"layout (alternating), {precision['dtype']} matmuls; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'layout':<14}{'positions/s':>13}{'loss tok/s':>12}{'loss frac':>11}{'padding':>9}{'s/step':>8}")
    for name, L in layouts.items():
        r = {"positions_per_s": L["positions"] / L["time"], "loss_tokens_per_s": L["loss_tokens"] / L["time"],
             "loss_fraction": L["loss_tokens"] / L["positions"], "padding_fraction": 1 - L["real"] / L["positions"],
             "s_per_step": L["time"] / L["steps"], "loss_tokens_per_step": L["loss_tokens"] / L["steps"]}
        out["layouts"][name] = {k: round(v, 4) for k, v in r.items()}
        print(f"{name:<14}{r['positions_per_s']:>13.0f}{r['loss_tokens_per_s']:>12.0f}{r['loss_fraction']:>11.3f}"
              f"{r['padding_fraction']:>9.3f}{r['s_per_step']:>8.2f}")
    p, u, lk = out["layouts"]["packed"], out["layouts"]["unpacked"], out["layouts"]["packed-leaky"]
    out["ratios"] = {
        "loss_tokens_per_s_packed_over_unpacked": round(p["loss_tokens_per_s"] / u["loss_tokens_per_s"], 3),
        "loss_fraction_packed_over_unpacked": round(p["loss_fraction"] / u["loss_fraction"], 3),
        "positions_per_s_packed_over_leaky": round(p["positions_per_s"] / lk["positions_per_s"], 3),
    }
    print("packed / unpacked: loss tokens/s x{loss_tokens_per_s_packed_over_unpacked}, loss fraction "
          "x{loss_fraction_packed_over_unpacked}; confinement costs: packed / packed-leaky positions/s "
          "x{positions_per_s_packed_over_leaky}".format(**out["ratios"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
