"""Golden cases for honest verdicts: a verdict only when every seed finished; partial divergence, partial failure,
one seed (no test), the equivalence test and Welch/Holm against independent computations, bold only where a test
supports it."""
from __future__ import annotations

import math

import numpy as np
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
    assert c.verdict == "diverged 4/5"
    assert render.ours_text(c) == "90.00 (n=1; 1/5 seeds, 4 diverged)"
    verdicts = reproduction_summary([t])
    assert verdicts["reproduced"] == [] and verdicts["differs"] == []
    assert verdicts["diverged"] == ["t/best_acc1: net × Adam (diverged 4/5)"]
    assert render.long_markdown(t).splitlines()[2] == (
        "| net | Adam | 90.00 (n=1; 1/5 seeds, 4 diverged) | 90.00 ± 1.00 | ±1.00 | +0.00 | 1/5 | 4 diverged | "
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
    assert c.verdict == "incomplete 4/5" and c.verdict_kind == "incomplete"
    assert render.ours_text(c) == "90.00 ± 0.82 (4/5 seeds)"  # sample std (ddof=1)
    assert render.note_text(c) == "1 unfinished/failed"
    assert reproduction_summary([t])["incomplete"] == ["t/best_acc1: net × Adam (incomplete 4/5)"]
    # the same seeds with the fifth finished: now a verdict
    fabricate(tmp_path, cfg, 4, "completed", [0.90], tweak=lambda c: c["data"].update(num_workers=2))
    (t,) = collect_one(one_cell_spec(cfg, range(5)), tmp_path)
    c = t.cell("net", "Adam")
    assert c.verdict == "reproduced" and c.duplicates == 1


def test_a_finished_run_without_the_metric_is_not_a_finished_seed(tmp_path):
    """best_val_acc1 of runs that logged no validation split: no value, so no verdict (and the note says why)."""
    from fisherbench.results import tables as render

    cfg = config()
    fabricate(tmp_path, cfg, 0, "completed", [0.9])
    (t,) = collect_one(one_cell_spec(cfg, [0], paper=None, metrics=("best_val_acc1",)), tmp_path)
    c = t.cell("net", "Adam")
    assert c.verdict == "incomplete 0/1" and render.note_text(c) == "1 without val/acc1"


def test_one_seed_shows_n1_never_zero_std_and_gets_no_test(tmp_path):
    from fisherbench.results import tables as render

    cfg = config()
    fabricate(tmp_path, cfg, 0, "completed", [0.972])
    (t,) = collect_one(one_cell_spec(cfg, [0], paper="97.00±0.50"), tmp_path)
    c = t.cell("net", "Adam")
    assert render.ours_text(c) == "97.20 (n=1)" and c.std is None
    assert "± 0.00" not in render.markdown([t]) and "± 0.00" not in render.console_table(t)
    # complete with one seed: no interval, so no verdict (before: "reproduced" by the paper's spread alone)
    assert c.verdict == "no test (n=1)" and c.verdict_kind == "untested"
    assert render.delta_text(c) == "+0.20"
    assert r"$97.20$ ($n{=}1$) (97.00 $\pm$ 0.50)" in render.latex([t])


def _tost_brute(ours: list[float], paper: float, margin: float) -> str:
    """TOST from the definitions: two one-sided t-tests at 5% (= the 90% CI inside ±δ); `differs` when the 95% CI
    lies beyond ±δ."""
    from scipy.stats import t as student_t

    n = len(ours)
    m = sum(ours) / n
    se = math.sqrt(sum((x - m) ** 2 for x in ours) / (n - 1) / n)
    d = m - paper
    p_lower = student_t.sf((d + margin) / se, n - 1)  # H0: d <= -δ
    p_upper = student_t.cdf((d - margin) / se, n - 1)  # H0: d >= +δ
    if max(p_lower, p_upper) < 0.05:
        return "reproduced"
    q = student_t.ppf(0.975, n - 1) * se
    return "differs" if d - q > margin or d + q < -margin else f"inconclusive (n={n})"


@pytest.mark.parametrize("accs,paper,expected", [
    ((0.971, 0.972, 0.973, 0.970, 0.972), "97.20±0.10", "reproduced"),  # tight and on the value
    ((0.960, 0.962, 0.961), "97.20±0.10", "differs"),  # 1.1 points below, tight: beyond δ = 0.5
    ((0.95, 0.99, 0.97), "97.00±0.10", "inconclusive (n=3)"),  # on the value, but the seeds spread 2 points
    ((0.931, 0.925, 0.940, 0.929, 0.935), "93.50±1.00", "reproduced"),  # the paper's std 1.0 > 0.5 is δ
])
def test_equivalence_verdict_against_the_definition(tmp_path, accs, paper, expected):
    from fisherbench.results import tables as render

    cfg = config()
    for seed, acc in enumerate(accs):
        fabricate(tmp_path, cfg, seed, "completed", [acc])
    (t,) = collect_one(one_cell_spec(cfg, range(len(accs)), paper=paper), tmp_path)
    c = t.cell("net", "Adam")
    mean, std = (float(x) for x in paper.split("±"))
    assert c.margin == pytest.approx(max(0.5, std))
    assert c.verdict == expected == _tost_brute([100 * a for a in accs], mean, c.margin)
    lo, hi = c.equivalence.ci90
    assert render.delta_text(c) == f"{c.delta:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    assert c.std == pytest.approx(float(np.std([100 * a for a in accs], ddof=1)))


def test_equivalence_margin_from_the_spec_and_for_perplexity(tmp_path):
    """δ: a spec's `equivalence_margin` wins; perplexity (not a percent) gets 2% of the paper's value."""
    from fisherbench.results.verdicts import default_margin

    cfg = config()
    for seed, acc in enumerate((0.960, 0.962, 0.961)):
        fabricate(tmp_path, cfg, seed, "completed", [acc])
    spec = one_cell_spec(cfg, range(3), paper="97.20±0.10")
    spec.margin = {"best_acc1": 2.0}
    (t,) = collect_one(spec, tmp_path)
    assert t.cell("net", "Adam").margin == 2.0 and t.cell("net", "Adam").verdict == "reproduced"
    assert default_margin(80.0, percent=False) == pytest.approx(1.6)
    assert default_margin(80.0, percent=False, paper_std=3.0) == 3.0
    assert default_margin(97.0, percent=True) == 0.5


def test_spec_equivalence_margin_is_validated(tmp_path):
    from fisherbench.sweep.spec import SpecError, load_spec

    base = ("title: t\nseeds: [0]\nmetric: best_acc1\nfamilies: {cnn: {}}\nrows: {r: {family: cnn}}\n"
            "arms: {main: {A: [optimizer=adam]}}\n")
    good = tmp_path / "good.yaml"
    good.write_text(base + "equivalence_margin: 0.3\n")
    assert load_spec(good).equivalence_margin == {"best_acc1": 0.3}
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + "equivalence_margin: -1\n")
    with pytest.raises(SpecError, match="positive number"):
        load_spec(bad)


