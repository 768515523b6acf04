"""Experiment plumbing (seconds-long runs on the tiny corpus) and the analysis arithmetic on synthetic curves.

The experiments themselves (tens of minutes each) are not run here; see docs/results.md.
"""

import json
import math

import pytest

from openk2.experiments.analysis import (compute_multiplier, fmt_pm, last_step_with, mean_curve, mean_std,
                                         tokens_to_reach)


# ------------------------------------------------------------------ analysis
def _power_law(tokens, E=2.0, A=40.0, alpha=0.4, efficiency=1.0):
    """L(D) = E + A (efficiency x D)^-alpha: a model `efficiency` times as token-efficient."""
    return [E + A * (efficiency * t) ** -alpha for t in tokens]


TOKENS = [int(1000 * 1.25 ** i) for i in range(40)]


def test_tokens_to_reach_inverts_a_power_law():
    losses = _power_law(TOKENS)
    target = 2.0 + 40.0 * 50_000 ** -0.4
    assert tokens_to_reach(TOKENS, losses, target) == pytest.approx(50_000, rel=5e-3)
    # exactly on a point
    assert tokens_to_reach(TOKENS, losses, losses[10]) == pytest.approx(TOKENS[10])


def test_tokens_to_reach_edges():
    losses = _power_law(TOKENS)
    assert tokens_to_reach(TOKENS, losses, 1.0) is None  # never reached
    assert tokens_to_reach(TOKENS, losses, 99.0) == TOKENS[0]  # already below at the first point: a bound
    # a noisy bump after the first crossing does not matter (running minimum)
    t, l = [1, 2, 3, 4], [5.0, 3.0, 4.0, 2.0]
    assert tokens_to_reach(t, l, 3.5) == pytest.approx(math.exp(0.75 * math.log(2)))
    assert tokens_to_reach(t, l, 2.5) == pytest.approx(math.exp(math.log(3) + 0.5 * math.log(4 / 3)))
    with pytest.raises(ValueError):
        tokens_to_reach([2, 1], [1.0, 0.5], 0.7)
    with pytest.raises(ValueError):
        tokens_to_reach([1, 2], [1.0], 0.7)


def test_compute_multiplier_recovers_a_known_efficiency():
    ref = (TOKENS, _power_law(TOKENS))
    better = (TOKENS, _power_law(TOKENS, efficiency=1.69))
    target = _power_law([200_000])[0]
    assert compute_multiplier(ref, better, target) == pytest.approx(1.69, rel=5e-3)
    # FLOPs per token enter as a ratio: a model 1.3x as costly per token is 1.69/1.3 as compute-efficient
    assert compute_multiplier(ref, better, target, 1.0, 1.3) == pytest.approx(1.69 / 1.3, rel=5e-3)
    assert compute_multiplier(ref, better, 0.5) is None


def test_mean_curve_and_formatting():
    t, m, s = mean_curve([([1, 2], [3.0, 2.0]), ([1, 2], [5.0, 2.0])])
    assert t == [1, 2] and m == [4.0, 2.0] and s[0] == pytest.approx(math.sqrt(2)) and s[1] == 0
    with pytest.raises(ValueError):
        mean_curve([([1, 2], [3.0, 2.0]), ([1, 3], [5.0, 2.0])])
    assert mean_std([1.0]) == (1.0, 0.0)
    assert fmt_pm([1.0, 3.0], 1) == "2.0 ± 1.4 (n=2)" and fmt_pm([2.5], 2) == "2.50"
    rows = [{"step": 1, "heads_clipped": 2}, {"step": 2, "heads_clipped": 1}, {"step": 3, "heads_clipped": 0}]
    assert last_step_with(rows, "heads_clipped") == 2 and last_step_with(rows[2:], "heads_clipped") is None


# ------------------------------------------------------------------ plumbing
@pytest.fixture
def data_dir(tiny_data_dir):
    return tiny_data_dir  # conftest's session corpus: tokenised once for the whole test session


def _quick(name, data_dir, **changes):
    from openk2.experiments import load

    return load(name).quick_settings().replace(data_dir=str(data_dir), **changes)


