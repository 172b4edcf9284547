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
protocol); per cell the mean and the **sample** std (ddof=1) over the seeds that finished. Verdicts are the
tests of `fisherbench.results.verdicts` (their error rates are stated there and tested by simulation):
- a verdict only when **every** expected seed finished; otherwise the cell is `diverged k/n` (k of n seeds
  diverged) or `incomplete k/n` (only k of n seeds finished: the others failed, are unfinished or corrupt, or
  were not run), or `missing` (no run at all); the mean over the survivors is still shown, marked;
- against the paper: an equivalence test (TOST) of our mean against the paper's value with a margin δ:
  `reproduced`, `differs` or `inconclusive (n=…)`, with the interval of the difference; one seed: no test;
- against a spec's baseline cell: Welch's test per cell, Holm-corrected over the rows of each column;
- equal-time cells carry how their budget was set (`fisherbench.results.runs.run_budget`), and a cell whose seeds were
  budgeted by different methods (matched and calibrated) is `mixed` and gets no verdict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from fisherbench.core.config import flatten
from fisherbench.core.errors import UserError
from fisherbench.core.scores import (  # noqa: F401  (part of the report API)
    METRICS,
    VALIDATION_COUNTERPART,
    Metric,
    PaperValue,
    get_metric,
    is_fraction,
)
from fisherbench.core.status import FINAL, Status
from fisherbench.results.runs import (  # noqa: F401  (re-exported: the report API)
    MATCH_IGNORE,
    RunBudget,
    StoredRun,
    StoreIndex,
    match_signature,
    prefer,
    run_budget,
    run_epoch_seconds,
    run_epochs,
    run_peak_memory,
    run_train_seconds,
)
from fisherbench.results.verdicts import (
    ALPHA,
    Equivalence,
    WelchResult,
    default_margin,
    equivalence,
    holm,
    sample_std,
    welch,
)

RULE = ("an equivalence test (TOST): `reproduced` when the 90% CI of Δ = ours − paper lies within ±δ, "
        "`differs` when the 95% CI lies entirely beyond +δ or −δ, else `inconclusive (n=…)`; the paper's value "
        "is taken as a constant and ours as the mean of n seeds (one-sample t interval); one seed: no test")
TABLE6_NOTE = ("The paper's epoch times (its Table 6) include the test pass after every epoch; ours are budget-"
               "clock seconds, which exclude evaluation (and logging and checkpoints) from the budget. On the "
               "Adam/AdaFisher epoch-time ratio the difference is about 0.2%.")
VERDICTS = ("reproduced", "differs", "inconclusive", "untested", "mixed", "n/a", "diverged", "incomplete", "missing")


