"""Golden cases for honest verdicts: a verdict only when every seed finished; partial divergence, partial failure,
one seed, the Welch t-test against an independent computation, and the best cell of a grid marked."""
from __future__ import annotations

import math

import pytest

from tests.results.test_report_golden import fabricate

BASE = {"model": {"name": "small_cnn", "width": 4}, "data": {"name": "synthetic_image", "batch_size": 8},
        "optimizer": {"name": "adam", "lr": 0.001}, "budget": {"mode": "epochs", "epochs": 2}}


def config(**changes) -> dict:
    import copy

    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        cfg[group][key] = value
    return cfg


def one_cell_spec(cfg, seeds, paper="90.00±1.00", metrics=("best_acc1",)):
    from fisherbench.results.report import CellInput, PaperValue, ReportSpec

    mean, _, std = paper.partition("±") if paper else (None, "", "")
    pv = {("best_acc1", "net", "Adam"): PaperValue(float(mean), float(std) if std else None, paper)} if paper else {}
    return ReportSpec("t", "T", list(seeds), list(metrics), [CellInput("net", "Adam", "main", cfg)], paper=pv)


def collect_one(spec, store):
    from fisherbench.results.report import StoreIndex, collect

    return collect(spec, StoreIndex(store))


def test_one_of_five_finished_four_diverged_gets_no_verdict(tmp_path):
    """The bug this fixes: 1 of 5 seeds finished (on the paper's value), 4 diverged -> was `reproduced`."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import reproduction_summary

    cfg = config()
    fabricate(tmp_path, cfg, 0, "completed", [0.90])
    for seed in range(1, 5):
        fabricate(tmp_path, cfg, seed, "diverged", [0.2])
    (t,) = collect_one(one_cell_spec(cfg, range(5)), tmp_path)
    c = t.cell("net", "Adam")
    assert (c.n, c.diverged, c.complete) == (1, 4, False)
    assert c.verdict == "diverged 4/5" and c.p_value is None
    assert render.ours_text(c) == "90.00 (n=1; 1/5 seeds, 4 diverged)"
    verdicts = reproduction_summary([t])
    assert verdicts["reproduced"] == [] and verdicts["not reproduced"] == []
    assert verdicts["diverged"] == ["t/best_acc1: net × Adam (diverged 4/5)"]
    assert render.long_markdown(t).splitlines()[2] == (
        "| net | Adam | 90.00 (n=1; 1/5 seeds, 4 diverged) | 90.00 ± 1.00 | +0.00 |  | 1/5 | 4 diverged | "
        "diverged 4/5 |")


def test_partial_failure_is_incomplete_even_when_close(tmp_path):
    from fisherbench.results import tables as render
    from fisherbench.results.report import reproduction_summary

    cfg = config()
    for seed, acc in enumerate((0.89, 0.90, 0.91, 0.90)):
        fabricate(tmp_path, cfg, seed, "completed", [acc])
    fabricate(tmp_path, cfg, 4, "failed", [])
    (t,) = collect_one(one_cell_spec(cfg, range(5)), tmp_path)
    c = t.cell("net", "Adam")
    assert c.verdict == "incomplete 4/5" and c.verdict_kind == "incomplete" and c.p_value is None
    assert render.ours_text(c) == "90.00 ± 0.71 (4/5 seeds)"
    assert render.note_text(c) == "1 unfinished/failed"
    assert reproduction_summary([t])["incomplete"] == ["t/best_acc1: net × Adam (incomplete 4/5)"]
    # the same seeds with the fifth finished: now a verdict
    fabricate(tmp_path, cfg, 4, "completed", [0.90], tweak=lambda c: c["data"].update(num_workers=2))
    (t,) = collect_one(one_cell_spec(cfg, range(5)), tmp_path)
    c = t.cell("net", "Adam")
    assert c.verdict == "reproduced" and c.p_value is not None and c.duplicates == 1


def test_a_finished_run_without_the_metric_is_not_a_finished_seed(tmp_path):
    """best_val_acc1 of runs that logged no validation split: no value, so no verdict (and the note says why)."""
    from fisherbench.results import tables as render

    cfg = config()
    fabricate(tmp_path, cfg, 0, "completed", [0.9])
    (t,) = collect_one(one_cell_spec(cfg, [0], paper=None, metrics=("best_val_acc1",)), tmp_path)
    c = t.cell("net", "Adam")
    assert c.verdict == "incomplete 0/1" and render.note_text(c) == "1 without val/acc1"


def test_one_seed_shows_n1_never_zero_std(tmp_path):
    from fisherbench.results import tables as render

    cfg = config()
    fabricate(tmp_path, cfg, 0, "completed", [0.972])
    (t,) = collect_one(one_cell_spec(cfg, [0], paper="97.00±0.50"), tmp_path)
    c = t.cell("net", "Adam")
    assert render.ours_text(c) == "97.20 (n=1)"
    assert "± 0.00" not in render.markdown([t]) and "± 0.00" not in render.console_table(t)
    # complete with one seed: a verdict by the paper's spread; no t-test (one seed has no spread)
    assert c.verdict == "reproduced" and c.sigma == pytest.approx(0.5) and c.p_value is None
    assert r"$97.20$ ($n{=}1$) (97.00 $\pm$ 0.50)" in render.latex([t])


def _welch_brute(ours: list[float], paper_mean: float, paper_std: float, paper_n: int) -> float:
    """Welch's two-sided p from the definitions: population stds -> sample variances, Welch–Satterthwaite df."""
    from scipy.stats import t as student_t

    n1 = len(ours)
    m1 = sum(ours) / n1
    v1 = sum((x - m1) ** 2 for x in ours) / (n1 - 1)
    v2 = paper_std ** 2 * paper_n / (paper_n - 1)
    a, b = v1 / n1, v2 / paper_n
    t = (m1 - paper_mean) / math.sqrt(a + b)
    df = (a + b) ** 2 / (a ** 2 / (n1 - 1) + b ** 2 / (paper_n - 1))
    return 2 * student_t.sf(abs(t), df)


