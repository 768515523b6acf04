"""Learning-rate schedules. K2 pre-training uses WSD: warm-up, a long constant stage, then decay.

K2: 500 warm-up steps, 2e-4 constant for 10T tokens, cosine decay to 2e-5
over 5.5T tokens (so the decay is ~35% of the run and ends at 0.1x peak).
`wsd_lr` scales that shape to any run length.
"""

from __future__ import annotations

import math


def wsd_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int, decay_fraction: float = 0.35,
           final_lr_ratio: float = 0.1) -> float:
    """Warm-up (linear from 0), stable (peak), decay (cosine to final_lr_ratio * peak) over the last decay_fraction."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_start = wsd_decay_start(total_steps, warmup_steps, decay_fraction)
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    final = peak_lr * final_lr_ratio
    return final + (peak_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_decay_start(total_steps: int, warmup_steps: int, decay_fraction: float) -> int:
    """The first step of `wsd_lr`'s decay for a run of `total_steps`."""
    return max(warmup_steps, total_steps - max(1, int(round(total_steps * decay_fraction))))


class StepBudget:
    """How many steps a run takes: `max_steps`, or fewer so that it ends within a wall-clock budget.

    WSD's stable phase can stop anywhere, so the budget only moves the start
    of the decay. While the run is in its stable phase, every step re-plans
    the total from the measured time per step (steps after the first few, so
    start-up costs do not count) and the measured time of an evaluation: the
    largest total <= max_steps whose remaining steps and evaluations fit in
    what is left of the budget. When the run reaches the decay start of its
    plan, the plan is fixed and the decay runs to its end. A machine fast
    enough for max_steps trains exactly as without a budget.
    """

    def __init__(self, max_steps: int, warmup_steps: int, decay_fraction: float, budget_s: float | None,
                 val_every: int | None = None, skip_steps: int = 3):
        self.max_steps, self.warmup, self.decay_fraction = max_steps, warmup_steps, decay_fraction
        self.budget_s, self.val_every, self.skip = budget_s, val_every, skip_steps
        self.total_steps = max_steps
        self.fixed = budget_s is None
        self.eval_s: float | None = None
        self._mark: tuple[int, float] | None = None  # (step, elapsed) where the timing window starts

    def record_eval(self, seconds: float) -> None:
        self.eval_s = seconds if self.eval_s is None else 0.5 * (self.eval_s + seconds)

    def _evals_between(self, step: int, total: int) -> int:
        if not self.val_every:
            return 1
        n = total // self.val_every - step // self.val_every
        return n + (0 if total % self.val_every == 0 else 1)

    def plan(self, step: int, elapsed_s: float, step_s: float) -> int:
        """The largest total <= max_steps that ends within the budget (at least the next step)."""
        left = self.budget_s - elapsed_s
        eval_s = self.eval_s if self.eval_s is not None else 0.0
        lo, hi = step + 1, self.max_steps
        if (hi - step) * step_s + self._evals_between(step, hi) * eval_s <= left:
            return hi
        while lo < hi:  # binary search: time needed grows with the total
            mid = (lo + hi + 1) // 2
            if (mid - step) * step_s + self._evals_between(step, mid) * eval_s <= left:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def update(self, step: int, elapsed_s: float) -> int:
        """Called after each step with the training wall time so far (evaluations included)."""
        if self.fixed:
            return self.total_steps
        if step <= self.skip or self._mark is None:
            self._mark = (step, elapsed_s)
            return self.total_steps
        s0, e0 = self._mark
        eval_time = (self.eval_s or 0.0) * self._evals_between(s0, step) if self.val_every else 0.0
        step_s = max(elapsed_s - e0 - eval_time, 1e-9) / (step - s0)
        total = self.plan(step, elapsed_s, step_s)
        start = wsd_decay_start(total, self.warmup, self.decay_fraction)
        if step >= start:
            # the decay must start now at the latest: the smallest total whose decay starts at this step
            total = max(total, next((t for t in range(step + 1, self.max_steps + 1)
                                     if wsd_decay_start(t, self.warmup, self.decay_fraction) >= step), self.max_steps))
            self.fixed = True
        self.total_steps = min(total, self.max_steps)
        return self.total_steps

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "fixed": self.fixed, "eval_s": self.eval_s}

    def load_state_dict(self, s: dict) -> None:
        self.total_steps, self.fixed, self.eval_s = int(s["total_steps"]), bool(s["fixed"]), s.get("eval_s")
        self._mark = None
