"""Equal-time cells in reports, golden on a fabricated store: every calibrated cell shows the 95% CI of its derived
epochs, every matched cell its reference run; seeds budgeted by different methods are `mixed` (never silently
averaged, no verdict); busy-machine budgets and matched pairs under different machine loads are flagged; one
calibration shared by every seed is said to be outside the ± spread; Table 6 shows each ratio with its CI."""
from __future__ import annotations

import json

import pytest

from tests.results.test_report_golden import fabricate

BASE = {"model": {"name": "small_cnn", "width": 4}, "data": {"name": "synthetic_image", "batch_size": 8},
        "budget": {"mode": "reference", "reference_optimizer": "adafisher", "reference_epochs": 10}}


def calibrated(key: str, ci=(9.8, 10.2), ratio=(0.52, (0.51, 0.53)), blocks=12, busy=None) -> dict:
    return {"method": "calibration", "reference_optimizer": "adafisher", "reference_epochs": 10.0,
            "derived_epochs": 10.0, "derived_epochs_ci": list(ci), "ratio": ratio[0], "ratio_ci": list(ratio[1]),
            "blocks": {"reference": [0.1] * blocks, "candidate": [0.05] * blocks}, "calibration_key": key,
            "busy_warning": busy}


def matched(ref: str, load=None, ref_load=None, old_names: bool = False) -> dict:
    if old_names:  # runs written before the load fields existed name the reference `match_run`
        return {"method": "match", "match_run": ref, "reference_epochs": 10.0, "seconds": 30.0}
    return {"method": "match", "reference_run": ref, "reference_optimizer": "adafisher", "reference_epochs": 10.0,
            "seconds": 30.0, "load_avg": load, "reference_load_avg": ref_load}


def with_budget(rd, budget: dict) -> None:
    summary = json.loads(rd.summary_path.read_text())
    rd.write_summary({**summary, "budget": {"mode": "reference"}, "reference_budget": budget})


def cfg(optimizer: str, width: int = 4) -> dict:
    return {**BASE, "model": {**BASE["model"], "width": width}, "optimizer": {"name": optimizer, "lr": 0.001}}


@pytest.fixture()
def table(tmp_path):
    from fisherbench.results.report import CellInput, ReportSpec, StoreIndex, collect

    cells, store = [], tmp_path / "runs"
    # net A × Adam: three calibrated seeds sharing one calibration (one cached measurement)
    c = cfg("adam")
    for seed, acc in enumerate((0.970, 0.972, 0.974)):
        with_budget(fabricate(store, c, seed, "completed", [acc], epochs_done=10.0), calibrated("k1"))
    cells.append(CellInput("net A", "Adam", "main", c))
    # net A × SGD: matched seeds, one pair under load averages 0.8 apart (> 0.5), one run under a busy warning
    c = cfg("sgd")
    budgets = [matched("1a2b3c4d5e6f7a8b", 0.10, 0.12), matched("9f8e7d6c5b4a3f2e", [0.8, 1.0], 0.10),
               {**matched("0123456789abcdef", old_names=True), "busy_warning": "load 3.1 on 2 cores"}]
    for seed, (acc, b) in enumerate(zip((0.95, 0.96, 0.94), budgets)):
        with_budget(fabricate(store, c, seed, "completed", [acc], epochs_done=10.0), b)
    cells.append(CellInput("net A", "SGD", "main", c))
    # net B × Adam: two matched seeds and a calibrated one: mixed, no verdict
    c = cfg("adam", width=8)
    for seed, acc in enumerate((0.971, 0.972, 0.973)):
        b = matched(f"ref{seed}aaaaaaaaaaaa") if seed < 2 else calibrated("k2", ci=(9.8, 10.5))
        with_budget(fabricate(store, c, seed, "completed", [acc], epochs_done=10.0), b)
    cells.append(CellInput("net B", "Adam", "main", c))
    # net B × SGD: the reference arm itself (identity): unmarked
    c = cfg("sgd", width=8)
    for seed, acc in enumerate((0.95, 0.95, 0.95)):
        with_budget(fabricate(store, c, seed, "completed", [acc], epochs_done=10.0),
                    {"method": "identity", "derived_epochs": 10, "ratio": 1.0})
    cells.append(CellInput("net B", "SGD", "main", c))
    from fisherbench.results.report import PaperValue

    spec = ReportSpec("eq", "Equal time", [0, 1, 2], ["best_acc1"], cells, wct=True,
                      paper={("best_acc1", "net B", "Adam"): PaperValue(97.1, 0.1, "97.10±0.10")})
    (t,) = collect(spec, StoreIndex(store))
    return t


