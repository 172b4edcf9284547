"""Run scores (fisherbench.core.scores) against brute force: validation-based selection, final values, generic forms,
targets and time-to-target; mistakes in names are UserErrors that say what is accepted."""
from __future__ import annotations

import pytest

from fisherbench.core.errors import UserError
from fisherbench.core.scores import METRICS, get_metric, parse_target, time_to_target

ROWS = [
    {"eval": 0, "train_s": 1.0, "val/acc1": 0.50, "test/acc1": 0.52, "val/loss": 1.5, "val/ppl": 40.0, "test/ppl": 41.0},
    {"eval": 1, "train_s": 2.5, "val/acc1": 0.80, "test/acc1": 0.75, "val/loss": 0.9, "val/ppl": 30.0, "test/ppl": 29.0},
    {"eval": 2, "train_s": 4.0, "val/acc1": "nan", "test/acc1": 0.85, "val/loss": 0.7, "val/ppl": 35.0, "test/ppl": 28.0},
    {"eval": 3, "train_s": 5.5, "val/acc1": 0.78, "test/acc1": 0.90, "val/loss": 0.8, "val/ppl": 31.0, "test/ppl": 27.0},
]


def _brute_at_best(rows, key, select, higher):
    best = None
    for r in rows:
        v = r.get(select)
        if not isinstance(v, float) or v != v:
            continue
        if best is None or (v > best[0] if higher else v < best[0]):
            best = (v, r[key])
    return best[1]


def test_named_metrics_against_brute_force():
    assert METRICS["best_acc1"].score({}, ROWS) == pytest.approx(90.0)  # max over test evaluations
    assert METRICS["test_acc1_at_best_val"].score({}, ROWS) == pytest.approx(
        100 * _brute_at_best(ROWS, "test/acc1", "val/acc1", True))  # eval 1: 75.0, not the best test value
    assert METRICS["test_acc1_at_best_val"].score({}, ROWS) == pytest.approx(75.0)
    assert METRICS["best_val_acc1"].score({}, ROWS) == pytest.approx(80.0)
    assert METRICS["final_test_acc1"].score({}, ROWS) == pytest.approx(90.0)
    assert METRICS["test_ppl"].score({}, ROWS) == pytest.approx(_brute_at_best(ROWS, "test/ppl", "val/ppl", False))
    assert METRICS["final_test_ppl"].score({}, ROWS) == pytest.approx(27.0)
    assert METRICS["best_acc1"].selects_on_test and not METRICS["test_acc1_at_best_val"].selects_on_test


def test_generic_forms():
    m = get_metric("test/acc1@best:val/loss")  # lowest validation loss: eval 2
    assert m.higher_is_better and m.score({}, ROWS) == pytest.approx(85.0) and m.key == "test/acc1"
    m = get_metric("best:val/loss")
    assert not m.higher_is_better and m.score({}, ROWS) == pytest.approx(0.7) and m.label == "lowest val/loss"
    assert get_metric("final:val/ppl").score({}, ROWS) == pytest.approx(31.0)
    assert get_metric("best:test/acc1").selects_on_test


def test_summary_fallbacks_when_there_are_no_rows():
    summary = {"select_metric": "val/acc1", "best": {"val/acc1": 0.8, "test/acc1": 0.7}, "final": {"test/acc1": 0.9}}
    assert METRICS["test_acc1_at_best_val"].score(summary, []) == pytest.approx(70.0)
    assert METRICS["final_test_acc1"].score(summary, []) == pytest.approx(90.0)
    # the summary's best row was selected on another metric: no test-at-best-validation from it
    assert METRICS["test_acc1_at_best_val"].score({**summary, "select_metric": "test/acc1"}, []) is None


@pytest.mark.parametrize("name,message", [("best_acc7", "unknown metric 'best_acc7'"),
                                          ("best:train/thing", "cannot tell whether higher or lower"),
                                          ("test/acc1@best", "unknown metric")])
def test_bad_metric_names_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        get_metric(name)


def test_targets_and_time_to_target():
    t = parse_target("val/acc1>=0.8")
    assert (t.key, t.op, t.threshold, t.text) == ("val/acc1", ">=", 0.8, "val/acc1>=0.8")
    assert time_to_target(ROWS, t) == 2.5
    assert time_to_target(ROWS, parse_target("val/acc1 > 0.8")) is None  # 'nan' is never a value
    assert time_to_target(ROWS, parse_target("val/ppl<=30")) == 2.5
    assert time_to_target(ROWS, parse_target("test/ppl<28")) == 5.5
    assert time_to_target(ROWS, parse_target("test/acc1>=0.85"), clock="eval") == 2
    for bad, message in (("val/acc1=0.9", "is not KEY>=VALUE"), ("val/acc1>=90", "write val/acc1>=0.9"),
                         (">=0.9", "is not KEY>=VALUE")):
        with pytest.raises(UserError, match=message):
            parse_target(bad)