# ---------------------------------------------------------------------------------------------- input
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
    paper_seeds: int = 5  # seeds behind each paper mean ± std (informational: the paper's value is a constant)
    margin: dict[str, float] = field(default_factory=dict)  # metric -> equivalence margin δ (spec key)
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
    margin_set: Optional[float] = None  # the spec's equivalence margin δ for this metric, if it sets one

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
        """Sample standard deviation (ddof=1) over the finished seeds; None for one seed (no spread)."""
        return sample_std(self.values)

    # ------------------------------------------------------------------------------------ budgets
    @property
    def budgets(self) -> list[RunBudget]:
        """How each finished seed's equal-time budget was set (only seeds with a derived budget)."""
        return [b for s in self.seeds if s.run.ok and (b := run_budget(s.run)) is not None]

    @property
    def budget_methods(self) -> dict[str, int]:
        """Derived-budget method -> seeds (`match`, `calibration`); the reference arm's `identity` left out."""
        out: dict[str, int] = {}
        for b in self.budgets:
            if b.method in ("match", "calibration"):
                out[b.method] = out.get(b.method, 0) + 1
        return out

    @property
    def mixed_budgets(self) -> bool:
        """Seeds budgeted by different methods (some matched, some calibrated): never averaged as one cell."""
        return len(self.budget_methods) > 1

    # ------------------------------------------------------------------------------- against the paper
    @property
    def delta(self) -> Optional[float]:
        if self.mean is None or self.paper is None or self.paper.mean is None:
            return None
        return self.mean - self.paper.mean

    @property
    def margin(self) -> Optional[float]:
        """The equivalence margin δ: the spec's, else `fisherbench.results.verdicts.default_margin` (0.5 points for percent
        metrics, 2% of the paper's value otherwise, or the paper's std when larger)."""
        if self.paper is None or self.paper.mean is None:
            return None
        if self.margin_set is not None:
            return self.margin_set
        return default_margin(self.paper.mean, is_fraction(self.metric.key or ""), self.paper.std)

    @property
    def equivalence(self) -> Optional[Equivalence]:
        """The TOST of ours against the paper (None without a paper value or a finished seed)."""
        if self.delta is None or self.margin is None:
            return None
        return equivalence(self.values, self.paper.mean, self.margin)  # type: ignore[union-attr,arg-type]

    @property
    def verdict_kind(self) -> str:
        """One of VERDICTS."""
        if not self.complete:
            if self.diverged:
                return "diverged"
            return "incomplete" if self.seeds else "missing"
        if self.mixed_budgets:
            return "mixed"
        eq = self.equivalence
        if eq is None:
            return "n/a"
        return eq.kind

    @property
    def verdict(self) -> str:
        """reproduced / differs / `inconclusive (n=…)` / `no test (n=1)` / n/a (no paper value) / `mixed budgets`
        / `diverged k/n` (k of n seeds diverged) / `incomplete k/n` (k of n seeds finished) / missing (no run)."""
        kind = self.verdict_kind
        if kind == "diverged":
            return f"diverged {self.diverged}/{self.expected}"
        if kind == "incomplete":
            return f"incomplete {self.n}/{self.expected}"
        if kind in ("inconclusive", "untested"):
            return self.equivalence.text  # type: ignore[union-attr]
        if kind == "mixed":
            return "mixed budgets: no verdict"
        return kind

    @property
    def diverged(self) -> int:
        return sum(s.run.status == Status.DIVERGED for s in self.seeds)

    @property
    def incomplete(self) -> int:
        """Runs found that neither finished nor diverged (failed, oom, preempted, unfinished, corrupt)."""
        return sum(s.run.status not in FINAL for s in self.seeds)

    @property
    def no_value(self) -> int:
        """Finished runs without the metric (e.g. a validation metric in a run without a validation split)."""
        return sum(s.run.ok and s.value is None for s in self.seeds)

    @property
    def corrupt(self) -> int:
        return sum(s.run.status == Status.CORRUPT for s in self.seeds)

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.seeds)

    @property
    def missing(self) -> int:
        return self.expected - len(self.seeds)

    def scores(self, metric: Metric) -> Optional[list[float]]:
        """Another metric's value per expected seed; None unless every expected seed finished with it."""
        if metric.name == self.metric.name:
            return self.values if self.complete else None
        values = [metric.score(s.run.summary or {}, s.run.rows()) if s.run.ok else None for s in self.seeds]
        if len(values) != self.expected or any(v is None for v in values):
            return None
        return values  # type: ignore[return-value]

    def mean_score(self, metric: Metric) -> Optional[float]:
        """The mean of another metric over this cell's seeds; None unless every expected seed has it."""
        values = self.scores(metric)
        return sum(values) / len(values) if values else None

    # facts per run for Table 6 and the figures
    def mean_of(self, fn: Callable[[StoredRun], Optional[float]]) -> Optional[float]:
        vals = [v for v in (fn(s.run) for s in self.seeds) if v is not None]
        return sum(vals) / len(vals) if vals else None


