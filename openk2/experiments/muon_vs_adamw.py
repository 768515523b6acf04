"""MuonClip against AdamW at the same model, data and token budget (Moonlight: Muon needs ~52% of AdamW's FLOPs).

1. AdamW learning-rate sweep at the full budget; the best final validation
   loss is the target.
2. MuonClip reuses that learning rate as is: its update is scaled to RMS 0.2,
   AdamW's typical update RMS, so AdamW's lr and weight decay carry over
   (update-RMS matching: Moonlight, and the K2 report's MuonClip section).
3. MuonClip is trained at several fractions of the budget, each a complete
   WSD run (warm-up, stable, decay), and the fraction of tokens at which its
   end-of-run loss equals AdamW's full-budget loss is interpolated.

Only the optimizer differs between the two: the same model, data, schedule
and weight decay, applied to the same parameters (matrices, embeddings and
the head; not norm gains or biases: openk2.train.pretrain.build_optimizer).

A second, cheaper estimate reads the full-budget curves in their stable phase
(before the decay starts): the tokens MuonClip needs to reach the loss AdamW
has at the end of its stable phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from openk2.experiments.analysis import fmt_pm, mean_std, tokens_to_reach
from openk2.experiments.common import Run, Runner, Scale, md_table, pyplot, save_fig

NAME = "muon-vs-adamw"
TITLE = "MuonClip vs AdamW: tokens to reach AdamW's loss"


@dataclass
class Settings(Scale):
    steps: int = 500
    adamw_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    muon_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    # a check of the RMS-matching premise: MuonClip at other lrs, full budget (not used for the fraction)
    muon_lr_check: tuple[float, ...] = (1e-3, 1e-2)
    qk_clip_tau: float = 100.0  # K2's tau; at this scale logits stay far below it, so MuonClip acts as Muon
    warmup_steps: int = 30
    decay_fraction: float = 0.35


def default_settings() -> Settings:
    return Settings()


def quick_settings() -> Settings:
    return Settings(corpus="tiny", vocab_size=1024, seq_len=32, batch_size=8, steps=16, val_every=4, val_batches=2,
                    dtype="float32", adamw_lrs=(1e-3, 1e-2), muon_fractions=(0.5, 1.0), warmup_steps=2,
                    muon_lr_check=())


def _val_at(run: Run, max_tokens: int) -> float:
    t, v = run.val_curve(max_tokens)
    if not v:
        raise ValueError(f"{run.label}: no validation point before {max_tokens} tokens (lower val_every)")
    return v[-1]


def run(s: Settings, runner: Runner) -> tuple[str, dict]:
    runner.planned = len(s.seeds) * (len(s.adamw_lrs) + len(s.muon_fractions) + len(s.muon_lr_check))
    common = dict(warmup_steps=s.warmup_steps, decay_fraction=s.decay_fraction)

    # 1. AdamW sweep at the full budget
    adamw: dict[float, list[Run]] = {}
    for lr in s.adamw_lrs:
        adamw[lr] = [runner.run(f"adamw-lr{lr:g}-s{seed}", f"AdamW lr={lr:g} seed={seed}", optimizer="adamw", lr=lr,
                                seed=seed, **common) for seed in s.seeds]
    finals = {lr: mean_std([r.final_val_loss for r in runs])[0] for lr, runs in adamw.items()}
    best_lr = min(finals, key=finals.get)
    target = finals[best_lr]
    full_tokens = s.steps * s.tokens_per_step

    # 2-3. MuonClip at the tuned AdamW lr, several budgets
    muon: dict[float, list[Run]] = {}
    for frac in sorted(s.muon_fractions):
        steps = max(2, int(round(frac * s.steps)))
        warm = min(s.warmup_steps, steps // 4)
        muon[frac] = [runner.run(f"muonclip-lr{best_lr:g}-f{frac:g}-s{seed}",
                                 f"MuonClip lr={best_lr:g} (AdamW's) budget={frac:g} seed={seed}",
                                 optimizer="muonclip", lr=best_lr, qk_clip_tau=s.qk_clip_tau, seed=seed,
                                 max_steps=steps, warmup_steps=warm, decay_fraction=s.decay_fraction)
                      for seed in s.seeds]
    lr_check: dict[float, list[Run]] = {}
    for lr in s.muon_lr_check:
        if lr == best_lr:
            continue
        lr_check[lr] = [runner.run(f"muonclip-lr{lr:g}-f1-s{seed}", f"MuonClip lr={lr:g} (lr check) seed={seed}",
                                   optimizer="muonclip", lr=lr, qk_clip_tau=s.qk_clip_tau, seed=seed, **common)
                        for seed in s.seeds]
    budget_tokens = [muon[f][0].tokens for f in sorted(muon)]
    budget_losses = [mean_std([r.final_val_loss for r in muon[f]])[0] for f in sorted(muon)]
    reach = tokens_to_reach(budget_tokens, budget_losses, target)
    frac_budget = None if reach is None else reach / full_tokens
    bound = reach is not None and budget_losses[0] <= target
    # per-seed fraction (paired: the same seed's AdamW target)
    per_seed = []
    for i, seed in enumerate(s.seeds):
        tgt = adamw[best_lr][i].final_val_loss
        r = tokens_to_reach(budget_tokens, [muon[f][i].final_val_loss for f in sorted(muon)], tgt)
        per_seed.append(None if r is None else r / full_tokens)

    # stable-phase estimate from the full-budget curves
    stable_end = adamw[best_lr][0].stable_end_tokens
    full_frac = max(muon)
    stable_target = mean_std([_val_at(r, stable_end) for r in adamw[best_lr]])[0]
    frac_stable = []
    for r in muon[full_frac]:
        t = tokens_to_reach(*r.val_curve(stable_end), stable_target)
        frac_stable.append(None if t is None else t / stable_end)

    # ---------------------------------------------------------------- report
    rows = [[f"AdamW lr={lr:g}" + (" (best)" if lr == best_lr else ""), f"{full_tokens:,}",
             fmt_pm([r.final_val_loss for r in runs])] for lr, runs in adamw.items()]
    rows += [[f"MuonClip lr={best_lr:g}, {f:g} of budget", f"{muon[f][0].tokens:,}",
              fmt_pm([r.final_val_loss for r in muon[f]])] for f in sorted(muon)]
    rows += [[f"MuonClip lr={lr:g} (lr check), full budget", f"{full_tokens:,}",
              fmt_pm([r.final_val_loss for r in runs])] for lr, runs in sorted(lr_check.items())]
    edge = best_lr in (min(s.adamw_lrs), max(s.adamw_lrs)) and len(s.adamw_lrs) > 1
    muon_full = budget_losses[-1] if max(muon) == 1.0 else None

    def pct(x):
        return "not reached" if x is None else f"{100 * x:.1f}%"

    lines = [
        "## Final validation loss",
        md_table(["run", "tokens", "val loss (nats/token)"], rows),
        "",
        "## Fraction of AdamW's tokens MuonClip needs",
        f"- Target: the best AdamW final validation loss, {target:.4f} (lr {best_lr:g}"
        + (", **at the edge of the sweep**: the AdamW optimum may lie outside it" if edge else ", inside the sweep") + ").",
        f"- From separate WSD runs at {', '.join(f'{f:g}' for f in sorted(muon))} of the budget "
        f"(interpolated in log tokens): **{('<= ' if bound else '') + pct(frac_budget)}** of AdamW's tokens"
        + (f" (per seed: {', '.join(pct(x) for x in per_seed)})" if len(s.seeds) > 1 else "") + ".",
        f"- From the stable phase of the full-budget curves (before the decay, {stable_end:,} tokens; AdamW's loss "
        f"there {stable_target:.4f}): {', '.join(pct(x) for x in frac_stable)}.",
        "- Same tokens: MuonClip ends at " + (f"{muon_full:.4f} vs AdamW {target:.4f} "
                                             f"({100 * (muon_full - target) / target:+.2f}%)." if muon_full else "n/a."),
        *(["- RMS-matching check: MuonClip at the full budget with lr "
           + ", ".join(f"{lr:g}: {mean_std([r.final_val_loss for r in runs])[0]:.4f}" for lr, runs in sorted(lr_check.items()))
           + f" against {muon_full:.4f} at AdamW's lr {best_lr:g}"
           + (" (AdamW's lr is also the best of these for MuonClip)." if all(
               mean_std([r.final_val_loss for r in runs])[0] > muon_full for runs in lr_check.values())
              else ": another lr is better for MuonClip, so reusing AdamW's lr leaves MuonClip some loss, and the "
                   "fraction above is conservative.")] if lr_check and muon_full else []),
        "- Moonlight (and the K2 report, which builds on it) reports Muon matching AdamW with about 52% of the "
        "training FLOPs; model FLOPs per token are identical here, so the token fraction is the FLOP fraction.",
        "",
        "![validation loss](val_loss.png)",
        "",
        "![loss vs budget](budget.png)",
    ]
    _plots(s, runner, adamw, muon, best_lr, target, budget_tokens, budget_losses, reach)
    results = {
        "adamw_final": {f"{lr:g}": [r.final_val_loss for r in runs] for lr, runs in adamw.items()},
        "best_adamw_lr": best_lr, "best_lr_at_sweep_edge": edge, "target_loss": target,
        "muon_final": {f"{f:g}": [r.final_val_loss for r in runs] for f, runs in muon.items()},
        "muon_budget_tokens": budget_tokens, "full_tokens": full_tokens,
        "token_fraction_to_match_adamw": frac_budget, "token_fraction_is_bound_at_smallest_budget": bound,
        "token_fraction_per_seed": per_seed,
        "stable_phase_end_tokens": stable_end, "stable_phase_adamw_loss": stable_target,
        "stable_phase_token_fraction": frac_stable,
        "muon_lr_check_final": {f"{lr:g}": [r.final_val_loss for r in runs] for lr, runs in lr_check.items()},
    }
    return "\n".join(lines), results


def _plots(s, runner, adamw, muon, best_lr, target, budget_tokens, budget_losses, reach) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lr, runs in adamw.items():
        t, v = runs[0].val_curve()
        ax.plot(t, v, "--", lw=1.2, label=f"AdamW lr={lr:g}" + (" (best)" if lr == best_lr else ""))
    t, v = muon[max(muon)][0].val_curve()
    ax.plot(t, v, "-", color="k", lw=1.6, label=f"MuonClip lr={best_lr:g}, full budget")
    ax.scatter(budget_tokens, budget_losses, color="k", zorder=5, label="MuonClip end of shorter WSD runs")
    ax.axhline(target, color="gray", ls=":", label=f"AdamW best final {target:.3f}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{s.preset}: MuonClip vs AdamW (seed {s.seeds[0]})")
    lo = min(min(budget_losses), target)
    ax.set_ylim(lo - 0.1, lo + 1.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_fig(fig, runner.out_dir / "val_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(budget_tokens, budget_losses, "o-", color="k", label="MuonClip (end of WSD run)")
    ax.axhline(target, color="tab:blue", ls="--", label=f"AdamW, full budget ({target:.3f})")
    if reach is not None:
        ax.axvline(reach, color="tab:red", ls=":", label=f"{100 * reach / (s.steps * s.tokens_per_step):.0f}% of AdamW's tokens")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (log)")
    ax.set_ylabel("final validation loss")
    ax.set_title("final loss vs token budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_fig(fig, runner.out_dir / "budget.png")
