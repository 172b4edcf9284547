"""Time-to-target and performance profiles: how fast each optimizer reaches a quality target.

Per run, the time-to-target is the budget-clock time (`train_s`, training only: evaluation excluded) of the
first evaluation whose metric reached the target (`fisherbench.core.scores.time_to_target`); its resolution is the
evaluation interval. A run counts whatever its status: a run that reached the target before it diverged or
failed did reach it. Seeds that never reached it, and expected seeds with no run, count as not reached (∞).

Per cell: the median over the expected seeds (∞ when at least half did not reach it: "not reached"), with
the min–max of the times that did, how many seeds reached it, and the evaluation spacing (the median
budget-clock time between consecutive evaluations: the time resolution; a target reached at t was reached
somewhere in the interval before t). Two cells of one problem whose times differ by less than that spacing
are a tie within one evaluation: the report says so where such a tie decides who is fastest.

A target on a test metric (`test/...`) is reported with a warning: which evaluation first reaches a test value
is selection on the test set; targets belong on validation metrics, as AlgoPerf sets them. A target on a key
that no run of the report logs is a user error (exit 2) listing the logged keys.

Performance profile (Dolan & Moré 2002; the way AlgoPerf scores training algorithms): each table row is a
problem (a model/dataset), each column a solver (an optimizer). With t[p, s] the cell's median time-to-target
and r[p, s] = t[p, s] / min_s t[p, s], the profile of solver s is ρ_s(τ) = the fraction of problems with
r[p, s] ≤ τ: ρ_s(1) is how often s was the fastest, ρ_s(τ) how often it was within τ× the fastest. A solver
that never reached the target on a problem has r = ∞ there. The score is the normalised area under the
profile on [1, τ_max]: (1/(τ_max − 1)) ∫₁^τmax ρ_s(τ) dτ (1 = fastest on every problem; 0 = never within
τ_max× the fastest), with τ_max = 4 by default, as AlgoPerf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from fisherbench.core.errors import UserError
from fisherbench.core.scores import Target, as_number, time_to_target
from fisherbench.results.report import CellResult, TableResult
from fisherbench.results.runs import StoredRun
from fisherbench.results.tables import format_columns

INF = math.inf
TAU_MAX = 4.0


@dataclass
class CellTime:
    """Time-to-target of one cell."""

    cell: CellResult
    times: list[float]  # one per expected seed, ∞ = not reached (or no run)
    spacing: Optional[float] = None  # median budget-clock seconds between consecutive evaluations

    @property
    def reached(self) -> int:
        return sum(math.isfinite(t) for t in self.times)

    @property
    def expected(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        """Median over the expected seeds; ∞ when at least half did not reach the target."""
        ts = sorted(self.times)
        if not ts:
            return INF
        mid = len(ts) // 2
        return ts[mid] if len(ts) % 2 else (ts[mid - 1] + ts[mid]) / 2

    @property
    def spread(self) -> Optional[tuple[float, float]]:
        """Min and max of the times of the seeds that reached the target."""
        done = [t for t in self.times if math.isfinite(t)]
        return (min(done), max(done)) if done else None

    def text(self) -> str:
        seeds = f"{self.reached}/{self.expected} reached"
        every = f"; evals every {self.spacing:.1f} s" if self.spacing is not None else ""
        if not math.isfinite(self.median):
            return f"not reached ({seeds}{every})"
        lo, hi = self.spread  # type: ignore[misc]
        spread = f" [{lo:.1f}–{hi:.1f}]" if self.reached > 1 else ""
        return f"{self.median:.1f} s{spread} ({seeds}{every})"


def eval_spacing(rows: list[dict], key: str, clock: str = "train_s") -> list[float]:
    """Clock seconds between consecutive evaluations that logged `key`."""
    times = [t for r in rows if as_number(r.get(key)) is not None and (t := as_number(r.get(clock))) is not None]
    return [b - a for a, b in zip(times, times[1:])]


def _median(xs: Sequence[float]) -> Optional[float]:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def cell_time(cell: CellResult, target: Target, clock: str = "train_s") -> CellTime:
    by_seed = {s.seed: s for s in cell.seeds}
    times, gaps = [], []
    for seed in cell.seeds_expected:
        s = by_seed.get(seed)
        t = time_to_target(s.run.rows(), target, clock) if s is not None else None
        times.append(INF if t is None else t)
        if s is not None:
            gaps += eval_spacing(s.run.rows(), target.key, clock)
    return CellTime(cell, times, _median(gaps))


def logged_keys(runs: Sequence[StoredRun]) -> set[str]:
    """Every key some metric row of these runs holds."""
    return {k for r in runs for row in r.rows() for k in row}


def check_target(t: TableResult, target: Target) -> None:
    """UserError when no run of the table logs the target's key (a typo would otherwise read 'not reached')."""
    runs = [s.run for c in t.cells for s in c.seeds]
    keys = logged_keys(runs)
    if keys and target.key not in keys:
        metrics = sorted(k for k in keys if "/" in k)
        raise UserError(f"target {target.text!r}: no run of this report logs {target.key!r}; logged metrics: "
                        f"{', '.join(metrics) or 'none'} (e.g. --target '{_suggest(target, metrics)}')")


