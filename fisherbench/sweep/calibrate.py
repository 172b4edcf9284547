"""`python -m fisherbench sweep <spec> --calibrate`: measure every cell's WCT epoch count on this machine, before training.

For each cell with a `budget=reference` the candidate and the reference optimizer are timed on the cell's
model and data with the runner's own calibration (`fisherbench.engine.calibrate`), which caches the result under
`<results_dir>/_calibration/`; the runs then reuse it, and `--dry-run` turns it into epoch counts and
GPU-hours. Needs the datasets on this machine.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from fisherbench.core.budget import DerivedBudget
from fisherbench.core.errors import UserError
from fisherbench.engine.lifecycle import calibrate
from fisherbench.sweep.expand import PlannedRun


def calibrate_cells(runs: Sequence[PlannedRun], results_dir: Path) -> list[DerivedBudget]:
    seen, out = set(), []
    cells = [r for r in runs if r.config.budget.mode == "reference"]
    for r in cells:
        if r.cell.key in seen:
            continue  # seeds share one calibration
        seen.add(r.cell.key)
        cfg = r.config.copy()
        OmegaConf.update(cfg, "results_dir", str(results_dir), merge=False)
        try:
            derived = calibrate(cfg)
        except UserError as exc:
            print(f"[sweep] calibrate {r.cell.row} × {r.cell.column}: {exc}", file=sys.stderr)
            continue
        if derived.method == "calibration":
            lo, hi = derived.ratio_ci or (float("nan"), float("nan"))
            how = (f"step-time ratio {derived.ratio:.3f}, 95% CI {lo:.3f}-{hi:.3f}, {derived.blocks} blocks"
                   + (", cached" if derived.calibration_shared else ""))
        else:
            how = "the reference itself: nothing to measure"
        print(f"[sweep] calibrated {r.cell.row} × {r.cell.column}: {derived.derived_epochs:g} epochs ({how})",
              flush=True)
        out.append(derived)
    return out
