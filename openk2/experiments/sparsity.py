"""Sparsity scaling (report Fig. 5): more experts at a fixed activated size lower the loss.

Sparsity = total routed experts / activated routed experts. The activated
path (k routed experts + 1 shared, attention, embeddings) is the same in every
run, so FLOPs per token differ only by the router; only the total number of
experts changes. All runs see the same tokens in the same order (per seed).

The compute multiplier at a common loss compares the runs' validation curves
in their stable phase (constant lr, before the WSD decay), where curves from
the same schedule can be read anywhere along their length: the target is the
loss the least sparse model has when its decay starts, and the multiplier is
the ratio of training FLOPs the two models need to get there.
"""

from __future__ import annotations

from dataclasses import dataclass

from openk2.experiments.analysis import compute_multiplier, fmt_pm, mean_curve, mean_std
from openk2.experiments.common import Run, Runner, Scale, md_table, pyplot, save_fig

NAME = "sparsity"
TITLE = "Sparsity scaling at fixed activated parameters (report Fig. 5 in miniature)"


@dataclass
class Settings(Scale):
    steps: int = 400
    experts: tuple[int, ...] = (16, 32, 64, 96)  # with 2 active: sparsity 8, 16, 32, 48 as in the report
    active: int = 2
    moe_intermediate_size: int | None = 64  # None: the preset's
    seeds: tuple[int, ...] = (0, 1)
    decay_fraction: float = 0.35


def default_settings() -> Settings:
    return Settings()


def quick_settings() -> Settings:
    return Settings(corpus="tiny", vocab_size=1024, seq_len=32, batch_size=8, steps=16, val_every=4, val_batches=2,
                    dtype="float32", experts=(4, 8), seeds=(0,), moe_intermediate_size=None)


def _overrides(s: Settings, experts: int) -> dict:
    o = dict(s.model_overrides)
    o.update(n_routed_experts=experts, num_experts_per_tok=s.active)
    if s.moe_intermediate_size is not None:
        o["moe_intermediate_size"] = s.moe_intermediate_size
    return o


def model_stats(s: Settings, experts: int) -> dict:
    """Parameters and training FLOPs per token of the model with `experts` routed experts."""
    from openk2.model.config import get_preset
    from openk2.model.transformer import build_model
    from openk2.train.flops import train_flops_per_token

    mcfg = get_preset(s.preset).replace(vocab_size=s.vocab_size, **_overrides(s, experts))
    n = build_model(mcfg, device="meta").num_parameters()
    return {"total_params": n["total"], "activated_params": n["activated"],
            "train_flops_per_token": train_flops_per_token(mcfg, s.seq_len)}


