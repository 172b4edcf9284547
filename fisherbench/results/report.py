"""Tables from the results store: each cell's runs, scored as the paper did, compared with the paper's value.

The input is plain data, a `ReportSpec`: the table's cells, each a row × column with the resolved config its
runs were launched with (`CellInput`), the seeds expected, the metrics and the paper's values. Entry points
compose it (`fisherbench/report.py` composes a sweep spec's cells with Hydra exactly as the sweep launches them);
this module never imports the sweep or the run layer. A stored run belongs to a cell when its resolved config
equals the cell's in everything that changes what a run computes (the run identity) except the seed and the
settings in `MATCH_IGNORE` (paths, loader workers, calibration effort). So runs launched by hand or by another
preset count when they are the same experiment; two runs of the same cell and seed (duplicates) are reduced
to one: the finished one, then the most recent.

Scores (`fisherbench.core.scores`): per run one number (e.g. the best test top-1 over evaluations, the paper's
protocol); per cell the mean and the population std (ddof=0, as the official tables) over the seeds that
finished. Honest verdicts:
- a verdict (reproduced / not reproduced) only when **every** expected seed finished; otherwise the cell is
  `diverged k/n` (k of n seeds diverged) or `incomplete k/n` (only k of n seeds finished: the others failed,
  are unfinished or corrupt, or were not run), or `missing` (no run at all); the mean over the survivors is
  still shown, marked;
- "reproduced" means |ours − paper| ≤ 2σ with σ = √(std_ours² + std_paper²): within two standard deviations
  of **run-to-run spread** (σ is the spread of single runs, not the standard error of the means);
- next to it a Welch t-test p-value of the two means where both sides have at least two seeds (the paper's
  tables give mean ± std over `paper_seeds` = 5 seeds; both stds are read as population stds and corrected
  to sample stds for the test).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from fisherbench.core.errors import UserError
from fisherbench.core.scores import (  # noqa: F401  (part of the report API)
    METRICS,
    VALIDATION_COUNTERPART,
    Metric,
    get_metric,
)
from fisherbench.results.runs import (  # noqa: F401  (re-exported: the report API)
    MATCH_IGNORE,
    OK_STATUSES,
    StoredRun,
    StoreIndex,
    flatten,
    match_signature,
    prefer,
    run_epoch_seconds,
    run_epochs,
    run_peak_memory,
    run_train_seconds,
)

RULE = ("within 2σ of run-to-run spread, σ = √(std_ours² + std_paper²) (the spread of single runs, not the "
        "standard error of the means)")
TTEST = "p: Welch's t-test of the two means (both sides ≥ 2 seeds)"
TABLE6_NOTE = ("The paper's epoch times (its Table 6) include the test pass after every epoch; ours are budget-"
               "clock seconds, which exclude evaluation (and logging and checkpoints) from the budget. On the "
               "Adam/AdaFisher epoch-time ratio the difference is about 0.2%.")
VERDICTS = ("reproduced", "not reproduced", "n/a", "diverged", "incomplete", "missing")


# ---------------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class PaperValue:
    """A value as the paper prints it: mean, optional std; `mean is None` = the paper reports no result."""

    mean: Optional[float]
    std: Optional[float] = None
    text: str = ""


@dataclass
class CellInput:
    """One composed cell: which runs make it (their resolved config, seed aside) and where it goes."""

    row: str
    column: str
    arm_set: str
    config: dict[str, Any]  # the resolved config of the cell's runs (any seed)
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportSpec:
    """A table to report, as plain data (see the module docstring)."""

    name: str
    title: str
    seeds: list[int]
    metrics: list[str]  # the main metric first
    cells: list[CellInput]
    paper: dict[tuple[str, str, str], PaperValue] = field(default_factory=dict)  # (metric, row, column)
    paper_epochs: dict[str, int] = field(default_factory=dict)  # column -> the paper's Table 6 epochs
    wct: bool = False  # a wall-clock-time comparison (its epochs are reported as Table 6)
    notes: list[str] = field(default_factory=list)
    paper_seeds: int = 5  # seeds behind each paper mean ± std (the t-test's n on the paper's side)
    best: str = "row"  # mark the best cell per "row" (the paper's bold), per "column" (grids), or "none"
    best_label: str = ""  # what the mark means, e.g. "the best optimizer.lr of each column"
    select: Optional[str] = None  # the metric that picks the best cell (default: see TableResult.selection)
    baseline: Optional[tuple[str, str]] = None  # (row, column) of the cell every other cell is compared with

    @property
    def metric(self) -> str:
        return self.metrics[0]

    def paper_value(self, row: str, column: str, metric: Optional[str] = None) -> Optional[PaperValue]:
        return self.paper.get((metric or self.metric, row, column))

    def paper_epochs_of(self, column: str) -> Optional[int]:
        return self.paper_epochs.get(column)

    @property
    def has_paper(self) -> bool:
        return bool(self.paper)


def grid_key(cells: Sequence[CellInput]) -> Optional[str]:
    """The config key of a hyper-parameter grid: the one key in which the rows of every column differ (e.g.
    `optimizer.lr` in an LR grid); None for other tables (rows that are networks differ in many keys)."""
    by_column: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        flat = flatten({k: v for k, v in c.config.items() if k != "seed"})
        by_column.setdefault(c.column, []).append({k: json.dumps(v, sort_keys=True, default=str)
                                                   for k, v in flat.items()})
    found: set[str] = set()
    for flats in by_column.values():
        if len(flats) < 2:
            continue
        keys = set().union(*flats)
        differing = {k for k in keys if len({f.get(k) for f in flats}) > 1}
        if len(differing) != 1:
            return None
        found |= differing
    return found.pop() if len(found) == 1 else None


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
    paper: Optional[PaperValue]
    tags: dict[str, Any] = field(default_factory=dict)
    paper_seeds: int = 5

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.seeds if s.value is not None and s.run.ok]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def expected(self) -> int:
        return len(self.seeds_expected)

    @property
    def complete(self) -> bool:
        """Every expected seed finished with a value: the only cells that get a verdict."""
        return self.expected > 0 and self.n == self.expected

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
        """Runs found that neither finished nor diverged (failed, oom, preempted, unfinished, corrupt)."""
        return sum(s.run.status not in (*OK_STATUSES, "diverged") for s in self.seeds)

    @property
    def no_value(self) -> int:
        """Finished runs without the metric (e.g. a validation metric in a run without a validation split)."""
        return sum(s.run.ok and s.value is None for s in self.seeds)

    @property
    def corrupt(self) -> int:
        return sum(s.run.status == "corrupt" for s in self.seeds)

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.seeds)

    @property
    def missing(self) -> int:
        return self.expected - len(self.seeds)

    @property
    def delta(self) -> Optional[float]:
        if self.mean is None or self.paper is None or self.paper.mean is None:
            return None
        return self.mean - self.paper.mean

    @property
    def sigma(self) -> Optional[float]:
        """Run-to-run spread of the difference ours − paper: √(std_ours² + std_paper²)."""
        if self.std is None:
            return None
        return math.sqrt(self.std ** 2 + ((self.paper.std if self.paper else None) or 0.0) ** 2)

    @property
    def p_value(self) -> Optional[float]:
        """Welch's t-test of our mean against the paper's, for complete cells with ≥ 2 seeds on both sides."""
        p = self.paper
        if not self.complete or p is None or p.mean is None or p.std is None or self.n < 2 or self.paper_seeds < 2:
            return None
        s_ours = self.std * math.sqrt(self.n / (self.n - 1))  # type: ignore[operator]  (ddof=0 -> ddof=1)
        s_paper = p.std * math.sqrt(self.paper_seeds / (self.paper_seeds - 1))
        if s_ours == 0 and s_paper == 0:
            return None  # no spread on either side: the test is undefined
        from scipy.stats import ttest_ind_from_stats  # lazy: scipy.stats takes ~1 s; only paper columns need it

        result = ttest_ind_from_stats(self.mean, s_ours, self.n, p.mean, s_paper, self.paper_seeds, equal_var=False)
        return float(result.pvalue)

    @property
    def verdict_kind(self) -> str:
        """One of VERDICTS."""
        if not self.complete:
            if self.diverged:
                return "diverged"
            return "incomplete" if self.seeds else "missing"
        if self.paper is None or self.paper.mean is None or not self.sigma:
            return "n/a"
        return "reproduced" if abs(self.delta) <= 2 * self.sigma + 1e-12 else "not reproduced"  # type: ignore[arg-type]

    @property
    def verdict(self) -> str:
        """reproduced / not reproduced / n/a (nothing to compare, or no spread) / `diverged k/n` (k of n seeds
        diverged) / `incomplete k/n` (k of n seeds finished) / missing (no run)."""
        kind = self.verdict_kind
        if kind == "diverged":
            return f"diverged {self.diverged}/{self.expected}"
        if kind == "incomplete":
            return f"incomplete {self.n}/{self.expected}"
        return kind

    def mean_score(self, metric: Metric) -> Optional[float]:
        """The mean of another metric over this cell's seeds; None unless every expected seed has it."""
        if metric.name == self.metric.name:
            return self.mean if self.complete else None
        values = [metric.score(s.run.summary or {}, s.run.rows()) if s.run.ok else None for s in self.seeds]
        if len(values) != self.expected or any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]

    # facts per run for Table 6 and the figures
    def mean_of(self, fn: Callable[[StoredRun], Optional[float]]) -> Optional[float]:
        vals = [v for v in (fn(s.run) for s in self.seeds) if v is not None]
        return sum(vals) / len(vals) if vals else None


