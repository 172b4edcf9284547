"""How a run is scored: a metric turns a run's summary and metric rows into one number.

Sweeps (a search's objective) and reports (table cells) score runs the same way, from here. The paper's
protocol is the best test top-1 over evaluations, and for language models the test perplexity at the best
validation perplexity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fisherbench.errors import UserError


def as_number(v: Any) -> Optional[float]:
    """A finite number as a float; None for anything else (missing, NaN, inf, strings, booleans)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool
    score: Callable[[dict[str, Any], list[dict[str, Any]]], Optional[float]]  # (summary, metric rows) -> value
    digits: int = 2


def _best_over_rows(key: str, scale: float) -> Callable[[dict[str, Any], list[dict[str, Any]]], Optional[float]]:
    def score(summary: dict[str, Any], rows: list[dict[str, Any]]) -> Optional[float]:
        values = [v for v in (as_number(r.get(key)) for r in rows) if v is not None]
        if not values:  # no metric rows: fall back to the summary's selected row
            v = as_number((summary.get("best") or {}).get(key))
            return None if v is None else v * scale
        return max(values) * scale

    return score


def _test_ppl_at_best_val(summary: dict[str, Any], rows: list[dict[str, Any]]) -> Optional[float]:
    scored = [(v, r) for r in rows if (v := as_number(r.get("val/ppl"))) is not None]
    if scored:
        return as_number(min(scored, key=lambda vr: vr[0])[1].get("test/ppl"))
    return as_number((summary.get("best") or {}).get("test/ppl"))


METRICS: dict[str, Metric] = {
    "best_acc1": Metric("best_acc1", "best test top-1 (%)", True, _best_over_rows("test/acc1", 100.0)),
    "best_acc5": Metric("best_acc5", "best test top-5 (%)", True, _best_over_rows("test/acc5", 100.0)),
    "test_ppl": Metric("test_ppl", "test perplexity at the best validation perplexity", False,
                       _test_ppl_at_best_val),
}


# ---- validation metrics (selection: sweeps and searches pick values on these, never on a test metric) --------
# Classification sets have a `val` split when `data.val_fraction > 0`; language-model sets always have one.
def _min_over_rows(key: str) -> Callable[[dict[str, Any], list[dict[str, Any]]], Optional[float]]:
    def score(summary: dict[str, Any], rows: list[dict[str, Any]]) -> Optional[float]:
        values = [v for v in (as_number(r.get(key)) for r in rows) if v is not None]
        return min(values) if values else as_number((summary.get("best") or {}).get(key))

    return score


METRICS["best_val_acc1"] = Metric("best_val_acc1", "best validation top-1 (%)", True,
                                  _best_over_rows("val/acc1", 100.0))
METRICS["best_val_ppl"] = Metric("best_val_ppl", "best validation perplexity", False, _min_over_rows("val/ppl"))
# the validation metric that selects for each test metric
VALIDATION_COUNTERPART = {"best_acc1": "best_val_acc1", "best_acc5": "best_val_acc1", "test_ppl": "best_val_ppl"}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise UserError(f"unknown metric {name!r}; known: {', '.join(METRICS)}") from None
