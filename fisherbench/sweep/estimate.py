"""What a sweep will cost before it runs (`python -m fisherbench sweep <spec> --dry-run`).

Epoch counts of `budget=reference` runs come, in order of preference, from the run itself (its `meta.json`
holds the budget plan once it started), from another seed of the same cell, from the calibration cache of
this machine (`<results_dir>/_calibration/`, written by the first run of each cell or by `--calibrate`),
and otherwise from the paper's Table 6 counts. Times come from runs of the same cell in the store, or from
the calibrated step times; where neither exists the run's time is unknown and the total says how many are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from fisherbench.core.config import plain_dict
from fisherbench.core.env import resolve_device
from fisherbench.core.status import FINAL, Status
from fisherbench.core.store import CorruptRunError, RunDir, read_json
from fisherbench.engine.calibrate import (  # the runs' own cache key, checks and formula
    calibration_key,
    epochs_from_calibration,
    estimate_of,
    record_problem,
)
from fisherbench.engine.compose import load_group_option
from fisherbench.sweep.expand import PlannedRun
from fisherbench.sweep.spec import SweepSpec


@dataclass
class Estimate:
    run: PlannedRun
    store: str  # status in the store, `unfinished`, or `-` (not started)
    epochs: Optional[float]
    epochs_source: str  # budget | run | seed N | calibration | paper | paper, scaled | ?
    hours: Optional[float]  # estimated wall-clock hours of the whole run (per GPU group)
    hours_source: str


def _budget(cfg) -> dict[str, Any]:
    return plain_dict(cfg.budget)


def _cell_key(run: PlannedRun) -> tuple:
    return (run.cell.arm_set, run.cell.row, run.cell.column)


class _Calibrations:
    """Cached calibrations of this machine, found by the runner's own cache key."""

    def __init__(self, results_dir: Path) -> None:
        self.dir = results_dir / "_calibration"
        self._refs: dict[str, dict[str, Any]] = {}
        self._device = None

    def lookup(self, cfg) -> Optional[dict[str, Any]]:
        if not self.dir.is_dir():
            return None
        ref = cfg.budget.reference_optimizer
        if ref not in self._refs:
            self._refs[ref] = load_group_option("optimizer", ref)
        if self._device is None:
            try:
                self._device = resolve_device(cfg.device)
            except ValueError:
                return None
        record = read_json(self.dir / f"{calibration_key(cfg, self._refs[ref], self._device)}.json")
        return record if record_problem(record) is None else None  # a damaged cache estimates nothing


def _epoch_seconds_from_run(rd: RunDir) -> Optional[float]:
    """Wall-clock seconds per epoch of a run in the store (finished: its ledger; unfinished: its last row).
    None when unknown, and for a corrupt run directory (the plan lists it as `corrupt`)."""
    try:
        s = rd.summary()
        if s and s.get("epochs_done") and isinstance((s.get("ledger") or {}).get("wall_s"), (int, float)):
            return float(s["ledger"]["wall_s"]) / float(s["epochs_done"])
        rows = rd.metrics()
        if rows and isinstance(rows[-1].get("epoch"), (int, float)) and rows[-1]["epoch"] \
                and isinstance(rows[-1].get("wall_s"), (int, float)):
            return float(rows[-1]["wall_s"]) / float(rows[-1]["epoch"])
    except CorruptRunError:
        pass
    return None


def _plan(meta: Optional[dict[str, Any]]) -> dict[str, Any]:
    plan = (meta or {}).get("budget_plan")
    return plan if isinstance(plan, dict) else {}


def _meta(rd: RunDir) -> Optional[dict[str, Any]]:
    try:
        return rd.meta()
    except CorruptRunError:
        return None