def _run(name, settings, tmp_path, lines=None):
    from openk2.experiments import run_experiment

    log = (lines.append if lines is not None else (lambda *a: None))
    results = run_experiment(name, settings, runs_root=tmp_path, log=log)
    out = tmp_path / "experiments" / name
    return results, (out / "report.md").read_text(), out


def test_qk_clip_report_and_post_clip_recompute(tmp_path, data_dir):
    s = _quick("qk-clip", data_dir, steps=8, checks=4)
    lines = []
    results, report, out = _run("qk-clip", s, tmp_path, lines)
    seed = results["per_seed"][0]
    # tau is tiny here, so plain Muon passes it and MuonClip clips
    assert seed["plain_first_step_over_tau"] is not None and seed["clip_heads_ever_clipped"] > 0
    checks = results["post_clip_checks"]["0"]
    assert [c["step"] for c in checks] == [2, 4, 6, 8]
    for c in checks:
        # a clipped step: the recomputed logit is pulled to about tau (it is tau x S'/S, see qk_clip.py)
        if c["heads_clipped"]:
            assert c["post_clip_max_fp32"] < c["pre_clip_max"]
    assert f"{seed['plain_final_val']:.4f}" in report and f"{seed['clip_final_val']:.4f}" in report
    assert (out / "max_logit.png").stat().st_size > 1000 and (out / "loss.png").exists()
    assert not any((out / "runs").glob("*/checkpoints/*.pt"))  # checkpoints removed after the analysis
    assert sum("run " in ln for ln in lines) == 4 and any("report" in ln for ln in lines)

    # a second call reuses both finished runs (and their saved post-clip analysis)
    lines2 = []
    again, _, _ = _run("qk-clip", s, tmp_path, lines2)
    assert sum("(cached)" in ln for ln in lines2) == 2
    assert again["per_seed"] == results["per_seed"]


def test_muon_vs_adamw_report(tmp_path, data_dir):
    s = _quick("muon-vs-adamw", data_dir, steps=8, adamw_lrs=(3e-3,), muon_fractions=(0.5, 1.0), val_every=2)
    results, report, out = _run("muon-vs-adamw", s, tmp_path)
    assert results["best_adamw_lr"] == 3e-3 and results["full_tokens"] == 8 * 8 * 32
    assert results["muon_budget_tokens"] == [4 * 8 * 32, 8 * 8 * 32]
    assert f"{results['target_loss']:.4f}" in report
    frac = results["token_fraction_to_match_adamw"]
    assert frac is None or 0 < frac <= 1.0
    assert (out / "val_loss.png").exists() and (out / "budget.png").exists()
    assert json.loads((out / "results.json").read_text())["settings"]["steps"] == 8


def test_sparsity_and_heads_reports(tmp_path, data_dir):
    s = _quick("sparsity", data_dir, steps=8, experts=(4, 8), active=2)
    results, report, out = _run("sparsity", s, tmp_path)
    assert results["compute_multiplier"]["4"] == pytest.approx(1.0)  # the reference against itself
    st = results["stats"]
    assert st["8"]["total_params"] > st["4"]["total_params"]
    assert st["8"]["activated_params"] == pytest.approx(st["4"]["activated_params"], rel=0.01)
    assert "| 2 | 4 |" in report and "| 4 | 8 |" in report and (out / "val_loss_vs_flops.png").exists()

    s = _quick("heads", data_dir, steps=6)
    results, report, out = _run("heads", s, tmp_path)
    assert results["heads"] == [3, 6]
    k2 = results["flops"]["Kimi K2: 64 vs 128 heads | 131072 | decode"]["increase"]
    assert 0.75 < k2 < 0.95  # the report's +83% at 128K, from our own FLOP count
    assert f"{results['loss_change_pct_of_means']:+.2f}%" in report


def test_cli_errors():
    from openk2.cli import main

    assert main(["experiment", "sparsity", "--set", "bogus=1"]) == 2
    assert main(["experiment", "heads", "--seeds", "a,b"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["experiment", "no-such-experiment"])
    assert e.value.code == 2
