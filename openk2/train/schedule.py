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
    decay_steps = max(1, int(round(total_steps * decay_fraction)))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    final = peak_lr * final_lr_ratio
    return final + (peak_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))
