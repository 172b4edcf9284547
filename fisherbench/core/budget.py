"""Budgets: turn `budget.*` into a plan the loop can check every step, and report progress for the schedule.

Modes: `epochs`, `steps`, `seconds` (of the budget clock, i.e. `train_s`), `reference` (resolved before
training by a calibration, fisherbench/engine/calibrate.py, into a number of *steps*, so that a derived
budget of 9.7 epochs is 9.7 epochs and small budgets stay equal in time) and `match` (resolved into the
measured `train_s` of a finished reference run: a `seconds` plan). Both equal-time modes are described by
one typed record, `DerivedBudget`, built by fisherbench/engine/calibrate.py or fisherbench/engine/match.py
and stored as `summary.json` → `reference_budget` (docs/wall-clock.md lists its fields).
`steps`/`epochs` budgets stop exactly at their last step; a `seconds` budget stops at the first step
boundary at or past it (the loop reads the clock exactly in its last steps, fisherbench/engine/trainer.py),
so it overshoots by less than one step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

# Two runs' machine loads (1-minute load averages) that differ by more than this are flagged in reports: a
# matched pair then ran under different amounts of other work, so equal seconds were not equal conditions.
LOAD_DIFFERENCE_THRESHOLD = 0.5


def loads_differ(a: Optional[float], b: Optional[float], threshold: float = LOAD_DIFFERENCE_THRESHOLD) -> bool:
    """Whether two recorded load averages differ beyond `threshold` (False when either is unknown)."""
    return a is not None and b is not None and abs(a - b) > threshold


@dataclass(frozen=True)
class DerivedBudget:
    """How an equal-time run's budget was set, and how sure it is: `summary.json` → `reference_budget`.

    `method` is `identity` (the candidate is the reference: it trains round(E x steps per epoch) steps),
    `calibration` (a step count from a measured step-time ratio, with its interval) or `match` (the measured
    train_s of a finished reference run, as a seconds budget). Fields that do not apply to a method are None.
    """

    method: str  # identity | calibration | match
    reference_optimizer: Optional[str]
    reference_epochs: Optional[float]  # E: the reference trains round(E x steps_per_epoch) steps
    steps_per_epoch: int
    steps: Optional[int] = None  # the steps this run trains (identity, calibration)
    seconds: Optional[float] = None  # the seconds this run trains (match)
    derived_epochs: Optional[float] = None  # steps / steps_per_epoch (identity, calibration)
    derived_epochs_ci: Optional[tuple[float, float]] = None  # calibration: from the ratio's interval
    ratio: Optional[float] = None  # calibration: candidate / reference time per step
    ratio_ci: Optional[tuple[float, float]] = None
    ratio_half_width: Optional[float] = None  # relative (0.02 = 2%)
    ci_level: Optional[float] = None  # coverage of ratio_ci (0.95)
    ci_method: Optional[str] = None
    blocks: Optional[int] = None  # ABBA blocks measured
    tolerance: Optional[float] = None  # budget.calibration_tolerance the interval met
    calibration_key: Optional[str] = None  # identifies the calibration (the same key: the same measurement)
    calibration_shared: Optional[bool] = None  # read from the cache: measured before, shared with other runs
    reference_step_s: Optional[float] = None  # calibration: measured; match: the reference run's train_s / steps
    candidate_step_s: Optional[float] = None  # calibration: measured (match: this run's own ledger says it)
    reference_seconds: Optional[float] = None  # the reference's time for E epochs (calibration estimate)
    extra_time_fraction: float = 0.0  # one step of the candidate is more than the reference's whole time
    busy_warning: Optional[str] = None
    load_avg: Optional[float] = None  # 1-minute load average when this budget was set (this machine, now)
    reference_run: Optional[str] = None  # match: run id of the reference run whose time is replayed
    reference_load_avg: Optional[float] = None  # match: the reference run's recorded load average
    loads_differ: Optional[bool] = None  # match: |load_avg - reference_load_avg| > LOAD_DIFFERENCE_THRESHOLD
    reference_epochs_done: Optional[float] = None  # match: the reference run's result
    reference_steps: Optional[int] = None
    reference_status: Optional[str] = None
    reference_device: Optional[str] = None
    settings_differ: dict[str, Any] = field(default_factory=dict)  # match: throughput settings unlike ours
    note: Optional[str] = None
    # the full calibration record (per-block wall times, ...): written to the run's calibration.json, not to
    # summary.json
    record: Optional[dict[str, Any]] = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The summary.json form (without `record`; tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "record"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DerivedBudget":
        """Read back an `as_dict()` (unknown keys ignored, so older summaries still load)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"record"}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("derived_epochs_ci", "ratio_ci"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass
class BudgetPlan:
    mode: str  # epochs | steps | seconds (reference resolves to steps, match to seconds)
    steps_per_epoch: int
    epochs: Optional[int] = None
    steps: Optional[int] = None
    seconds: Optional[float] = None
    source: Optional[DerivedBudget] = None  # how an equal-time budget was set

    def __post_init__(self) -> None:
        need = {"epochs": self.epochs, "steps": self.steps, "seconds": self.seconds}
        if self.mode not in need or need[self.mode] is None:
            raise ValueError(f"a {self.mode!r} plan needs its {self.mode}")

    @property
    def total_steps(self) -> Optional[int]:
        if self.mode == "epochs" and self.epochs is not None:
            return self.epochs * self.steps_per_epoch
        return self.steps if self.mode == "steps" else None

    @property
    def total_epochs(self) -> Optional[float]:
        steps = self.total_steps
        return None if steps is None else steps / self.steps_per_epoch

    def exhausted(self, step: int, train_s: float) -> bool:
        """True when no further step may start (`step` = optimizer steps done so far)."""
        if self.seconds is not None and self.mode == "seconds":
            return train_s >= self.seconds
        return step >= (self.total_steps or 0)

    def progress(self, step: int, train_s: float, epoch_start: Optional[int] = None) -> float:
        """Fraction of the budget used. With `epoch_start`, the epoch-granular value at that epoch's start."""
        if self.seconds is not None and self.mode == "seconds":
            return min(1.0, train_s / self.seconds)
        if epoch_start is not None:
            total_epochs = self.total_epochs or 1.0
            return min(1.0, epoch_start / math.ceil(total_epochs))
        return min(1.0, step / max(1, self.total_steps or 1))

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                "steps": self.steps, "seconds": self.seconds,
                "source": self.source.as_dict() if self.source is not None else {},
                "total_steps": self.total_steps}


def plan_budget(budget_cfg: Any, steps_per_epoch: int, derived: Optional[DerivedBudget] = None) -> BudgetPlan:
    """Plan from config. `derived` is how a `reference`/`match` budget was set (fisherbench/engine)."""
    mode = budget_cfg.mode
    if mode == "epochs":
        return BudgetPlan("epochs", steps_per_epoch, epochs=int(budget_cfg.epochs))
    if mode == "steps":
        return BudgetPlan("steps", steps_per_epoch, steps=int(budget_cfg.steps))
    if mode == "seconds":
        return BudgetPlan("seconds", steps_per_epoch, seconds=float(budget_cfg.seconds))
    if mode not in ("reference", "match"):
        raise ValueError(f"unknown budget mode {mode!r}")
    if derived is None:
        raise ValueError(f"a {mode} budget needs its derivation (fisherbench/engine/calibrate.py) first")
    if derived.method == "match":  # the reference run's measured time (budget=match, or reference found it)
        return BudgetPlan("seconds", steps_per_epoch, seconds=derived.seconds, source=derived)
    # identity (the candidate is the reference) and calibration: a number of steps
    return BudgetPlan("steps", steps_per_epoch, steps=derived.steps, source=derived)