def estimate(spec: SweepSpec, runs: Sequence[PlannedRun], results_dir: Path, nproc: int = 1) -> list[Estimate]:
    """Each run's epochs and hours, each with where it comes from (the budget, the store, a calibration, the
    paper), for `--dry-run`. Runs are estimated in order: a calibration found for one run also gives later
    runs of the same data their steps per epoch."""
    estimator = _Estimator(spec, runs, Path(results_dir))
    return [estimator.one(r) for r in runs]


def _data_key(cfg: Any) -> str:
    return str(OmegaConf.to_container(cfg.data, resolve=True))


class _Estimator:
    """What the store, the calibration cache and the spec know about a sweep's runs."""

    def __init__(self, spec: SweepSpec, runs: Sequence[PlannedRun], results_dir: Path) -> None:
        self.spec, self.results_dir = spec, results_dir
        self.cal = _Calibrations(results_dir)
        self.by_cell: dict[tuple, list[PlannedRun]] = {}
        for r in runs:
            self.by_cell.setdefault(_cell_key(r), []).append(r)
        self.metas = {r.run_id: _meta(RunDir(results_dir / r.run_id)) for r in runs}
        # steps per epoch per data config, from any run of the sweep that has started or any calibration
        self.steps_by_data: dict[str, int] = {}
        for r in runs:
            plan = _plan(self.metas[r.run_id])
            if plan.get("steps_per_epoch"):
                self.steps_by_data.setdefault(_data_key(r.config), int(plan["steps_per_epoch"]))

    def one(self, r: PlannedRun) -> Estimate:
        b = _budget(r.config)
        epochs, e_src, calib = self._epochs(r, b)
        hours, h_src = self._hours(r, b, epochs, calib)
        return Estimate(r, self._store_state(r), epochs, e_src, hours, h_src)

    def _store_state(self, r: PlannedRun) -> str:
        rd = RunDir(self.results_dir / r.run_id)
        return str(Status.CORRUPT if rd.problem() is not None else rd.status()) if rd.path.exists() else "-"

    def _cell_runs(self, r: PlannedRun) -> list[PlannedRun]:
        """`r`, then the other seeds of its cell (they share its budget)."""
        return [r, *[o for o in self.by_cell[_cell_key(r)] if o is not r]]

    # --------------------------------------------------------------------------------------- epochs
    def _epochs(self, r: PlannedRun, b: dict[str, Any]) -> tuple[Optional[float], str, Optional[dict[str, Any]]]:
        """(epochs, their source, the calibration record used if any)."""
        if b["mode"] == "epochs":
            return float(b["epochs"]), "budget", None
        if b["mode"] == "steps":
            return None, f"{b['steps']} steps", None
        if b["mode"] == "seconds":
            return None, f"{b['seconds']:g} s", None
        found = self._epochs_from_runs(r)
        if found is not None:
            return found[0], found[1], None
        calib = self.cal.lookup(r.config)
        if calib is not None:
            self.steps_by_data.setdefault(_data_key(r.config), int(calib["steps_per_epoch"]))
            epochs = epochs_from_calibration(calib, float(b["reference_epochs"]), int(calib["steps_per_epoch"]))
            return epochs, "calibration", calib
        epochs, source = self._epochs_from_paper(r, b)
        return epochs, source, None

    def _epochs_from_runs(self, r: PlannedRun) -> Optional[tuple[float, str]]:
        for other in self._cell_runs(r):
            plan = _plan(self.metas[other.run_id])
            # a derived budget is a step count (fractional epochs); a match budget is seconds (no epochs yet)
            planned = plan.get("epochs") or (
                plan["total_steps"] / plan["steps_per_epoch"]
                if isinstance(plan.get("total_steps"), int) and plan.get("steps_per_epoch") else None)
            if planned:
                return float(planned), "run" if other is r else f"seed {other.seed}"
        return None

    def _epochs_from_paper(self, r: PlannedRun, b: dict[str, Any]) -> tuple[Optional[float], str]:
        paper = self.spec.paper_epochs(r.cell.column)
        if paper is None:
            return None, "?"
        spec_epochs = float((self.spec.wct or {}).get("epochs") or 0)
        asked = b.get("reference_epochs")
        if spec_epochs and asked is not None and float(asked) != spec_epochs:
            # the paper's count is for the spec's E; another E (command line) scales it
            return round(paper * float(asked) / spec_epochs, 1), "paper, scaled"
        return float(paper), "paper"

    # ---------------------------------------------------------------------------------------- hours
    def _hours(self, r: PlannedRun, b: dict[str, Any], epochs: Optional[float],
               calib: Optional[dict[str, Any]]) -> tuple[Optional[float], str]:
        if b["mode"] == "seconds":
            return float(b["seconds"]) / 3600, "budget"
        per_epoch, source = self._epoch_seconds(r, b, calib)
        return (per_epoch * epochs / 3600 if per_epoch and epochs else None), source

    def _epoch_seconds(self, r: PlannedRun, b: dict[str, Any],
                       calib: Optional[dict[str, Any]]) -> tuple[Optional[float], str]:
        for other in self._cell_runs(r):
            per_epoch = _epoch_seconds_from_run(RunDir(self.results_dir / other.run_id))
            if per_epoch:
                return per_epoch, "store"
        calib = calib or (self.cal.lookup(r.config) if b["mode"] == "reference" else None)
        steps = self.steps_by_data.get(_data_key(r.config))
        if calib is not None and steps:
            return estimate_of(calib).candidate_step_s * steps, "calibration"  # block walls hold data waits
        return None, "?"


