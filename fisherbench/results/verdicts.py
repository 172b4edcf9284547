"""Decisions a report prints, as statistical tests with known error rates.

Every spread a report shows is the **sample** standard deviation (ddof=1) over the seeds that finished; one
seed has no spread, no interval and no verdict.

**Reproduced?** (ours against a paper's value) is an equivalence test, TOST (two one-sided tests, Schuirmann
1987). The paper's mean is a constant; ours is the mean of n seeds, so the difference d = mean − paper has the
one-sample t interval mean ± t(n−1) · s/√n. With an equivalence margin δ (`equivalence_margin`):

- `reproduced`: the 90% interval of d lies inside [−δ, +δ] (both one-sided tests reject at 5%: when the true
  difference is δ or more, this is said at most 5% of the time, at any n);
- `differs`: the 95% interval lies entirely beyond +δ or beyond −δ (so it also excludes 0: when the true
  difference is within ±δ, this is said at most 2.5% of the time);
- `inconclusive (n=…)` otherwise: the seeds cannot tell; more seeds narrow the interval, so with a true
  difference well inside ±δ the chance of `reproduced` grows with n (the opposite of a "within kσ" rule).

δ (`equivalence_margin`): a spec may set it (`equivalence_margin: 0.3` in the metric's units); otherwise
0.5 points for metrics in percent (accuracies), 2% of the paper's value for others (perplexity, loss), or the
paper's own std when that is larger (a paper whose runs vary by 1 point cannot be held to 0.5).

**Differs from the baseline?** is Welch's two-sample t-test of each cell against the baseline cell, with the
p-values of the rows compared in one column adjusted by Holm's step-down method (the family-wise error rate
of a column stays at 5%); a row differs when its adjusted p < 0.05. The interval shown is Welch's 95% CI of
the difference of means (unadjusted).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

ALPHA = 0.05
PERCENT_MARGIN = 0.5  # points, for metrics reported in percent
RELATIVE_MARGIN = 0.02  # of the paper's value, for the others


@functools.lru_cache(maxsize=4096)  # simulations and big tables ask for the same few quantiles
def _t_ppf(q: float, df: float) -> float:
    from scipy.stats import t as student_t  # lazy: scipy.stats takes ~1 s to import; only verdicts need it

    return float(student_t.ppf(q, df))


def _t_sf(x: float, df: float) -> float:
    from scipy.stats import t as student_t  # lazy: as above

    return float(student_t.sf(x, df))


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def sample_std(values: Sequence[float]) -> Optional[float]:
    """The sample standard deviation (ddof=1); None for fewer than two values (one run has no spread)."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))


def t_interval(values: Sequence[float], level: float, shift: float = 0.0) -> Optional[tuple[float, float]]:
    """The two-sided `level` one-sample t interval of mean(values) − shift; None for fewer than two values."""
    n = len(values)
    s = sample_std(values)
    if s is None:
        return None
    m = sum(values) / n - shift
    half = _t_ppf(0.5 + level / 2, n - 1) * s / math.sqrt(n) if s > 0 else 0.0
    return m - half, m + half


def default_margin(paper_mean: float, percent: bool, paper_std: Optional[float] = None) -> float:
    """δ when a spec sets none: 0.5 points (percent metrics) or 2% of the paper's value, or the paper's std
    when larger."""
    base = PERCENT_MARGIN if percent else RELATIVE_MARGIN * abs(paper_mean)
    return max(base, paper_std or 0.0)


@dataclass(frozen=True)
class Equivalence:
    """Ours against a constant (the paper's value): the TOST verdict and the intervals behind it."""

    n: int
    delta: float  # mean − paper
    margin: float  # δ
    ci90: Optional[tuple[float, float]]
    ci95: Optional[tuple[float, float]]
    kind: str  # reproduced / differs / inconclusive / untested (n < 2)

    @property
    def text(self) -> str:
        if self.kind == "inconclusive":
            return f"inconclusive (n={self.n})"
        if self.kind == "untested":
            return f"no test (n={self.n})"
        return self.kind


def equivalence(values: Sequence[float], paper_mean: float, margin: float) -> Equivalence:
    """TOST of mean(values) against `paper_mean` with margin δ (see the module docstring)."""
    n = len(values)
    delta = (sum(values) / n - paper_mean) if n else math.nan
    ci90, ci95 = t_interval(values, 0.90, paper_mean), t_interval(values, 0.95, paper_mean)
    if ci90 is None or ci95 is None:
        kind = "untested"
    elif -margin <= ci90[0] and ci90[1] <= margin:
        kind = "reproduced"
    elif ci95[0] > margin or ci95[1] < -margin:
        kind = "differs"
    else:
        kind = "inconclusive"
    return Equivalence(n, delta, margin, ci90, ci95, kind)


@dataclass(frozen=True)
class WelchResult:
    delta: float  # mean(a) − mean(b)
    ci95: tuple[float, float]
    p: float
    df: float


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[WelchResult]:
    """Welch's two-sided t-test of mean(a) − mean(b), with its 95% CI; None unless both have ≥ 2 values."""
    sa, sb = sample_std(a), sample_std(b)
    if sa is None or sb is None:
        return None
    na, nb = len(a), len(b)
    d = sum(a) / na - sum(b) / nb
    va, vb = sa ** 2 / na, sb ** 2 / nb
    se = math.sqrt(va + vb)
    if se == 0:  # no spread on either side: equal means do not differ, unequal ones certainly do
        return WelchResult(d, (d, d), 1.0 if d == 0 else 0.0, float(na + nb - 2))
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    half = _t_ppf(1 - ALPHA / 2, df) * se
    p = min(1.0, 2 * _t_sf(abs(d) / se, df))
    return WelchResult(d, (d - half, d + half), p, df)


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p-values (None stays None and is not counted in the family)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])  # type: ignore
    m = len(idx)
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # type: ignore[operator]
        out[i] = running
    return out
