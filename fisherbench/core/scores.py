"""How a run is scored: a metric turns a run's summary and metric rows into one number.

Sweeps (a search's objective) and reports (table cells) score runs the same way, from here.

Named metrics (`METRICS`):
- the paper's protocol: `best_acc1` / `best_acc5`, the best **test** accuracy over evaluations (this selects
  on the test set; it is what the paper's tables report, so reproductions use it), and `test_ppl`, the test
  perplexity at the best validation perplexity;
- validation-based selection: `test_acc1_at_best_val` (test top-1 at the evaluation with the best validation
  top-1), `best_val_acc1`, `best_val_ppl` (`VALIDATION_COUNTERPART` names the one that selects for each test
  metric);
- `final_test_acc1`, `final_test_ppl`: the last evaluation.

Any logged key can also be scored with a generic form: `best:KEY` (best over evaluations), `final:KEY` (the
last evaluation), `KEY@best:SEL` (KEY at the evaluation where SEL is best), e.g. `test/acc1@best:val/loss`.
Which way is better is read from the key's last part: `acc*` higher; `loss*`, `ppl*`, `err*` lower.
Accuracies (stored as fractions) are reported in percent.

A target (`val/acc1>=0.9`, `val/ppl<=50`) and `time_to_target` give the budget-clock time (`train_s` of the
metric row) of the first evaluation that reached it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from fisherbench.core.errors import UserError

Rows = Sequence[dict[str, Any]]


def as_number(v: Any) -> Optional[float]:
    """A finite number as a float; None for anything else (missing, NaN, inf, strings, booleans)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# ---------------------------------------------------------------------------------------- paper values
@dataclass(frozen=True)
class PaperValue:
    """A value as the paper prints it: mean, optional std; `mean is None` = the paper reports no result."""

    mean: Optional[float]
    std: Optional[float] = None
    text: str = ""

    @property
    def no_result(self) -> bool:
        return self.mean is None


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool
    score: Callable[[dict[str, Any], Rows], Optional[float]]  # (summary, metric rows) -> value
    digits: int = 2
    key: Optional[str] = None  # the metric-row key the value comes from (figures plot it against time)
    selects_on_test: bool = False  # the value is a maximum over test evaluations (the paper's protocol)


# ---------------------------------------------------------------------------------------- metric keys
def higher_is_better(key: str) -> bool:
    """Which way is better for a logged key, from its last part (`val/acc1` -> acc1)."""
    leaf = key.rsplit("/", 1)[-1].lower()
    if leaf.startswith("acc"):
        return True
    if leaf.startswith(("loss", "ppl", "err")):
        return False
    raise UserError(f"cannot tell whether higher or lower {key!r} is better (known: acc*, loss*, ppl*, err*); "
                    "score it with a named metric instead")


def selection_direction(metric: str, mode: Optional[str]) -> bool:
    """Whether a larger `metric` is better when it selects a run's best evaluation: `mode` ("max" / "min")
    when given, else `higher_is_better` of the key (the one rule for a key's direction)."""
    if mode is not None:
        return mode == "max"
    try:
        return higher_is_better(metric)
    except UserError:
        raise UserError(f"selection.metric={metric}: cannot tell whether higher or lower is better; set "
                        "selection.mode=max or selection.mode=min") from None


def is_fraction(key: str) -> bool:
    """Accuracies are stored as fractions in [0, 1] and reported in percent."""
    return key.rsplit("/", 1)[-1].lower().startswith("acc")


def _scale(key: str) -> float:
    return 100.0 if is_fraction(key) else 1.0


def _values(rows: Rows, key: str) -> list[tuple[float, dict[str, Any]]]:
    return [(v, r) for r in rows if (v := as_number(r.get(key))) is not None]


def _best(key: str) -> Callable[[dict[str, Any], Rows], Optional[float]]:
    up, scale = higher_is_better(key), _scale(key)

    def score(summary: dict[str, Any], rows: Rows) -> Optional[float]:
        values = [v for v, _ in _values(rows, key)]
        if not values:  # no metric rows: fall back to the summary's selected row
            v = as_number((summary.get("best") or {}).get(key))
            return None if v is None else v * scale
        return (max(values) if up else min(values)) * scale

    return score


def _final(key: str) -> Callable[[dict[str, Any], Rows], Optional[float]]:
    scale = _scale(key)

    def score(summary: dict[str, Any], rows: Rows) -> Optional[float]:
        if rows:
            v = as_number(rows[-1].get(key))
        else:
            v = as_number((summary.get("final") or {}).get(key))
        return None if v is None else v * scale

    return score


def _at_best(key: str, select: str) -> Callable[[dict[str, Any], Rows], Optional[float]]:
    up, scale = higher_is_better(select), _scale(key)

    def score(summary: dict[str, Any], rows: Rows) -> Optional[float]:
        scored = _values(rows, select)
        if scored:
            # the first evaluation with the best selection value (ties: the earlier one, as the trainer keeps)
            best = max(scored, key=lambda vr: vr[0]) if up else min(scored, key=lambda vr: vr[0])
            v = as_number(best[1].get(key))
        else:
            best_row = summary.get("best") or {}
            v = as_number(best_row.get(key)) if summary.get("select_metric") == select else None
        return None if v is None else v * scale

    return score