def cell_result(row: str, column: str, arm_set: str, metric: Metric, seeds_expected: Sequence[int],
                runs: Iterable[StoredRun], paper: Optional[PaperValue] = None, tags: Optional[dict] = None,
                margin: Optional[float] = None) -> CellResult:
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
    return CellResult(row, column, arm_set, metric, expected, seed_results, paper, dict(tags or {}), margin)


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
            complete = [c for c in self.cells if c.complete and not c.mixed_budgets]  # mixed: not one experiment
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
        """The (row, column) marked best, only where a test supports it: per row or per column (`spec.best`),
        the complete cell with the best mean of the selection metric is marked when Welch's test against every
        other complete cell of its group, Holm-corrected over those comparisons, says it is better at 5%
        (each comparison in the better direction, ≥ 2 seeds on both sides). Otherwise nothing is marked: a best
        mean at n=2 without a test is not a finding. Incomplete cells are never candidates (a cell could look
        best by having lost its bad seeds)."""
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
            top = max(keys, key=lambda k: sign * values[k])
            if any(values[k] == values[top] for k in keys if k != top):
                continue  # a tie is no best
            best_scores = self.cell(*top).scores(metric)  # type: ignore[union-attr]
            tests = [welch(best_scores or [], self.cell(*k).scores(metric) or []) for k in keys if k != top]
            if any(r is None or sign * r.delta <= 0 for r in tests):
                continue
            if all(p < ALPHA for p in holm([r.p for r in tests])):  # type: ignore[union-attr,operator]
                marked.add(top)
        return marked


@dataclass(frozen=True)
class Comparison:
    """One cell against the spec's baseline cell: Welch's test of the two means (Δ, its 95% CI, p), the
    p-value Holm-adjusted over the rows compared in the cell's column, and the verdict at 5%."""

    cell: CellResult
    delta: float
    test: Optional[WelchResult]  # None when either side has one seed: no test
    p_holm: Optional[float]

    @property
    def p_value(self) -> Optional[float]:
        return None if self.test is None else self.test.p

    @property
    def differs(self) -> Optional[bool]:
        """True / False by the Holm-adjusted p at 5%; None when there is no test (one seed on a side)."""
        return None if self.p_holm is None else self.p_holm < ALPHA


def compare_with_baseline(t: TableResult) -> tuple[Optional[CellResult], list[Comparison]]:
    """Every complete cell against the baseline cell (`spec.baseline`), in table order; Welch's p-values
    Holm-adjusted per column (the family: the rows compared in that column). (None, []) without a baseline."""
    if t.spec.baseline is None:
        return None, []
    base = t.cell(*t.spec.baseline)
    if base is None or not base.complete or base.mean is None or base.mixed_budgets:
        return base, []
    cells = [c for c in t.cells if c is not base and c.complete and c.mean is not None and not c.mixed_budgets]
    tests = {id(c): welch(c.values, base.values) for c in cells}
    adjusted: dict[int, Optional[float]] = {}
    for col in dict.fromkeys(c.column for c in cells):
        mine = [c for c in cells if c.column == col]
        for c, p in zip(mine, holm([None if tests[id(c)] is None else tests[id(c)].p for c in mine])):
            adjusted[id(c)] = p
    return base, [Comparison(c, c.mean - base.mean, tests[id(c)], adjusted[id(c)])  # type: ignore[operator]
                  for c in cells]


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
                             spec.paper_value(c.row, c.column, metric_name), c.tags, spec.margin.get(metric_name))
                 for c, sig in zip(spec.cells, signatures)]
        rows = list(dict.fromkeys(c.row for c in cells))
        columns = list(dict.fromkeys(c.column for c in cells))
        tables.append(TableResult(spec, metric, cells, rows, columns))
    return tables


def reproduction_summary(tables: Iterable[TableResult]) -> dict[str, list[str]]:
    """Cells by verdict kind (only cells the paper has a value for). Cells that are `diverged k/n`,
    `incomplete k/n` or `inconclusive (n=…)` carry their count."""
    out: dict[str, list[str]] = {k: [] for k in VERDICTS}
    for t in tables:
        for c in t.cells:
            if c.paper is None or c.paper.mean is None:
                continue
            where = f"{t.spec.name}/{t.metric.name}: {c.row} × {c.column}"
            kind = c.verdict_kind
            out[kind].append(f"{where} ({c.verdict})" if kind in ("diverged", "incomplete", "inconclusive",
                                                                  "untested") else where)
    return out
