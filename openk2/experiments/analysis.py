"""The arithmetic behind the experiments' headline numbers, kept apart from training so tests can check it.

Loss curves are (tokens, loss) points. "Tokens to reach a loss" is read off
the curve's running minimum (a loss once reached counts as reached),
interpolating linearly in (log tokens, loss) between the two points that
bracket the target: loss curves are close to straight lines in log tokens over
short spans. A compute multiplier at a common loss (report Fig. 5) is the
ratio of the training FLOPs two models need to reach that loss.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def _check_curve(tokens: Sequence[float], losses: Sequence[float]) -> None:
    if len(tokens) != len(losses) or not tokens:
        raise ValueError(f"a curve needs as many token counts as losses (got {len(tokens)} and {len(losses)})")
    if any(t <= 0 for t in tokens) or any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError("token counts must be positive and strictly increasing")


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` (None if it never does).

    If the first point is already at or below the target, its token count is
    returned: the true crossing lies at or before it (callers report a bound).
    """
    _check_curve(tokens, losses)
    best = math.inf
    prev_t, prev_l = None, None
    for t, loss in zip(tokens, losses):
        best = min(best, loss)
        if best <= target:
            if prev_t is None:
                return float(t)
            # prev_l > target >= best: interpolate in log tokens
            frac = (prev_l - target) / (prev_l - best)
            return math.exp(math.log(prev_t) + frac * (math.log(t) - math.log(prev_t)))
        prev_t, prev_l = t, best
    return None


def compute_multiplier(ref: tuple[Sequence[float], Sequence[float]], other: tuple[Sequence[float], Sequence[float]],
                       target: float, ref_flops_per_token: float = 1.0, other_flops_per_token: float = 1.0) -> float | None:
    """How many times more training FLOPs `ref` needs than `other` to reach validation loss `target`.

    Each curve is (tokens, losses); FLOPs = tokens x training FLOPs per token.
    None when either curve never reaches the target.
    """
    t_ref = tokens_to_reach(*ref, target)
    t_other = tokens_to_reach(*other, target)
    if t_ref is None or t_other is None:
        return None
    return (t_ref * ref_flops_per_token) / (t_other * other_flops_per_token)


def mean_curve(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean and sample standard deviation of curves measured at the same token counts (seeds)."""
    if not curves:
        raise ValueError("no curves to average")
    tokens = list(curves[0][0])
    for t, _ in curves:
        if list(t) != tokens:
            raise ValueError("curves to average must share their token counts")
    columns = list(zip(*(c[1] for c in curves)))
    means = [statistics.fmean(col) for col in columns]
    stds = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in columns]
    return tokens, means, stds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(values: Sequence[float], digits: int = 4) -> str:
    """'mean ± std (n=k)' for several seeds, the bare value for one."""
    m, s = mean_std(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})"


def last_step_with(rows: Sequence[dict], key: str) -> int | None:
    """The last training step whose row has a truthy `key` (e.g. heads_clipped > 0), None if none."""
    steps = [r["step"] for r in rows if r.get(key)]
    return max(steps) if steps else None