def test_equal_time_cells_show_method_and_certainty(table):
    from fisherbench.results import tables as render

    t = table
    assert render.ours_text(t.cell("net A", "Adam")) == "97.20 ± 0.20 ᶜ[9.8–10.2 ep]"
    assert render.ours_text(t.cell("net A", "SGD")) == "95.00 ± 1.00 ᵐ[ref 1a2b3c4d +2] ⚠busy 1/3 ⚠load 1/3"
    assert render.ours_text(t.cell("net B", "SGD")) == "95.00 ± 0.00"  # the reference arm: a fixed budget
    mixed = t.cell("net B", "Adam")
    assert mixed.budget_methods == {"match": 2, "calibration": 1}
    assert render.ours_text(mixed).endswith("mixed (m 2, c 1)")
    assert mixed.verdict == "mixed budgets: no verdict"  # matched and calibrated seeds are not one experiment


def test_recorded_load_verdict_wins_and_mixed_cells_are_never_best(table):
    from fisherbench.results import tables as render
    from fisherbench.results.runs import run_budget

    sgd = table.cell("net A", "SGD")
    budgets = [run_budget(s.run) for s in sgd.seeds]
    assert [b.reference_run for b in budgets] == ["1a2b3c4d5e6f7a8b", "9f8e7d6c5b4a3f2e", "0123456789abcdef"]
    assert budgets[1].load == 0.9 and budgets[1].reference_load == 0.1  # [start, end] averaged
    rd = sgd.seeds[0].run
    summary = json.loads(rd.run_dir.summary_path.read_text())
    summary["reference_budget"]["loads_differ"] = True  # the run's own verdict, by its own threshold
    rd.run_dir.write_summary(summary)
    rd.summary = summary
    assert "⚠load 2/3" in render.ours_text(sgd)
    assert ("net B", "Adam") not in table.best_cells()
    assert table.selection()[1].get(("net B", "Adam")) is None


def test_budgets_section_golden(table):
    from fisherbench.results import tables as render

    md = render.markdown([table])
    expected = """\
## Equal-time budgets

| row | column | budget | epochs [95% CI] | step-time ratio [95% CI] | blocks | calibrations | busy machine | \
reference runs | load differs |
|---|---|---|---|---|---|---|---|---|---|
| net A | Adam | calibrated 3 | 10.0 [9.8–10.2] | 0.520 [0.510–0.530] | 12 | one, shared by all 3 seeds |  |  |  |
| net A | SGD | matched 3 |  |  |  |  | 1/3 | 1a2b3c4d, 9f8e7d6c, 01234567 | 1/3 |
| net B | Adam | calibrated 1, matched 2 | 10.0 [9.8–10.5] | 0.520 [0.510–0.530] | 12 | 1 |  | ref0aaaa, ref1aaaa \
|  |
"""
    assert expected in md
    assert ("One calibration is shared by all seeds of net A × Adam: its error is common to them (every seed "
            "trained the same number of steps) and is **not** in the ± spread over seeds.") in md
    assert "1-minute load averages differ by more than 0.5" in md


def test_table6_and_epochs_show_ratio_with_ci(table):
    from fisherbench.results import tables as render

    epochs = render.epochs_markdown(table).splitlines()
    assert epochs[2] == "| net A | 10ᶜ ×0.52 [0.51–0.53] | 10ᵐ |"
    t6 = render.table6_markdown([table])
    assert "| eq · net A | ᶜ×0.52 [0.51–0.53] | ᵐ |" in t6
    assert "| eq · net B | ᶜᵐ×0.52 [0.51–0.53] |  |" in t6


def test_csv_carries_the_budget_columns(table):
    import csv
    import io

    from fisherbench.results import tables as render

    rows = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(render.csv_text([table])))}
    a = rows[("net A", "Adam")]
    assert (a["budget_method"], a["derived_epochs_lo"], a["derived_epochs_hi"], a["ratio_lo"], a["ratio_hi"],
            a["calibration_shared"]) == ("calibration:3", "9.8000", "10.2000", "0.5100", "0.5300", "1")
    s = rows[("net A", "SGD")]
    assert (s["busy_runs"], s["load_flagged"]) == ("1", "1")
    assert s["reference_runs"].split() == ["1a2b3c4d5e6f7a8b", "9f8e7d6c5b4a3f2e", "0123456789abcdef"]
    assert rows[("net B", "Adam")]["verdict"] == "mixed budgets: no verdict"
