"""Reports from a fabricated store: exact Markdown and CSV, with diverged, missing, unfinished, duplicated,
foreign and out-of-spec runs; metric definitions against brute force; figures are written and non-empty."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fisherbench.core.store import RunDir

SPEC = """
title: "Golden table"
seeds: [0, 1, 2]
metric: best_acc1
overrides: [model=small_cnn, model.hidden=0, data=synthetic_image, budget=epochs, budget.epochs=2, logger=none]
families: {cnn: {}}
rows:
  net A: {family: cnn, overrides: [model.width=4]}
  net B: {family: cnn, overrides: [model.width=8]}
  net C: {family: cnn, overrides: [model.width=16]}
arms:
  main:
    Adam: [optimizer=adam]
    SGD: [optimizer=sgd]
wct:
  reference: {cnn: adam}
  epochs: 2
  paper_epochs: {Adam: 2, SGD: 3}
paper:
  net A: {Adam: "90.00±1.00", SGD: "80.00±0.50"}
  net B: {Adam: 95.0, SGD: "—"}
  net C: {Adam: "88.00±1.00", SGD: "85.00±2.00"}
notes: ["A fabricated store."]
"""

EXPECTED_MD = """\
# Golden table

## best test top-1 (%)

Ours: mean ± sample std (ddof=1) over seeds [0, 1, 2]; one finished seed is shown as `(n=1)` (no spread, no test); higher is better. The metric is a maximum over test evaluations (the paper's protocol: it selects on the test set). Verdict, only when every seed finished: an equivalence test (TOST): `reproduced` when the 90% CI of Δ = ours − paper lies within ±δ, `differs` when the 95% CI lies entirely beyond +δ or −δ, else `inconclusive (n=…)`; the paper's value is taken as a constant and ours as the mean of n seeds (one-sample t interval); one seed: no test. δ per cell in the δ column (0.5 points for percent metrics, 2% of the paper's value otherwise, or the paper's std when larger; a spec sets its own with `equivalence_margin`). Otherwise `diverged k/n` (k of n seeds diverged) or `incomplete k/n` (k of n seeds finished); a cell whose seeds were budgeted by different methods is `mixed` and gets no verdict. Bold: the best model.width of each column, chosen by best_acc1 (on the test set: the runs have no validation split), among cells whose seeds all finished, only where Welch's test against each other cell of its group (Holm-corrected) says it is better at 5%.

|  | Adam | SGD |
|---|---|---|
| net A | 91.00 ± 1.00 | 85.50 ± 0.71 (2/3 seeds, 1 diverged) |
| net B | missing | incomplete 0/3 |
| net C | 88.00 (n=1; 1/3 seeds) | 80.00 ± 1.00 |

| row | column | ours | paper | δ | Δ [90% CI] | seeds | runs | verdict |
|---|---|---|---|---|---|---|---|---|
| net A | Adam | 91.00 ± 1.00 | 90.00 ± 1.00 | ±1.00 | +1.00 [-0.69, +2.69] | 3/3 | 1 duplicate run ignored | inconclusive (n=3) |
| net A | SGD | 85.50 ± 0.71 (2/3 seeds, 1 diverged) | 80.00 ± 0.50 | ±0.50 | +5.50 | 2/3 | 1 diverged | diverged 1/3 |
| net B | Adam |  | 95.00 | ±0.50 |  | 0/3 | 3 not run | missing |
| net B | SGD |  | — |  |  | 0/3 | 1 unfinished/failed, 2 not run | incomplete 0/3 |
| net C | Adam | 88.00 (n=1; 1/3 seeds) | 88.00 ± 1.00 | ±1.00 | +0.00 | 1/3 | 2 unfinished/failed | incomplete 1/3 |
| net C | SGD | 80.00 ± 1.00 | 85.00 ± 2.00 | ±2.00 | -5.00 [-6.69, -3.31] | 3/3 |  | differs |

## Epochs under the budget (Table 6, from the runs)

| epochs | Adam | SGD |
|---|---|---|
| net A | 2 | 1.7 |
| net B |  | 0.5 |
| net C | 0.7 | 2 |
| paper (Table 6) | 2 | 3 |

The paper's epoch times (its Table 6) include the test pass after every epoch; ours are budget-clock seconds, which exclude evaluation (and logging and checkpoints) from the budget. On the Adam/AdaFisher epoch-time ratio the difference is about 0.2%.

## Cost per epoch

Budget-clock seconds: evaluation, logging and checkpoints excluded.

| s/epoch · peak memory | Adam | SGD |
|---|---|---|
| net A | 1.50 s · 100 MB | 1.00 s · 50 MB |
| net B |  | 1.00 s · 100 MB |
| net C | 2.00 s · 100 MB | 1.00 s · 100 MB |

## F/λ over training

The range of F/λ over the preconditioned entries, logged at every evaluation (AdaFisher family): 1 means a plain momentum step at lr/λ, larger values damp the step by that factor.

| F/λ over training · at the end | Adam | SGD |
|---|---|---|
| net A | [1, 1.5] · final [1, 1.4] |  |
| net B |  |  |
| net C | [1, 1.5] · final [1, 1.5] |  |

## Notes

- A fabricated store.
"""

EXPECTED_CSV = """\
table,metric,row,column,arm_set,mean,std,seeds_found,seeds_expected,diverged,incomplete,duplicates,paper_mean,paper_std,delta,margin,ci90_lo,ci90_hi,ci95_lo,ci95_hi,verdict,best,epochs,epoch_seconds,peak_memory_mb,budget_method,budget_seeds,derived_epochs_lo,derived_epochs_hi,ratio,ratio_lo,ratio_hi,calibration_shared,busy_runs,load_flagged,reference_runs,run_ids
golden,best_acc1,net A,Adam,main,91.0000,1.0000,3,3,0,0,1,90.0000,1.0000,1.0000,1.0000,-0.6859,2.6859,-1.4841,3.4841,inconclusive (n=3),0,2.00,1.5000,100.0,,,,,,,,,,,,{A_ADAM}
golden,best_acc1,net A,SGD,main,85.5000,0.7071,2,3,1,0,0,80.0000,0.5000,5.5000,0.5000,,,,,diverged 1/3,0,1.67,1.0000,50.0,,,,,,,,,,,,{A_SGD}
golden,best_acc1,net B,Adam,main,,,0,3,0,0,0,95.0000,,,0.5000,,,,,missing,0,,,,,,,,,,,,,,,
golden,best_acc1,net B,SGD,main,,,0,3,0,1,0,,,,,,,,,incomplete 0/3,0,0.50,1.0000,100.0,,,,,,,,,,,,{B_SGD}
golden,best_acc1,net C,Adam,main,88.0000,,1,3,0,2,0,88.0000,1.0000,0.0000,1.0000,,,,,incomplete 1/3,0,0.67,2.0000,100.0,,,,,,,,,,,,{C_ADAM}
golden,best_acc1,net C,SGD,main,80.0000,1.0000,3,3,0,0,0,85.0000,2.0000,-5.0000,2.0000,-6.6859,-3.3141,-7.4841,-2.5159,differs,0,2.00,1.0000,100.0,,,,,,,,,,,,{C_SGD}
"""


def fabricate(root: Path, config: dict, seed: int, status: str | None, accs=(), epochs_done=2.0, train_s=3.0,
              memory=100 * 2**20, tweak=None) -> RunDir:
    """A run dir as the runner writes it: config.yaml, meta.json, metrics.jsonl and (if finished) summary."""
    import copy

    from fisherbench.core.store import run_id

    cfg = copy.deepcopy(config)
    cfg["seed"] = seed
    if tweak:
        tweak(cfg)
    identity = {k: v for k, v in cfg.items() if k not in ("results_dir", "logger", "experiment")}
    rd = RunDir(root / run_id(identity))
    rd.create(cfg, {"budget_plan": {"epochs": 2, "steps_per_epoch": 4}})
    rows = []
    for i, acc in enumerate(accs):
        row = {"eval": i, "epoch": float(i + 1), "step": 4 * (i + 1), "train_s": 1.0 + i, "wall_s": 1.5 + i,
               "train/loss": 2.0 / (i + 1), "test/acc1": acc, "test/loss": 1.0}
        if cfg["optimizer"]["name"] == "adam":
            row.update({"opt/F_over_lambda_min": 1.0, "opt/F_over_lambda_max": 1.5 - 0.1 * i})
        rd.append_metrics(row)
        rows.append(row)
    if status is not None:
        rd.write_summary({
            "run_id": rd.run_id, "status": status, "seed": seed,
            "best": max(rows, key=lambda r: r["test/acc1"]) if rows else None,
            "epochs_done": epochs_done, "budget": {"mode": "epochs", "epochs": 2},
            "ledger": {"train_s": train_s, "wall_s": train_s + 1}, "peak_memory_bytes": memory,
            "finished_at": f"2025-01-0{seed + 1}T00:00:00",
        })
    return rd


def report_script():
    """fisherbench/report.py (it composes a spec's cells: the report layer takes them as plain data)."""
    from fisherbench import report

    return report


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The spec as the report's plain input, and a store with every kind of run."""
    from fisherbench.sweep.spec import load_spec

    tmp = tmp_path_factory.mktemp("golden")
    spec_path = tmp / "golden.yaml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    data = report_script().report_input(spec, ["main"])
    cells = {(c.row, c.column): c.config for c in data.cells}
    store = tmp / "runs"
    ids = {}
    a_adam, a_sgd, b_sgd = cells[("net A", "Adam")], cells[("net A", "SGD")], cells[("net B", "SGD")]
    c_adam, c_sgd = cells[("net C", "Adam")], cells[("net C", "SGD")]
    ids["A_ADAM"] = [fabricate(store, a_adam, 0, "completed", [0.80, 0.91], train_s=3.0),
                     fabricate(store, a_adam, 1, "completed", [0.89, 0.90], train_s=3.0),
                     fabricate(store, a_adam, 2, "completed", [0.92, 0.88], train_s=3.0)]
    # a duplicate of seed 0 (same experiment, different loader workers): failed, so not used
    fabricate(store, a_adam, 0, "failed", [0.10], tweak=lambda c: c["data"].update(num_workers=3))
    # a run of another experiment (other lr) and a seed the spec does not ask for: ignored
    fabricate(store, a_adam, 0, "completed", [0.99], tweak=lambda c: c["optimizer"].update(lr=0.5))
    fabricate(store, a_adam, 7, "completed", [0.99])
    # partial divergence: 2 of 3 seeds finished, 1 diverged -> no verdict
    ids["A_SGD"] = [fabricate(store, a_sgd, 0, "completed", [0.85], train_s=2.0, memory=50 * 2**20),
                    fabricate(store, a_sgd, 1, "diverged", [0.30], epochs_done=1.0, train_s=1.0, memory=50 * 2**20),
                    fabricate(store, a_sgd, 2, "completed", [0.86], train_s=2.0, memory=50 * 2**20)]
    ids["B_SGD"] = [fabricate(store, b_sgd, 0, "preempted", [0.5], epochs_done=0.5, train_s=0.5)]
    # partial failure: 1 of 3 seeds finished (one failed, one out of memory) -> `incomplete 1/3`, shown (n=1)
    ids["C_ADAM"] = [fabricate(store, c_adam, 0, "completed", [0.88], train_s=4.0),
                     fabricate(store, c_adam, 1, "failed", [], epochs_done=0.0, train_s=0.1),
                     fabricate(store, c_adam, 2, "oom", [], epochs_done=0.0, train_s=0.1)]
    # complete, 2.3σ below the paper: not reproduced, with a Welch p
    ids["C_SGD"] = [fabricate(store, c_sgd, s, "completed", [a], train_s=2.0) for s, a in enumerate((0.80, 0.81, 0.79))]
    ids = {k: " ".join(r.run_id for r in v) for k, v in ids.items()}
    return spec, data, store, ids


def _tables(golden_fixture):
    from fisherbench.results.report import StoreIndex, collect

    _, data, store, _ = golden_fixture
    return collect(data, StoreIndex(store))


def test_golden_markdown_and_csv(golden):
    from fisherbench.results import tables as render

    tables = _tables(golden)
    assert render.markdown(tables) == EXPECTED_MD
    assert render.csv_text(tables) == EXPECTED_CSV.format(**golden[3])


def test_latex_and_summary(golden):
    """Diverged and incomplete cells are listed apart from verdicts; LaTeX marks n=1 and k/n seeds."""
    from fisherbench.results import tables as render
    from fisherbench.results.report import reproduction_summary

    tables = _tables(golden)
    tex = render.latex(tables)
    assert r"$91.00_{\pm 1.00}$ (90.00 $\pm$ 1.00)" in tex and r"\begin{tabular}{lcc}" in tex
    assert r"$85.50_{\pm 0.71}^{2/3}$ (80.00 $\pm$ 0.50)" in tex and "$$" not in tex
    assert r"$88.00^{1/3}$ ($n{=}1$) (88.00 $\pm$ 1.00)" in tex
    verdicts = reproduction_summary(tables)
    assert verdicts["reproduced"] == []
    assert verdicts["inconclusive"] == ["golden/best_acc1: net A × Adam (inconclusive (n=3))"]
    assert verdicts["differs"] == ["golden/best_acc1: net C × SGD"]
    assert verdicts["diverged"] == ["golden/best_acc1: net A × SGD (diverged 1/3)"]
    assert verdicts["incomplete"] == ["golden/best_acc1: net C × Adam (incomplete 1/3)"]
    assert verdicts["missing"] == ["golden/best_acc1: net B × Adam"]  # "—" cells are not judged
    summary = render.summary_markdown(verdicts)
    assert summary.splitlines()[0] == ("5 cells with a paper value: differs 1, inconclusive 1, diverged 1, "
                                       "incomplete 1, missing 1")
    assert "### diverged (some seeds diverged: no verdict)\n- golden/best_acc1: net A × SGD (diverged 1/3)" in summary


def test_figures_written(golden, tmp_path):
    from fisherbench.results.figures import all_figures

    paths = all_figures(_tables(golden)[0], tmp_path)
    names = sorted({p.name for p in paths})
    assert names == ["cost.pdf", "cost.png", "fisher_spread.pdf", "fisher_spread.png", "wct.pdf", "wct.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_report_script_on_fabricated_store(golden, tmp_path, capsys):
    """The command line: tables under <out>/tables/, figures under <out>/figures/<spec>/, a console table."""
    spec, _, store, _ = golden
    assert report_script().main([str(spec.path), "--store", str(store), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "net A  Adam    91.00 ± 1.00" in out and "✗ golden/best_acc1: net C × SGD" in out
    assert "? golden/best_acc1: net A × Adam (inconclusive (n=3))" in out
    assert "÷ golden/best_acc1: net A × SGD (diverged 1/3)" in out
    assert (tmp_path / "tables" / "golden.md").read_text() == EXPECTED_MD
    assert (tmp_path / "figures" / "golden" / "wct.png").stat().st_size > 1000


def test_report_script_rows_and_columns_select_cells(golden, tmp_path, capsys):
    spec, _, store, _ = golden
    mod = report_script()
    assert mod.main([str(spec.path), "--store", str(store), "--out", str(tmp_path), "--rows", "net C",
                     "--columns", "SGD", "--no-figures"]) == 0
    lines = (tmp_path / "tables" / "golden.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("golden,best_acc1,net C,SGD,")
    capsys.readouterr()
    # unknown names are the user's to fix: a message and exit 2, no traceback
    assert mod.main([str(spec.path), "--store", str(store), "--out", str(tmp_path), "--rows", "net Z"]) == 2
    assert "no row 'net Z'" in capsys.readouterr().err
    assert mod.main([str(spec.path), "--store", str(store), "--out", str(tmp_path), "--columns", "Lion"]) == 2
    assert "no column 'Lion'" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("rows: {a: {}}\narms: {main: {Adam: [optimizer=adam]}}\ncolumns: [x]\n", "unknown keys ['columns']"),
    ("rows: {a: {}}\narms: {main: {Adam: [optimizer=adam]}}\nmetric: best_acc9\n", "metric 'best_acc9' is not a metric; known: best_acc1"),
    ("rows: {a: {}}\narms: {main: {Adam: [optimizer=adam]}}\npaper: {b: {Adam: 90}}\n", "names row 'b'"),
    ("rows: {a: {}}\narms: {main: {Adam: [optimizer=adam]}}\npaper: {a: {Adam: 'about 90'}}\n",
     "neither a number, 'mean±std', nor '—'"),
    ("rows: [a\n", "is not valid YAML"),
    ("title: no rows\n", "needs `rows` and `arms`"),
    ("rows: {a: {}}\narms: {main: {Adam: [optimizer=adamm]}}\n", "does not compose (optimizer=adamm"),
])
def test_spec_by_path_is_validated_with_clear_errors(tmp_path, capsys, text, message):
    """A spec given by path (docs/reports.md documents the schema): mistakes are messages naming the file, exit 2."""
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    (tmp_path / "runs").mkdir()
    assert report_script().main([str(path), "--store", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


def test_report_layer_does_not_compose():
    """Reports take composed cells as plain data: results/ imports neither the sweep nor the run layer."""
    import ast

    root = Path(__file__).resolve().parents[2] / "fisherbench" / "results"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith(("fisherbench.sweep", "fisherbench.engine")) for n in names), (path, names)


# ------------------------------------------------------------------------------------ metric definitions
def test_metrics_against_brute_force():
    from fisherbench.results.report import METRICS

    rows = [{"test/acc1": 0.5, "test/acc5": 0.9, "val/ppl": 30.0, "test/ppl": 31.0},
            {"test/acc1": "nan", "test/acc5": 0.95, "val/ppl": 20.0, "test/ppl": 22.0},
            {"test/acc1": 0.7, "test/acc5": 0.91, "val/ppl": 25.0, "test/ppl": 19.0}]
    assert METRICS["best_acc1"].score({}, rows) == pytest.approx(70.0)
    assert METRICS["best_acc5"].score({}, rows) == pytest.approx(95.0)
    # test perplexity at the epoch of the best validation perplexity, not the best test perplexity
    assert METRICS["test_ppl"].score({}, rows) == pytest.approx(22.0)
    # no rows: the summary's selected row
    assert METRICS["best_acc1"].score({"best": {"test/acc1": 0.25}}, []) == pytest.approx(25.0)


def test_sample_std_matches_numpy():
    from fisherbench.results.report import METRICS, CellResult, SeedResult, StoredRun

    values = [91.2, 90.1, 92.7, 89.9, 90.0]
    seeds = [SeedResult(i, StoredRun(RunDir("x"), {"seed": i}, {"status": "completed"}, ""), v, 0)
             for i, v in enumerate(values)]
    c = CellResult("r", "c", "main", METRICS["best_acc1"], list(range(5)), seeds, None)
    assert c.mean == pytest.approx(np.mean(values))
    assert c.std == pytest.approx(np.std(values, ddof=1))  # every spread a report shows is a sample std
    assert not math.isclose(c.std, np.std(values, ddof=0))


def test_stability_panels_from_tagged_rows(tmp_path):
    """Figure 5's panels read batch size and learning rate from each run's config (scaled LR rows too)."""
    from fisherbench.results.figures import _config_value, stability
    from fisherbench.results.report import StoreIndex, collect
    from fisherbench.sweep.spec import load_spec

    p = tmp_path / "stab.yaml"
    p.write_text("""
seeds: [0]
overrides: [model=small_cnn, model.hidden=0, data=synthetic_image, budget=epochs, budget.epochs=1, logger=none]
families: {cnn: {}}
rows:
  bs 16: {family: cnn, overrides: [data.batch_size=16], tags: {panel: batch_size}}
  bs 32: {family: cnn, overrides: [data.batch_size=32], tags: {panel: [batch_size, lr]}}
  lr x3: {family: cnn, overrides: [data.batch_size=32], scale: {optimizer.lr: 3.0}, tags: {panel: lr}}
arms: {main: {Adam: [optimizer=adam], SGD: [optimizer=sgd]}}
""")
    data = report_script().report_input(load_spec(p), ["main"])
    for c in data.cells:
        fabricate(tmp_path / "runs", c.config, 0, "completed", [0.5, 0.6], train_s=2.0)
    (t,) = collect(data, StoreIndex(tmp_path / "runs"))
    assert t.spec.best == "row"  # rows differ in batch size or learning rate: not a one-key grid
    lr_x3 = t.cell("lr x3", "SGD")
    assert _config_value(lr_x3, "optimizer.lr") == pytest.approx(0.3) and _config_value(lr_x3, "data.batch_size") == 32
    paths = stability(t, tmp_path / "fig")
    assert sorted(q.name for q in paths) == ["stability.pdf", "stability.png"]
    assert all(q.stat().st_size > 1000 for q in paths)


def test_table6_across_specs(golden):
    from fisherbench.results import tables as render

    text = render.table6_markdown(_tables(golden))
    # Adam: mean of net A (2) and net C (2/3); SGD: mean of net A (5/3), net B (0.5) and net C (2)
    assert text.splitlines()[2] == "| golden | 1.3 (2) | 1.4 (3) |"
    # where Table 6 is regenerated, the difference in what the epoch times include is stated
    assert text.endswith("ours are budget-clock seconds, which exclude evaluation (and logging and checkpoints) "
                         "from the budget. On the Adam/AdaFisher epoch-time ratio the difference is about 0.2%.")