def cell_result(row: str, column: str, arm_set: str, metric: Metric, seeds_expected: Sequence[int],
                runs: Iterable[StoredRun], paper: Optional[PaperValue] = None, tags: Optional[dict] = None,
                paper_seeds: int = 5) -> CellResult:
    """Score a cell from its runs: one run per expected seed (the preferred of duplicates)."""
    expected = [int(s) for s in seeds_expected]
    by_seed: dict[int, list[StoredRun]] = {}
    for run in runs:
        if run.seed in expected:
            by_seed.setdefault(run.seed, []).append(run)
    seed_results = []
    for seed in expected:
        candidates = by_seed.get(seed)
        if not candidates:
            continue
        chosen = max(candidates, key=prefer)
        value = None
        if chosen.ok:
            rows = chosen.rows()  # may mark the run corrupt (unreadable metrics.jsonl)
            if chosen.ok:
                value = metric.score(chosen.summary or {}, rows)
        seed_results.append(SeedResult(seed, chosen, value, len(candidates) - 1))
    return CellResult(row, column, arm_set, metric, expected, seed_results, paper, dict(tags or {}), paper_seeds)


@dataclass
class TableResult:
    spec: ReportSpec
    metric: Metric
    cells: list[CellResult]
    rows: list[str]
    columns: list[str]
    _selection: Optional[tuple] = field(default=None, repr=False)

    def cell(self, row: str, column: str) -> Optional[CellResult]:
        for c in self.cells:
            if c.row == row and c.column == column:
                return c
        return None

    @property
    def has_paper(self) -> bool:
        return any(c.paper is not None for c in self.cells)

    def selection(self) -> tuple[Optional[Metric], dict[tuple[str, str], float]]:
        """The metric that picks the best cells, and its mean per complete cell: `spec.select` if set, else the
        validation counterpart of the table's metric (`fisherbench.core.scores.VALIDATION_COUNTERPART`) when every
        complete cell has it, else the table's metric itself (for the paper's metrics: chosen on test)."""
        if self._selection is None:
            names = [self.spec.select] if self.spec.select else [VALIDATION_COUNTERPART.get(self.metric.name)]
            complete = [c for c in self.cells if c.complete]
            self._selection = (None, {})
            for name in [*names, self.metric.name]:
                if name is None:
                    continue
                metric = get_metric(name)
                values = {(c.row, c.column): c.mean_score(metric) for c in complete}
                if values and all(v is not None for v in values.values()):
                    self._selection = (metric, values)  # type: ignore[assignment]
                    break
        return self._selection

    def best_cells(self) -> set[tuple[str, str]]:
        """The (row, column) marked best: per row or per column (`spec.best`) by the selection metric, among
        complete cells only (a cell whose seeds did not all finish could look best by having lost its bad seeds)."""
        if self.spec.best not in ("row", "column"):
            return set()
        metric, values = self.selection()
        if metric is None:
            return set()
        groups: dict[str, list[tuple[str, str]]] = {}
        for key in values:
            groups.setdefault(key[0] if self.spec.best == "row" else key[1], []).append(key)
        sign = 1 if metric.higher_is_better else -1
        marked = set()
        for keys in groups.values():
            if len(keys) < 2:
                continue
            top = max(sign * values[k] for k in keys)
            marked |= {k for k in keys if sign * values[k] == top}
        return marked