def test_grid_marks_the_best_row_of_each_column_only_where_a_test_supports_it(tmp_path):
    """Rows that differ only in optimizer.lr make a grid: the best lr per column is bold when Welch's test
    (Holm-corrected over the other rows) says it is better; an incomplete cell is never marked best (it could look
    best by losing its bad seeds), and a best mean the seeds cannot separate is not bold."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, StoreIndex, collect, grid_key

    spread = (-0.01, 0.0, 0.01)
    accs = {"Adam": {0.1: 0.5, 0.01: 0.9, 0.001: 0.7}, "SGD": {0.1: 0.95, 0.01: 0.65, 0.001: 0.7}}
    cells = []
    for col, by_lr in accs.items():
        for lr, a in by_lr.items():
            cfg = config(optimizer__name=col.lower(), optimizer__lr=lr)
            cells.append(CellInput(f"lr {lr}", col, "main", cfg))
            for seed, e in enumerate(spread):
                # SGD at lr 0.1 is the highest value, but one of its seeds failed
                fabricate(tmp_path, cfg, seed, "failed" if (lr, col, seed) == (0.1, "SGD", 1) else "completed",
                          [a + e])
    assert grid_key(cells) == "optimizer.lr"
    spec = ReportSpec("g", "Grid", [0, 1, 2], ["best_acc1"], cells, best="column",
                      best_label="the best lr per column")
    (t,) = collect(spec, StoreIndex(tmp_path))
    # Adam: 90 vs 70 vs 50, clearly separated: bold. SGD: 70 vs 65 -> also separated (spread 1 point)
    assert t.best_cells() == {("lr 0.01", "Adam"), ("lr 0.001", "SGD")}
    wide = render.wide_markdown(t).splitlines()
    assert wide[3] == "| lr 0.01 | **90.00 ± 1.00** | 65.00 ± 1.00 |"
    assert wide[2] == "| lr 0.1 | 50.00 ± 1.00 | 95.00 ± 1.41 (2/3 seeds) |"
    assert wide[4] == "| lr 0.001 | 70.00 ± 1.00 | **70.00 ± 1.00** |"
    assert ("Bold: the best lr per column, chosen by best_acc1 (on the test set: the runs have no validation "
            "split), among cells whose seeds all finished, only where Welch's test against each other cell of its "
            "group (Holm-corrected) says it is better at 5%.") in render.markdown([t])
    header = render.csv_text([t]).splitlines()[0].split(",")
    best_flags = [line.split(",")[header.index("best")] for line in render.csv_text([t]).splitlines()[1:]]
    assert best_flags == ["0", "1", "0", "0", "0", "1"]
    # a table whose rows differ in more than one key is not a grid
    assert grid_key([*cells, CellInput("other", "Adam", "main", config(model__width=8, optimizer__lr=0.5))]) is None


def test_no_bold_without_a_test(tmp_path):
    """The report used to bold a "best" optimizer at n=2 whose lead the seeds could not separate."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, StoreIndex, collect

    cells = []
    for col, accs in (("Adam", (0.90, 0.93)), ("SGD", (0.91, 0.90))):
        cfg = config(optimizer__name=col.lower())
        cells.append(CellInput("net", col, "main", cfg))
        for seed, a in enumerate(accs):
            fabricate(tmp_path, cfg, seed, "completed", [a])
    (t,) = collect(ReportSpec("r", "R", [0, 1], ["best_acc1"], cells), StoreIndex(tmp_path))
    assert t.cell("net", "Adam").mean > t.cell("net", "SGD").mean  # a higher mean ...
    assert t.best_cells() == set() and "**" not in render.wide_markdown(t)  # ... that no test supports
    # one seed each: never a test, never bold
    (t,) = collect(ReportSpec("r", "R", [0], ["best_acc1"], cells), StoreIndex(tmp_path))
    assert t.best_cells() == set()


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
        for seed, e in enumerate((-0.005, 0.0, 0.005)):
            seeded = {**cfg, "seed": seed}
            rd = RunDir(tmp_path / run_id(seeded))
            rd.create(seeded, {})
            rd.append_metrics({"eval": 0, "train_s": 1.0, "val/acc1": val + e, "test/acc1": test + e})
            rd.write_summary({"run_id": rd.run_id, "status": "completed"})
    spec = ReportSpec("g", "Grid", [0, 1, 2], ["best_acc1"], cells, best="column",
                      best_label="the best lr per column")
    (t,) = collect(spec, StoreIndex(tmp_path))
    assert t.cell("lr 0.01", "Adam").mean == pytest.approx(85.0)  # the best test value ...
    assert t.best_cells() == {("lr 0.1", "Adam")}  # ... but validation chose lr 0.1
    assert "Bold: the best lr per column, chosen by best_val_acc1 (validation)" in render.markdown([t])
    # an explicit selection metric wins
    spec.select = "best_acc1"
    (t,) = collect(spec, StoreIndex(tmp_path))
    assert t.best_cells() == {("lr 0.01", "Adam")}


