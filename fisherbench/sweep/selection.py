"""What a sweep selects on: a validation metric wherever the runs have a validation split.

The paper reports the best *test* accuracy over evaluations; choosing a learning rate (a grid's row, an Optuna
trial) by that number tunes on the test set. So searches optimise the validation counterpart of the spec's
metric (`best_acc1` -> `best_val_acc1`, `test_ppl` -> `best_val_ppl`, `fisherbench.core.scores`), and grids name
their best row by it. Classification sets have a `val` split when `data.val_fraction > 0`; language-model
sets always have one. A grid without a validation split still names its best row, labelled as chosen on test
(the paper's protocol); a search without one refuses to start unless its spec sets `search.metric` to a test
metric explicitly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from fisherbench import data
from fisherbench.core.scores import VALIDATION_COUNTERPART, Metric, get_metric
from fisherbench.core.status import SUCCESS
from fisherbench.core.store import CorruptRunError, RunDir


def has_validation_split(cfg: DictConfig) -> bool:
    """Whether runs of `cfg` evaluate a `val` split (known from the config, before anything is built)."""
    name = OmegaConf.select(cfg, "data.name")
    if name in data.DATASETS and data.DATASETS.get(name).capabilities.task == "language_model":
        return True
    fraction = OmegaConf.select(cfg, "data.val_fraction", default=None)
    return isinstance(fraction, (int, float)) and fraction > 0


@dataclass(frozen=True)
class Selection:
    metric: Metric
    on_validation: bool

    @property
    def label(self) -> str:
        if self.on_validation:
            return f"{self.metric.name} (validation)"
        return f"{self.metric.name} (test: no validation split, the paper's protocol; data.val_fraction>0 adds one)"


def selection_for(spec_metric: str, cfg: DictConfig, requested: Optional[str] = None) -> Selection:
    """The metric that selects among runs of `cfg`: `requested`, else the validation counterpart of
    `spec_metric` when `cfg` has a validation split, else `spec_metric` itself."""
    if requested:
        metric = get_metric(requested)
        return Selection(metric, metric.name in VALIDATION_COUNTERPART.values())
    counterpart = VALIDATION_COUNTERPART.get(spec_metric)
    if counterpart is not None and has_validation_split(cfg):
        return Selection(get_metric(counterpart), True)
    return Selection(get_metric(spec_metric), spec_metric in VALIDATION_COUNTERPART.values())


def score_run(results_dir: Path, run_id: str, metric: Metric) -> Optional[float]:
    """`metric` of a successfully finished run in the store; None for anything else (unfinished, corrupt...)."""
    rd = RunDir(Path(results_dir) / run_id)
    try:
        summary = rd.summary()
        if not summary or summary.get("status") not in SUCCESS:
            return None
        value = metric.score(summary, rd.metrics())
    except CorruptRunError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def grid_choice_lines(spec: Any, outcomes: Sequence[Any], results_dir: Path) -> list[str]:
    """For a grid spec (`grid: true`): per column, the row with the best mean selection metric over its seeds.

    Rows whose runs are not all finished successfully are not candidates (a partial row is not comparable).
    """
    if not getattr(spec, "grid", False) or not outcomes:
        return []
    selection = selection_for(spec.metric, outcomes[0].run.config, getattr(spec, "select", None))
    report = get_metric(spec.metric)
    by_cell: dict[tuple[str, str], list[Any]] = {}
    for o in outcomes:
        by_cell.setdefault((o.run.cell.column, o.run.cell.row), []).append(o)
    best: dict[str, tuple[float, str, Optional[float], int]] = {}
    for (column, row), outs in by_cell.items():
        chosen = [score_run(results_dir, o.run.run_id, selection.metric) for o in outs]
        if any(v is None for v in chosen):
            continue
        value = _mean(chosen)
        tests = [score_run(results_dir, o.run.run_id, report) for o in outs]
        test = _mean(v for v in tests if v is not None)
        better = (column not in best or (value > best[column][0] if selection.metric.higher_is_better
                                          else value < best[column][0]))
        if better:
            best[column] = (value, row, test, len(outs))
    if not best:
        return [f"[sweep] grid choice by {selection.label}: no row has every seed finished yet"]
    lines = [f"[sweep] grid choice by {selection.label}, mean over seeds:"]
    for column, (value, row, test, n) in best.items():
        test_text = ""
        if test is not None and report is not selection.metric:
            test_text = f"; {report.name} {test:.{report.digits}f}"
        lines.append(f"  {column}: {row} ({selection.metric.name} {value:.{selection.metric.digits}f}{test_text}; "
                     f"{n} seed{'s' if n != 1 else ''})")
    return lines