@pytest.mark.parametrize("accs,paper", [((0.91, 0.90, 0.92), "90.00±1.00"), ((0.80, 0.81, 0.79), "85.00±2.00"),
                                        ((0.931, 0.925, 0.940, 0.929, 0.935), "93.50±0.10")])
def test_welch_p_value_against_the_definition(tmp_path, accs, paper):
    from fisherbench.results import tables as render

    cfg = config()
    for seed, acc in enumerate(accs):
        fabricate(tmp_path, cfg, seed, "completed", [acc])
    (t,) = collect_one(one_cell_spec(cfg, range(len(accs)), paper=paper), tmp_path)
    c = t.cell("net", "Adam")
    mean, std = (float(x) for x in paper.split("±"))
    expected = _welch_brute([100 * a for a in accs], mean, std, 5)
    assert c.p_value == pytest.approx(expected, rel=1e-9)
    assert render.p_text(c) == (f"{expected:.2g}" if expected >= 1e-3 else "<0.001")


def test_no_p_value_without_a_paper_std_or_spread(tmp_path):
    cfg = config()
    for seed in range(3):
        fabricate(tmp_path, cfg, seed, "completed", [0.9])
    (t,) = collect_one(one_cell_spec(cfg, range(3), paper="90.00"), tmp_path)
    assert t.cell("net", "Adam").p_value is None  # the paper gives no std
    (t,) = collect_one(one_cell_spec(cfg, range(3), paper="90.00±0.00"), tmp_path)
    assert t.cell("net", "Adam").p_value is None  # no spread on either side: undefined