def _suggest(target: Target, metrics: Sequence[str]) -> str:
    close = [m for m in metrics if m.startswith(target.key) or target.key.startswith(m)]
    val = [m for m in metrics if m.startswith("val/")]
    key = (close or val or list(metrics) or ["val/acc1"])[0]
    return f"{key}{target.op}{target.threshold:g}"


def test_metric_warning(target: Target) -> Optional[str]:
    """The warning a report prints for a target on a test metric; None for validation/training keys."""
    if not target.key.startswith("test/"):
        return None
    return (f"Warning: the target {target.text} is on a test metric. The first evaluation that reaches a test value "
            "selects on the test set; targets belong on validation metrics (e.g. "
            f"{target.key.replace('test/', 'val/', 1)}{target.op}{target.threshold:g}, with data.val_fraction > 0), "
            "as AlgoPerf sets them.")


@dataclass
class Profile:
    """Performance profile of the columns (solvers) of a table over its rows (problems)."""

    target: Target
    problems: list[str]
    solvers: list[str]
    times: dict[tuple[str, str], CellTime]  # (problem, solver)
    tau_max: float = TAU_MAX

    def ratio(self, problem: str, solver: str) -> float:
        """t[p, s] / min over solvers of t[p, ·]; ∞ when s (or every solver) did not reach the target."""
        ct = self.times.get((problem, solver))
        best = min((c.median for (p, _), c in self.times.items() if p == problem), default=INF)
        if ct is None or not math.isfinite(ct.median) or not math.isfinite(best):
            return INF
        return ct.median / best if best > 0 else (1.0 if ct.median == 0 else INF)

    def rho(self, solver: str, tau: float) -> float:
        if not self.problems:
            return 0.0
        return sum(self.ratio(p, solver) <= tau for p in self.problems) / len(self.problems)

    def score(self, solver: str) -> float:
        """Normalised area under ρ_s on [1, τ_max] (exact for the step function)."""
        if not self.problems:
            return 0.0
        area = sum(max(0.0, self.tau_max - max(1.0, r)) for p in self.problems
                   if (r := self.ratio(p, solver)) <= self.tau_max)
        return area / ((self.tau_max - 1.0) * len(self.problems))

    def ties(self) -> list[str]:
        """Problems where the fastest optimizer's lead over another is less than one evaluation spacing: who is
        fastest there (ρ(1), and the ratios near 1) is decided by a tie within one evaluation."""
        out = []
        for prob in self.problems:
            done = sorted(((c.median, s, c.spacing) for (p, s), c in self.times.items()
                           if p == prob and math.isfinite(c.median)), key=lambda x: x[0])
            if len(done) < 2:
                continue
            t0, s0, g0 = done[0]
            tied, spacing = [], 0.0
            for t, s, g in done[1:]:
                gaps = [x for x in (g0, g) if x is not None]
                if gaps and t - t0 < max(gaps):
                    tied.append((t, s))
                    spacing = max(spacing, *gaps)
            if tied:
                names = ", ".join(f"{s} ({t:.1f} s)" for t, s in tied)
                out.append(f"{prob}: {s0} ({t0:.1f} s) and {names} are within one evaluation interval "
                           f"({spacing:.1f} s), so which is fastest is not resolved by the evaluations")
        return out

    def unsolved(self) -> list[str]:
        """Problems no solver reached the target on."""
        return [p for p in self.problems if all(not math.isfinite(self.ratio(p, s)) for s in self.solvers)]

    def curve(self, solver: str, taus: Sequence[float]) -> list[float]:
        return [self.rho(solver, tau) for tau in taus]