def test_comparison_with_a_baseline_cell_is_welch_holm_per_row(tmp_path):
    """The damping study's comparison: Welch's test per row, Holm-corrected over the rows of each column, a verdict
    per row (no more "from row X on", which never looked at later rows), and no test at n=1."""
    from scipy.stats import ttest_ind

    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, compare_with_baseline

    accs = {("lo", "A"): [0.90, 0.91, 0.92], ("hi", "A"): [0.80, 0.81, 0.82], ("lo", "B"): [0.905, 0.915, 0.91],
            ("hi", "B"): [0.90, 0.92, 0.91], ("mid", "A"): [0.905, 0.915, 0.925], ("base", "C"): [0.90, 0.91, 0.92]}
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
        ("lo", "A", False), ("hi", "A", True), ("lo", "B", False), ("hi", "B", False), ("mid", "A", False)]
    by = {(c.cell.row, c.cell.column): c for c in comparisons}
    hi_a = by[("hi", "A")]
    assert hi_a.delta == pytest.approx(-10.0)
    raw = {k: ttest_ind([100 * x for x in accs[k]], [90, 91, 92], equal_var=False).pvalue
           for k in (("lo", "A"), ("hi", "A"), ("mid", "A"))}
    assert hi_a.p_value == pytest.approx(raw[("hi", "A")])
    # Holm over column A's three rows, by hand: sorted p, multiplied by 3, 2, 1, running maximum
    order = sorted(raw, key=raw.get)
    expected, running = {}, 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[k]))
        expected[k] = running
    for k, p in expected.items():
        assert by[k].p_holm == pytest.approx(p)
    text = render.baseline_markdown(t)
    assert "**A** (3 rows compared): differs from base × C at hi; no difference found at lo, mid." in text
    assert "**B** (2 rows compared): no difference found at lo, hi." in text
    assert "Holm-corrected" in text and "## Against the baseline" in render.markdown([t])


def test_baseline_with_one_seed_is_no_test(tmp_path):
    """n=1: the old rule's 2σ was 0.00, so every nonzero difference "differed"."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import CellInput, ReportSpec, compare_with_baseline

    cells = []
    for i, (row, acc) in enumerate((("x", 0.91), ("base", 0.90))):
        cfg = config(optimizer__lr=0.001 * (i + 1))
        fabricate(tmp_path, cfg, 0, "completed", [acc])
        cells.append(CellInput(row, "A", "main", cfg))
    spec = ReportSpec("b", "B", [0], ["best_acc1"], cells, best="none", baseline=("base", "A"))
    (t,) = collect_one(spec, tmp_path)
    _, (comp,) = compare_with_baseline(t)
    assert comp.differs is None and comp.p_value is None and comp.p_holm is None
    assert "| x | A | +1.00 |  |  | no test (n=1) |" in render.baseline_markdown(t)