def run(s: Settings, runner: Runner) -> tuple[str, dict]:
    runner.planned = len(s.experts) * len(s.seeds)
    runs: dict[int, list[Run]] = {}
    for E in s.experts:
        runs[E] = [runner.run(f"experts{E}-k{s.active}-s{seed}", f"sparsity={E / s.active:g} ({E} experts) seed={seed}",
                              model_overrides=_overrides(s, E), seed=seed, decay_fraction=s.decay_fraction)
                   for seed in s.seeds]
    stats = {E: model_stats(s, E) for E in s.experts}
    stable_tokens = runs[s.experts[0]][0].stable_end_tokens
    ref = min(s.experts)
    curves = {E: mean_curve([r.val_curve(stable_tokens) for r in rs]) for E, rs in runs.items()}
    target = curves[ref][1][-1]
    mult = {E: compute_multiplier(curves[ref][:2], curves[E][:2], target, stats[ref]["train_flops_per_token"],
                                  stats[E]["train_flops_per_token"]) for E in s.experts}
    # per seed (paired by seed), to show the spread
    mult_seed = {E: [compute_multiplier(runs[ref][i].val_curve(stable_tokens), runs[E][i].val_curve(stable_tokens),
                                        runs[ref][i].val_curve(stable_tokens)[1][-1],
                                        stats[ref]["train_flops_per_token"], stats[E]["train_flops_per_token"])
                     for i in range(len(s.seeds))] for E in s.experts}
    finals = {E: [r.final_val_loss for r in rs] for E, rs in runs.items()}
    # the loss gap to the least sparse model along training (seed means): does sparsity pay off later?
    full = {E: mean_curve([r.val_curve() for r in rs]) for E, rs in runs.items()}
    gaps = {E: [b - a for a, b in zip(full[ref][1], full[E][1])] for E in s.experts}
    gap_tokens = full[ref][0]

    def m(x):
        return "not reached" if x is None else f"{x:.2f}x"

    table = []
    for E in s.experts:
        st = stats[E]
        table.append([f"{E / s.active:g}", E, f"{st['total_params'] / 1e6:.2f}M", f"{st['activated_params'] / 1e6:.3f}M",
                      f"{st['train_flops_per_token'] / 1e6:.2f}M", fmt_pm(finals[E]),
                      f"{100 * (mean_std(finals[E])[0] / mean_std(finals[ref])[0] - 1):+.2f}%",
                      m(mult[E]) + (f" ({', '.join(m(x) for x in mult_seed[E])})" if len(s.seeds) > 1 else "")])
    top = max(s.experts)
    marks = sorted({0, len(gap_tokens) // 2, len(gap_tokens) - 1})
    gap_table = [[f"{E / s.active:g}"] + [f"{gaps[E][i]:+.4f}" for i in marks] for E in s.experts if E != ref]
    body = [
        f"{s.active} activated routed experts + 1 shared, expert FFN width "
        f"{s.moe_intermediate_size or 'as the preset'}; {s.steps} steps x {s.tokens_per_step:,} tokens; "
        f"{len(s.seeds)} seed(s) per sparsity.",
        "",
        md_table(["sparsity", "experts", "total params", "activated params", "train FLOPs/token", "final val loss",
                  "vs least sparse", f"compute multiplier of sparsity {ref / s.active:g} at loss {target:.3f}"
                  + (" (per seed)" if len(s.seeds) > 1 else "")], table),
        "",
        f"- Compute multiplier: training FLOPs sparsity {ref / s.active:g} needs to reach validation loss {target:.3f} "
        f"(its own loss at the end of the stable phase, {stable_tokens:,} tokens) divided by the FLOPs the sparser "
        f"model needs; read from seed-averaged stable-phase curves, interpolated in log tokens.",
        f"- Sparsity {top / s.active:g} vs {ref / s.active:g}: {m(mult[top])} (report Fig. 5: sparsity 48 needs "
        "1.69x, 1.39x and 1.15x fewer FLOPs than sparsity 8, 16 and 32 to reach loss 1.5).",
        "",
        f"Validation loss minus sparsity {ref / s.active:g}'s along training (seed means; negative: the sparser "
        "model is ahead):",
        "",
        md_table(["sparsity"] + [f"{gap_tokens[i]:,} tokens" for i in marks], gap_table),
        "",
        "![validation loss vs FLOPs](val_loss_vs_flops.png)",
        "",
        "![gap](gap.png)",
        "",
        "![final loss vs sparsity](final_loss.png)",
    ]
    _plots(s, runner, runs, curves, stats, target, finals, gap_tokens, gaps)
    results = {"experts": list(s.experts), "active": s.active, "stats": {str(E): stats[E] for E in s.experts},
               "final_val": {str(E): finals[E] for E in s.experts}, "target_loss": target,
               "stable_phase_end_tokens": stable_tokens,
               "compute_multiplier": {str(E): mult[E] for E in s.experts},
               "compute_multiplier_per_seed": {str(E): mult_seed[E] for E in s.experts},
               "gap_tokens": gap_tokens, "gap_to_least_sparse": {str(E): gaps[E] for E in s.experts}}
    return "\n".join(body), results


def _plots(s, runner, runs, curves, stats, target, finals, gap_tokens, gaps) -> None:
    plt = pyplot()
    ref = min(s.experts)
    fig, ax = plt.subplots(figsize=(7, 4))
    for E in s.experts:
        if E != ref:
            ax.plot(gap_tokens, gaps[E], "o-", ms=3, label=f"sparsity {E / s.active:g}")
    ax.axhline(0, color="gray", ls="--", label=f"sparsity {ref / s.active:g}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"val loss - sparsity {ref / s.active:g}'s (nats)")
    ax.set_title("gap to the least sparse model (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_fig(fig, runner.out_dir / "gap.png")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for E, rs in runs.items():
        t, mean, std = mean_curve([r.val_curve() for r in rs])
        f = [x * stats[E]["train_flops_per_token"] for x in t]
        line, = ax.plot(f, mean, lw=1.4, label=f"sparsity {E / s.active:g} ({E} experts)")
        if len(rs) > 1:
            ax.fill_between(f, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
    ax.axhline(target, color="gray", ls=":", label=f"common loss {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log)")
    ax.set_ylabel("validation loss")
    lo = min(min(v) for v in finals.values())
    ax.set_ylim(lo - 0.1, lo + 1.2)
    ax.set_title("validation loss vs training FLOPs (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_fig(fig, runner.out_dir / "val_loss_vs_flops.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [E / s.active for E in finals]
    ms = [mean_std(v) for v in finals.values()]
    ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], fmt="o-", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("sparsity (total / activated experts)")
    ax.set_ylabel("final validation loss")
    ax.set_title("final validation loss vs sparsity")
    ax.grid(alpha=0.3)
    save_fig(fig, runner.out_dir / "final_loss.png")