def profile(t: TableResult, target: Target, clock: str = "train_s", tau_max: float = TAU_MAX) -> Profile:
    check_target(t, target)
    times = {(c.row, c.column): cell_time(c, target, clock) for c in t.cells}
    return Profile(target, list(t.rows), list(t.columns), times, tau_max)


# ------------------------------------------------------------------------------------------- rendering
def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def times_rows(p: Profile) -> tuple[list[str], list[list[str]]]:
    """Median time-to-target per cell: `median s [min–max] (k/n reached)`."""
    body = [[prob, *[(p.times[(prob, s)].text() if (prob, s) in p.times else "") for s in p.solvers]]
            for prob in p.problems]
    return [f"time to {p.target.text}", *p.solvers], body


def profile_rows(p: Profile) -> tuple[list[str], list[list[str]]]:
    taus = (1.0, 2.0, p.tau_max)
    header = ["optimizer", *[f"ρ(τ={tau:g})" for tau in taus], f"score (area on [1, {p.tau_max:g}])"]
    body = [[s, *[f"{p.rho(s, tau):.2f}" for tau in taus], f"{p.score(s):.3f}"] for s in p.solvers]
    return header, body


def times_markdown(p: Profile) -> str:
    return _md(*times_rows(p))


def profile_markdown(p: Profile) -> str:
    return _md(*profile_rows(p))


def console(p: Profile) -> str:
    warning = test_metric_warning(p.target)
    out = ([warning, ""] if warning else []) + [format_columns(*times_rows(p)), "",
           f"Performance profile: fraction of problems within τ × the fastest optimizer's median time; "
           f"score = normalised area under ρ on [1, {p.tau_max:g}]",
           format_columns(*profile_rows(p))]
    out += [f"Tie within one evaluation: {x}." for x in p.ties()]
    if p.unsolved():
        out.append(f"No optimizer reached the target on: {', '.join(p.unsolved())}.")
    return "\n".join(out)


def markdown(p: Profile) -> str:
    warning = test_metric_warning(p.target)
    out = [f"## Time to {p.target.text}", "", *([f"**{warning}**", ""] if warning else []),
           f"Budget-clock seconds (training only, evaluation excluded) of the first evaluation with "
           f"{p.target.text}; median over the expected seeds (not reached = ∞), [min–max] of the seeds that "
           "reached it. The resolution is the evaluation spacing shown in each cell (`evals every … s`, the median "
           "budget-clock time between evaluations): the target was reached somewhere in the interval before the "
           "time shown.", "", times_markdown(p), "",
           "### Performance profile", "",
           f"ρ(τ): fraction of the {len(p.problems)} problem(s) (table rows) on which the optimizer reached the "
           f"target within τ × the fastest optimizer's median time; score: area under ρ on [1, {p.tau_max:g}], "
           "normalised (AlgoPerf-style).", "", profile_markdown(p), ""]
    for x in p.ties():
        out += [f"Tie within one evaluation: {x}; ρ(1) and the ratios near 1 there are decided by that tie.", ""]
    if p.unsolved():
        out += [f"No optimizer reached the target on: {', '.join(p.unsolved())}.", ""]
    return "\n".join(out)