@dataclass(frozen=True)
class Comparison:
    """One cell against the spec's baseline cell: Δ of the means and whether it exceeds 2σ of run-to-run spread
    (σ = √(std² + std_baseline²), the verdict rule), with Welch's p where both have ≥ 2 seeds."""

    cell: CellResult
    delta: float
    sigma: float
    p_value: Optional[float]

    @property
    def differs(self) -> bool:
        return abs(self.delta) > 2 * self.sigma if self.sigma > 0 else self.delta != 0


def compare_with_baseline(t: TableResult) -> tuple[Optional[CellResult], list[Comparison]]:
    """Every complete cell against the baseline cell (`spec.baseline`), in table order. ([], None) without one."""
    if t.spec.baseline is None:
        return None, []
    base = t.cell(*t.spec.baseline)
    if base is None or not base.complete or base.mean is None:
        return base, []
    out = []
    for c in t.cells:
        if c is base or not c.complete or c.mean is None:
            continue
        sigma = math.sqrt((c.std or 0.0) ** 2 + (base.std or 0.0) ** 2)
        out.append(Comparison(c, c.mean - base.mean, sigma, _welch(c, base)))
    return base, out


def _welch(a: CellResult, b: CellResult) -> Optional[float]:
    if a.n < 2 or b.n < 2:
        return None
    from scipy.stats import ttest_ind_from_stats  # lazy: scipy is slow to import; only comparisons need it

    # population stds (ddof=0, as the tables show) -> sample stds
    sa, sb = (c.std * math.sqrt(c.n / (c.n - 1)) for c in (a, b))
    if sa == 0 and sb == 0:
        return None if a.mean == b.mean else 0.0
    return float(ttest_ind_from_stats(a.mean, sa, a.n, b.mean, sb, b.n, equal_var=False).pvalue)


