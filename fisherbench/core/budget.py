"""Budgets: turn `budget.*` into a plan the loop can check every step, and report progress for the schedule.

Modes: `epochs`, `steps`, `seconds` (of the budget clock, i.e. `train_s`), `reference` (resolved before
training by a calibration, fisherbench/engine/calibrate.py, into a number of *steps*, so that a derived budget of 9.7
epochs is 9.7 epochs and small budgets stay equal in time) and `match` (resolved into the measured `train_s`
of a finished reference run: a `seconds` plan). `steps`/`epochs` budgets stop exactly at their last step;
a `seconds` budget stops at the first step boundary at or past it (the loop reads the clock exactly in its
last steps, fisherbench/engine/trainer.py), so it overshoots by less than one step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class BudgetPlan:
    mode: str  # epochs | steps | seconds (reference resolves to steps, match to seconds)
    steps_per_epoch: int
    epochs: Optional[int] = None
    steps: Optional[int] = None
    seconds: Optional[float] = None
    source: dict[str, Any] = field(default_factory=dict)  # reference calibration details, when derived

    @property
    def total_steps(self) -> Optional[int]:
        if self.mode == "epochs":
            return self.epochs * self.steps_per_epoch  # type: ignore[operator]
        if self.mode == "steps":
            return self.steps
        return None

    @property
    def total_epochs(self) -> Optional[float]:
        if self.mode == "epochs":
            return float(self.epochs)  # type: ignore[arg-type]
        if self.mode == "steps":
            return self.steps / self.steps_per_epoch  # type: ignore[operator]
        return None

    def exhausted(self, step: int, train_s: float) -> bool:
        """True when no further step may start (`step` = optimizer steps done so far)."""
        if self.mode == "seconds":
            return train_s >= self.seconds  # type: ignore[operator]
        return step >= self.total_steps  # type: ignore[operator]

    def progress(self, step: int, train_s: float, epoch_start: Optional[int] = None) -> float:
        """Fraction of the budget used. With `epoch_start`, the epoch-granular value at that epoch's start."""
        if self.mode == "seconds":
            return min(1.0, train_s / self.seconds)  # type: ignore[operator]
        if epoch_start is not None:
            total_epochs = self.total_epochs or 1.0
            return min(1.0, epoch_start / math.ceil(total_epochs))
        return min(1.0, step / max(1, self.total_steps or 1))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_steps"] = self.total_steps
        return d


def plan_budget(budget_cfg: Any, steps_per_epoch: int, derived: Optional[dict[str, Any]] = None) -> BudgetPlan:
    """Plan from config. `derived` holds the calibration result for `reference` budgets."""
    mode = budget_cfg.mode
    if mode == "epochs":
        return BudgetPlan("epochs", steps_per_epoch, epochs=int(budget_cfg.epochs))
    if mode == "steps":
        return BudgetPlan("steps", steps_per_epoch, steps=int(budget_cfg.steps))
    if mode == "seconds":
        return BudgetPlan("seconds", steps_per_epoch, seconds=float(budget_cfg.seconds))
    if derived is not None:  # the plan keeps the result, not the raw calibration record (that is cached)
        derived = {k: v for k, v in derived.items() if k != "calibration"}
    if mode in ("reference", "match"):
        if derived is None:
            raise ValueError(f"a {mode} budget needs its derivation (engine.calibrate) first")
        if derived["method"] == "identity":  # the candidate is the reference: its own epoch count
            return BudgetPlan("epochs", steps_per_epoch, epochs=int(derived["derived_epochs"]), source=derived)
        if derived["method"] == "match":  # the reference run's measured time (budget=match, or reference found it)
            return BudgetPlan("seconds", steps_per_epoch, seconds=float(derived["seconds"]), source=derived)
        return BudgetPlan("steps", steps_per_epoch, steps=int(derived["derived_steps"]), source=derived)
    raise ValueError(f"unknown budget mode {mode!r}")
