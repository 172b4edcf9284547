"""Paper tables from the results store: find each cell's runs, score them as the paper did, compare.

A cell (row x column of a sweep spec, `sweep.spec`) is composed with Hydra exactly as the sweep launches it;
a stored run belongs to the cell when its resolved config equals the cell's in everything that changes
what a run computes (the run identity) except the seed and the settings in `MATCH_IGNORE` (paths, loader
workers, calibration effort). So runs launched by hand or by another preset count when they are the same
experiment, and two runs of the same cell and seed (duplicates) are reduced to one: the finished one,
then the most recent.

Scores follow the official protocol (spec §4.1): per run the best test top-1 over epochs (or the test
perplexity at the best validation perplexity), per cell the mean and the population std (ddof=0) over seeds.
Diverged runs are marked and left out of the mean; failed or unfinished runs count as missing seeds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from fisherbench.config import strip_non_identity
from fisherbench.scores import METRICS, Metric, as_number as _num, get_metric  # noqa: F401  (part of the report API)
from fisherbench.store import RunDir, canonical, iter_run_dirs

# Config keys that do not change the experiment, so runs that differ only in them are the same cell.
MATCH_IGNORE = (
    "data.root", "data.num_workers", "data.download", "data.verify", "data.cache", "data.loader",
    "data.tokenizer_dir", "deterministic", "budget.calibration_steps", "budget.calibration_warmup",
    "budget.warmup_steps", "budget.recalibrate",
)
OK_STATUSES = ("completed", "budget_exhausted")


# --------------------------------------------------------------------------------------------- matching
def _drop(d: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d, dict) else None  # type: ignore[assignment]
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def match_signature(resolved: dict[str, Any]) -> str:
    """What makes two runs the same experiment up to the seed: identity minus seed minus `MATCH_IGNORE`."""
    d = json.loads(json.dumps(resolved, default=str))
    d.pop("_choices", None)
    d.pop("seed", None)
    d = strip_non_identity(d)
    for key in MATCH_IGNORE:
        _drop(d, key)
    return json.dumps(canonical(d), sort_keys=True, separators=(",", ":"))


@dataclass
class StoredRun:
    run_dir: RunDir
    config: dict[str, Any]
    summary: Optional[dict[str, Any]]
    signature: str
    _rows: Optional[list[dict[str, Any]]] = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def status(self) -> str:
        return str(self.summary.get("status")) if self.summary else "unfinished"

    def rows(self) -> list[dict[str, Any]]:
        """The run's metric rows (read once)."""
        if self._rows is None:
            self._rows = self.run_dir.metrics()
        return self._rows


class StoreIndex:
    """Every run of a store by match signature (read once; a progress bar when there are many)."""

    def __init__(self, root: Path | str, progress: bool = False) -> None:
        self.root = Path(root)
        dirs = list(iter_run_dirs(self.root))
        if progress and len(dirs) > 50:
            from tqdm import tqdm

            dirs = tqdm(dirs, desc="reading the store", unit="run", leave=False)
        self.by_signature: dict[str, list[StoredRun]] = {}
        for rd in dirs:
            cfg = rd.config()
            if not isinstance(cfg, dict):
                continue
            run = StoredRun(rd, cfg, rd.summary(), match_signature(cfg))
            self.by_signature.setdefault(run.signature, []).append(run)

    def runs_like(self, signature: str) -> list[StoredRun]:
        return self.by_signature.get(signature, [])


def _preference(run: StoredRun) -> tuple:
    s = run.summary or {}
    rank = 2 if run.status in OK_STATUSES else 1 if run.status == "diverged" else 0
    return (rank, str(s.get("finished_at") or ""), run.run_dir.run_id)


# ---------------------------------------------------------------------------------------------- cells
@dataclass
class SeedResult:
    seed: int
    run: StoredRun
    value: Optional[float]  # the metric (None: diverged / not finished / no metric)
    duplicates: int  # other runs of the same cell and seed that were not used