def _percent(key: str) -> str:
    return " (%)" if is_fraction(key) else ""


METRICS: dict[str, Metric] = {
    "best_acc1": Metric("best_acc1", "best test top-1 (%)", True, _best("test/acc1"), key="test/acc1",
                        selects_on_test=True),
    "best_acc5": Metric("best_acc5", "best test top-5 (%)", True, _best("test/acc5"), key="test/acc5",
                        selects_on_test=True),
    "test_ppl": Metric("test_ppl", "test perplexity at the best validation perplexity", False,
                       _at_best("test/ppl", "val/ppl"), key="test/ppl"),
    "test_acc1_at_best_val": Metric("test_acc1_at_best_val", "test top-1 at the best validation top-1 (%)", True,
                                    _at_best("test/acc1", "val/acc1"), key="test/acc1"),
    "best_val_acc1": Metric("best_val_acc1", "best validation top-1 (%)", True, _best("val/acc1"), key="val/acc1"),
    "best_val_ppl": Metric("best_val_ppl", "best validation perplexity", False, _best("val/ppl"), key="val/ppl"),
    "final_test_acc1": Metric("final_test_acc1", "final test top-1 (%)", True, _final("test/acc1"), key="test/acc1"),
    "final_test_ppl": Metric("final_test_ppl", "final test perplexity", False, _final("test/ppl"), key="test/ppl"),
}
# The validation metric that selects for each test metric (a grid's best row, a search's objective): choosing
# by the test metric itself would tune on the test set.
VALIDATION_COUNTERPART = {"best_acc1": "best_val_acc1", "best_acc5": "best_val_acc1", "test_ppl": "best_val_ppl",
                          "test_acc1_at_best_val": "best_val_acc1", "final_test_acc1": "best_val_acc1",
                          "final_test_ppl": "best_val_ppl"}
_KEY = r"[A-Za-z_][\w.]*(?:/[\w.]+)*"


def get_metric(name: str) -> Metric:
    """A named metric, or a generic form `best:KEY`, `final:KEY`, `KEY@best:SEL` (see the module docstring)."""
    name = str(name).strip()
    if name in METRICS:
        return METRICS[name]
    if m := re.fullmatch(rf"(best|final):({_KEY})", name):
        kind, key = m.groups()
        if kind == "best":
            up = higher_is_better(key)
            return Metric(name, f"{'best' if up else 'lowest'} {key}{_percent(key)}", up, _best(key), key=key,
                          selects_on_test=key.startswith("test/"))
        return Metric(name, f"final {key}{_percent(key)}", higher_is_better(key), _final(key), key=key)
    if m := re.fullmatch(rf"({_KEY})@best:({_KEY})", name):
        key, select = m.groups()
        return Metric(name, f"{key} at the best {select}{_percent(key)}", higher_is_better(key),
                      _at_best(key, select), key=key, selects_on_test=select.startswith("test/"))
    raise UserError(f"unknown metric {name!r}; known: {', '.join(METRICS)}, or best:KEY, final:KEY, "
                    "KEY@best:SELECT_KEY with a logged key such as val/acc1 or test/loss")


# ------------------------------------------------------------------------------------------- targets
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t,
}


@dataclass(frozen=True)
class Target:
    """A quality target on a logged key: `val/acc1>=0.9` is reached by the first evaluation with val/acc1 ≥ 0.9."""

    key: str
    op: str
    threshold: float

    def reached(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    @property
    def text(self) -> str:
        return f"{self.key}{self.op}{self.threshold:g}"

    def __str__(self) -> str:
        return self.text


def parse_target(text: str) -> Target:
    """`val/acc1>=0.9` -> Target; UserError with the expected form otherwise."""
    m = re.fullmatch(rf"\s*({_KEY})\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", str(text))
    if not m:
        raise UserError(f"target {text!r} is not KEY>=VALUE or KEY<=VALUE (e.g. 'val/acc1>=0.9', 'val/ppl<=50'); "
                        "quote it in the shell")
    key, op, value = m.group(1), m.group(2), float(m.group(3))
    if is_fraction(key) and value > 1:
        raise UserError(f"target {text!r}: accuracies are stored as fractions, write {key}{op}{value / 100:g}")
    return Target(key, op, value)


def time_to_target(rows: Rows, target: Target, clock: str = "train_s") -> Optional[float]:
    """The `clock` value (default: the budget clock, training seconds) of the first evaluation that reached the
    target; None when no evaluation did. Its resolution is the evaluation interval: the target was reached at
    or before that time."""
    for r in rows:
        v = as_number(r.get(target.key))
        if v is not None and target.reached(v):
            return as_number(r.get(clock))
    return None