def collect(spec: ReportSpec, index: StoreIndex, seeds: Optional[Sequence[int]] = None) -> list[TableResult]:
    """One table per metric of the spec (the main metric first), each cell matched against the store."""
    if not spec.cells:
        raise UserError(f"report {spec.name}: no cells to report")
    seeds_expected = [int(s) for s in (spec.seeds if seeds is None else seeds)]
    signatures = [match_signature(c.config) for c in spec.cells]
    tables = []
    for metric_name in spec.metrics:
        metric = get_metric(metric_name)
        cells = [cell_result(c.row, c.column, c.arm_set, metric, seeds_expected, index.runs_like(sig),
                             spec.paper_value(c.row, c.column, metric_name), c.tags, spec.paper_seeds)
                 for c, sig in zip(spec.cells, signatures)]
        rows = list(dict.fromkeys(c.row for c in cells))
        columns = list(dict.fromkeys(c.column for c in cells))
        tables.append(TableResult(spec, metric, cells, rows, columns))
    return tables


def reproduction_summary(tables: Iterable[TableResult]) -> dict[str, list[str]]:
    """Cells by verdict kind (only cells the paper has a value for; `n/a` = no spread to judge by). Cells that
    are `diverged k/n` or `incomplete k/n` carry their count."""
    out: dict[str, list[str]] = {k: [] for k in VERDICTS}
    for t in tables:
        for c in t.cells:
            if c.paper is None or c.paper.mean is None:
                continue
            where = f"{t.spec.name}/{t.metric.name}: {c.row} × {c.column}"
            kind = c.verdict_kind
            out[kind].append(f"{where} ({c.verdict})" if kind in ("diverged", "incomplete") else where)
    return out