@dataclass
class CellResult:
    row: str
    column: str
    arm_set: str
    metric: Metric
    seeds_expected: list[int]
    seeds: list[SeedResult]
    paper: Any  # sweep.spec.PaperValue or None
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.seeds if s.value is not None and s.run.status in OK_STATUSES]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        v = self.values
        return sum(v) / len(v) if v else None

    @property
    def std(self) -> Optional[float]:
        """Population standard deviation (ddof=0), as the official tables."""
        v = self.values
        if not v:
            return None
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    @property
    def diverged(self) -> int:
        return sum(s.run.status == "diverged" for s in self.seeds)

    @property
    def incomplete(self) -> int:
        return sum(s.run.status not in (*OK_STATUSES, "diverged") for s in self.seeds)

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.seeds)

    @property
    def missing(self) -> int:
        return len(self.seeds_expected) - len(self.seeds)

    @property
    def delta(self) -> Optional[float]:
        if self.mean is None or self.paper is None or self.paper.mean is None:
            return None
        return self.mean - self.paper.mean

    @property
    def sigma(self) -> Optional[float]:
        """Std of the difference ours - paper: sqrt(std_ours^2 + std_paper^2)."""
        if self.std is None:
            return None
        return math.sqrt(self.std ** 2 + ((self.paper.std if self.paper else None) or 0.0) ** 2)

    @property
    def verdict(self) -> str:
        """reproduced (|Δ| <= 2σ) / not reproduced / n/a (no σ or nothing to compare) / missing / diverged."""
        if self.mean is None:
            if self.diverged:
                return "diverged"
            return "missing"
        if self.paper is None or self.paper.mean is None:
            return "n/a"
        sigma = self.sigma
        if not sigma:
            return "n/a"
        return "reproduced" if abs(self.delta) <= 2 * sigma + 1e-12 else "not reproduced"  # type: ignore[arg-type]

    # facts per run for Table 6 and the figures
    def mean_of(self, fn: Callable[[StoredRun], Optional[float]]) -> Optional[float]:
        vals = [v for v in (fn(s.run) for s in self.seeds) if v is not None]
        return sum(vals) / len(vals) if vals else None


def run_epochs(run: StoredRun) -> Optional[float]:
    """Epochs the run trained (its budget plan when finished normally, else what it reached)."""
    s = run.summary or {}
    plan = s.get("budget") or {}
    if run.status in OK_STATUSES and plan.get("mode") == "epochs" and plan.get("epochs"):
        return float(plan["epochs"])
    return _num(s.get("epochs_done"))


def run_epoch_seconds(run: StoredRun) -> Optional[float]:
    """Training (budget-clock) seconds per epoch."""
    s = run.summary or {}
    done = _num(s.get("epochs_done"))
    train_s = _num((s.get("ledger") or {}).get("train_s"))
    return train_s / done if done and train_s is not None else None


def run_peak_memory(run: StoredRun) -> Optional[float]:
    return _num((run.summary or {}).get("peak_memory_bytes"))


@dataclass
class TableResult:
    spec: Any  # sweep.spec.SweepSpec
    metric: Metric
    cells: list[CellResult]
    rows: list[str]
    columns: list[str]

    def cell(self, row: str, column: str) -> Optional[CellResult]:
        for c in self.cells:
            if c.row == row and c.column == column:
                return c
        return None


def collect(spec, index: StoreIndex, arm_sets: Sequence[str] = ("main",), user_overrides: Sequence[str] = (),
            wct_mode: str = "measured", seeds: Optional[Sequence[int]] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> list[TableResult]:
    """One table per metric of the spec (the main metric, then `extra_metrics`)."""
    from sweep.expand import composed_cells
    from engine.identity import resolved_dict

    composed = composed_cells(spec, arm_sets, user_overrides, wct_mode, progress)
    seeds_expected = [int(s) for s in (spec.seeds if seeds is None else seeds)]
    tables = []
    for metric_name in spec.metrics():
        metric = get_metric(metric_name)
        cells = []
        for cc in composed:
            signature = match_signature(resolved_dict(cc.config))
            by_seed: dict[int, list[StoredRun]] = {}
            for run in index.runs_like(signature):
                if run.seed in seeds_expected:
                    by_seed.setdefault(run.seed, []).append(run)
            seed_results = []
            for seed in seeds_expected:
                candidates = by_seed.get(seed)
                if not candidates:
                    continue
                chosen = max(candidates, key=_preference)
                value = metric.score(chosen.summary or {}, chosen.rows()) if chosen.status in OK_STATUSES else None
                seed_results.append(SeedResult(seed, chosen, value, len(candidates) - 1))
            cells.append(CellResult(cc.cell.row, cc.cell.column, cc.cell.arm_set, metric, seeds_expected,
                                    seed_results, spec.paper_value(cc.cell.row, cc.cell.column, metric_name),
                                    dict(cc.cell.tags)))
        rows = list(dict.fromkeys(c.row for c in cells))
        columns = list(dict.fromkeys(c.column for c in cells))
        tables.append(TableResult(spec, metric, cells, rows, columns))
    return tables


def reproduction_summary(tables: Iterable[TableResult]) -> dict[str, list[str]]:
    """Cells by verdict (only cells the paper has a value for; `n/a` = no spread to judge by)."""
    out: dict[str, list[str]] = {"reproduced": [], "not reproduced": [], "n/a": [], "missing": [], "diverged": []}
    for t in tables:
        for c in t.cells:
            if c.paper is None or c.paper.mean is None:
                continue
            out[c.verdict].append(f"{t.spec.name}/{t.metric.name}: {c.row} × {c.column}")
    return out