def format_plan(estimates: Sequence[Estimate], nproc: int = 1, device: str = "GPU") -> str:
    """The dry-run listing and its totals, in hours of the device the sweep would run on (`GPU`, or `CPU` for
    a sweep that trains on the CPU: calling those GPU-hours would misstate what they cost)."""
    lines = []
    w_row = max([len(e.run.cell.row) for e in estimates] + [4])
    w_col = max([len(e.run.cell.column) for e in estimates] + [6])
    header = (f"{'#':>4}  {'row':<{w_row}}  {'column':<{w_col}}  {'seed':>4}  {'run id':<16}  {'store':<16}  "
              f"{'epochs':>7} {'(from)':<12}  {'est. h':>7}")
    lines += [header, "-" * len(header)]
    for i, e in enumerate(estimates, 1):
        ep = f"{e.epochs:g}" if e.epochs is not None else ("?" if e.epochs_source == "?" else "-")
        hrs = f"{e.hours:.3g}" if e.hours is not None else "?"
        lines.append(f"{i:>4}  {e.run.cell.row:<{w_row}}  {e.run.cell.column:<{w_col}}  {e.run.seed:>4}  "
                     f"{e.run.run_id:<16}  {e.store:<16}  {ep:>7} {'(' + e.epochs_source + ')':<12}  {hrs:>7}")
    todo = [e for e in estimates if e.store not in FINAL]
    known = [e.hours for e in todo if e.hours is not None]
    lines.append("-" * len(header))
    sources = {}
    for e in estimates:
        sources[e.epochs_source] = sources.get(e.epochs_source, 0) + 1
    lines.append(f"{len(estimates)} runs; {len(estimates) - len(todo)} finished in the store, {len(todo)} to run; "
                 f"epoch counts from: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    if known:
        device_hours = sum(known) * nproc
        lines.append(f"estimated {device}-hours to run: {device_hours:.1f} (known for {len(known)} of {len(todo)} runs"
                     + (f"; the other {len(todo) - len(known)} have no calibration or stored run yet: "
                        "`python -m fisherbench sweep <spec> --calibrate` measures them" if len(known) < len(todo) else "")
                     + ")")
    elif todo:
        lines.append(f"estimated {device}-hours: unknown until calibrated on the target machine "
                     "(`python -m fisherbench sweep <spec> --calibrate` on it, or run the first seed of each cell)")
    return "\n".join(lines)
