"""Learning-rate schedules as a multiplier of each group's base lr, driven by budget progress in [0, 1]."""
from __future__ import annotations

import math
from typing import Any

from fisherbench.core.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, progress: float) -> float:
    """Multiplier at `progress` (fraction of the budget used, measured at the schedule's interval)."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.warmup_fraction > 0 and p < cfg.warmup_fraction:
        return max(p / cfg.warmup_fraction, 0.01)  # linear warm-up, starting at 1% of the base lr
    if cfg.name == "constant":
        return 1.0
    q = (p - cfg.warmup_fraction) / (1.0 - cfg.warmup_fraction) if cfg.warmup_fraction > 0 else p
    lo = cfg.min_lr_ratio
    if cfg.name == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * q))
    if cfg.name == "linear":
        return lo + (1.0 - lo) * (1.0 - q)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def set_lr(param_groups: list[dict[str, Any]], multiplier: float) -> None:
    """Scale every group's `initial_lr` (recorded on first use) by `multiplier`."""
    for group in param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * multiplier