def test_grid_marks_the_best_row_of_each_column(tmp_path):
    """Rows that differ only in optimizer.lr make a grid: the best lr per column is bold; an incomplete cell is
    never marked best (it could look best by losing its bad seeds)."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, StoreIndex, collect, grid_key

    accs = {"Adam": {0.1: 0.5, 0.01: 0.9, 0.001: 0.7}, "SGD": {0.1: 0.95, 0.01: 0.65, 0.001: 0.7}}
    cells = []
    for col, by_lr in accs.items():
        for lr, a in by_lr.items():
            cfg = config(optimizer__name=col.lower(), optimizer__lr=lr)
            cells.append(CellInput(f"lr {lr}", col, "main", cfg))
            fabricate(tmp_path, cfg, 0, "completed", [a])
            # SGD at lr 0.1 is the highest value, but one of its two seeds failed
            fabricate(tmp_path, cfg, 1, "completed" if (lr, col) != (0.1, "SGD") else "failed", [a])
    assert grid_key(cells) == "optimizer.lr"
    spec = ReportSpec("g", "Grid", [0, 1], ["best_acc1"], cells, best="column", best_label="the best lr per column")
    (t,) = collect(spec, StoreIndex(tmp_path))
    assert t.best_cells() == {("lr 0.01", "Adam"), ("lr 0.001", "SGD")}
    wide = render.wide_markdown(t).splitlines()
    assert wide[3] == "| lr 0.01 | **90.00 ± 0.00** | 65.00 ± 0.00 |"
    assert wide[2] == "| lr 0.1 | 50.00 ± 0.00 | 95.00 (n=1; 1/2 seeds) |"
    assert wide[4] == "| lr 0.001 | 70.00 ± 0.00 | **70.00 ± 0.00** |"
    assert ("Bold: the best lr per column, chosen by best_acc1 (on the test set: the runs have no validation "
            "split), among cells whose seeds all finished.") in render.markdown([t])
    best_flags = [line.split(",")[18] for line in render.csv_text([t]).splitlines()[1:]]
    assert best_flags == ["0", "1", "0", "0", "0", "1"]
    # a table whose rows differ in more than one key is not a grid
    assert grid_key([*cells, CellInput("other", "Adam", "main", config(model__width=8, optimizer__lr=0.5))]) is None


def test_best_cell_is_chosen_on_validation_when_the_runs_have_it(tmp_path):
    """A grid reported by best test accuracy (the paper's metric) marks the row that validation picks, not the
    row with the best test value: choosing by the test metric would tune on the test set."""
    from fisherbench.core.store import RunDir, run_id
    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, StoreIndex, collect

    cells = []
    for lr, val, test in ((0.1, 0.90, 0.80), (0.01, 0.80, 0.85)):
        cfg = config(optimizer__lr=lr)
        cells.append(CellInput(f"lr {lr}", "Adam", "main", cfg))
        cfg = {**cfg, "seed": 0}
        rd = RunDir(tmp_path / run_id(cfg))
        rd.create(cfg, {})
        rd.append_metrics({"eval": 0, "train_s": 1.0, "val/acc1": val, "test/acc1": test})
        rd.write_summary({"run_id": rd.run_id, "status": "completed"})
    spec = ReportSpec("g", "Grid", [0], ["best_acc1"], cells, best="column", best_label="the best lr per column")
    (t,) = collect(spec, StoreIndex(tmp_path))
    assert t.cell("lr 0.01", "Adam").mean == pytest.approx(85.0)  # the best test value ...
    assert t.best_cells() == {("lr 0.1", "Adam")}  # ... but validation chose lr 0.1
    assert "Bold: the best lr per column, chosen by best_val_acc1 (validation)" in render.markdown([t])
    # an explicit selection metric wins
    spec.select = "best_acc1"
    (t,) = collect(spec, StoreIndex(tmp_path))
    assert t.best_cells() == {("lr 0.01", "Adam")}


def test_comparison_with_a_baseline_cell_names_the_first_row_that_differs(tmp_path):
    """The damping study's sentence: from which row on a column differs from the baseline beyond 2σ."""
    from scipy.stats import ttest_ind

    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, compare_with_baseline

    accs = {("lo", "A"): [0.90, 0.91, 0.92], ("hi", "A"): [0.80, 0.81, 0.82], ("lo", "B"): [0.905, 0.915, 0.91],
            ("hi", "B"): [0.90, 0.92, 0.91], ("base", "C"): [0.90, 0.91, 0.92]}
    cells = []
    for i, ((row, col), values) in enumerate(accs.items()):
        cfg = config(optimizer__lr=0.001 * (i + 1))
        for seed, acc in enumerate(values):
            fabricate(tmp_path, cfg, seed, "completed", [acc])
        cells.append(CellInput(row, col, "main", cfg))
    spec = ReportSpec("b", "B", [0, 1, 2], ["best_acc1"], cells, best="none", baseline=("base", "C"))
    (t,) = collect_one(spec, tmp_path)
    base, comparisons = compare_with_baseline(t)
    assert base.row == "base" and [(c.cell.row, c.cell.column, c.differs) for c in comparisons] == [
        ("lo", "A", False), ("hi", "A", True), ("lo", "B", False), ("hi", "B", False)]
    hi_a = comparisons[1]
    assert hi_a.delta == pytest.approx(-10.0)
    assert hi_a.p_value == pytest.approx(ttest_ind([80, 81, 82], [90, 91, 92], equal_var=False).pvalue)
    text = render.baseline_markdown(t)
    assert "**A** differs from base × C beyond 2σ from row **hi** on (Δ -10.00; 1 of 2 rows differ)." in text
    assert "**B** does not differ from base × C beyond 2σ at any row." in text
    assert "## Against the baseline" in render.markdown([t])
