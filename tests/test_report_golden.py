"""Reports from a fabricated store: exact Markdown and CSV, with diverged, missing, unfinished, duplicated,
foreign and out-of-spec runs; metric definitions against brute force; figures are written and non-empty."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fisherbench.store import RunDir

SPEC = """
title: "Golden table"
seeds: [0, 1, 2]
metric: best_acc1
overrides: [model=small_cnn, model.hidden=0, data=synthetic_image, budget=epochs, budget.epochs=2, logger=none]
families: {cnn: {}}
rows:
  net A: {family: cnn, overrides: [model.width=4]}
  net B: {family: cnn, overrides: [model.width=8]}
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
notes: ["A fabricated store."]
"""

EXPECTED_MD = """\
# Golden table

## best test top-1 (%)

Ours: mean ± population std (ddof=0) over seeds [0, 1, 2]; higher is better. Verdict: |Δ| ≤ 2σ with σ = sqrt(std_ours² + std_paper²).

|  | Adam | SGD |
|---|---|---|
| net A | 91.00 ± 0.82 | 85.50 ± 0.50 (2/3 seeds, 1 diverged) |
| net B | missing | incomplete |

| row | column | ours | paper | Δ | seeds | runs | verdict |
|---|---|---|---|---|---|---|---|
| net A | Adam | 91.00 ± 0.82 | 90.00 ± 1.00 | +1.00 | 3/3 | 1 duplicate run ignored | ✓ within 2σ |
| net A | SGD | 85.50 ± 0.50 (2/3 seeds, 1 diverged) | 80.00 ± 0.50 | +5.50 | 2/3 | 1 diverged | ✗ 7.8σ |
| net B | Adam |  | 95.00 |  | 0/3 | 3 not run | missing |
| net B | SGD |  | — |  | 0/3 | 1 unfinished/failed, 2 not run | missing |

## Epochs under the budget (Table 6, from the runs)

| epochs | Adam | SGD |
|---|---|---|
| net A | 2 | 1.7 |
| net B |  | 0.5 |
| paper (Table 6) | 2 | 3 |

## Cost per epoch

| s/epoch · peak memory | Adam | SGD |
|---|---|---|
| net A | 1.50 s · 100 MB | 1.00 s · 50 MB |
| net B |  | 1.00 s · 100 MB |

## Notes

- A fabricated store.
"""

EXPECTED_CSV = """\
table,metric,row,column,arm_set,mean,std,seeds_found,seeds_expected,diverged,incomplete,duplicates,paper_mean,paper_std,delta,sigma,verdict,epochs,epoch_seconds,peak_memory_mb,run_ids
golden,best_acc1,net A,Adam,main,91.0000,0.8165,3,3,0,0,1,90.0000,1.0000,1.0000,1.2910,reproduced,2.00,1.5000,100.0,{A_ADAM}
golden,best_acc1,net A,SGD,main,85.5000,0.5000,2,3,1,0,0,80.0000,0.5000,5.5000,0.7071,not reproduced,1.67,1.0000,50.0,{A_SGD}
golden,best_acc1,net B,Adam,main,,,0,3,0,0,0,95.0000,,,,missing,,,,
golden,best_acc1,net B,SGD,main,,,0,3,0,1,0,,,,,missing,0.50,1.0000,100.0,{B_SGD}
"""


def fabricate(root: Path, config: dict, seed: int, status: str | None, accs=(), epochs_done=2.0, train_s=3.0,
              memory=100 * 2**20, tweak=None) -> RunDir:
    """A run dir as the runner writes it: config.yaml, meta.json, metrics.jsonl and (if finished) summary."""
    import copy

    from fisherbench.store import run_id

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
            "run_id": rd.run_id, "status": status, "seed": seed, "best": max(rows, key=lambda r: r["test/acc1"]) if rows else None,
            "epochs_done": epochs_done, "budget": {"mode": "epochs", "epochs": 2},
            "ledger": {"train_s": train_s, "wall_s": train_s + 1}, "peak_memory_bytes": memory,
            "finished_at": f"2025-01-0{seed + 1}T00:00:00",
        })
    return rd


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The spec, its composed cells, and a store with every kind of run."""
    from engine.identity import resolved_dict
    from sweep.expand import composed_cells
    from sweep.spec import load_spec

    tmp = tmp_path_factory.mktemp("golden")
    spec_path = tmp / "golden.yaml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    cells = {(c.cell.row, c.cell.column): resolved_dict(c.config) for c in composed_cells(spec, ["main"])}
    store = tmp / "runs"
    ids = {}
    a_adam, a_sgd, b_sgd = cells[("net A", "Adam")], cells[("net A", "SGD")], cells[("net B", "SGD")]
    ids["A_ADAM"] = [fabricate(store, a_adam, 0, "completed", [0.80, 0.91], train_s=3.0),
                     fabricate(store, a_adam, 1, "completed", [0.89, 0.90], train_s=3.0),
                     fabricate(store, a_adam, 2, "completed", [0.92, 0.88], train_s=3.0)]
    # a duplicate of seed 0 (same experiment, different loader workers): failed, so not used
    fabricate(store, a_adam, 0, "failed", [0.10], tweak=lambda c: c["data"].update(num_workers=3))
    # a run of another experiment (other lr) and a seed the spec does not ask for: ignored
    fabricate(store, a_adam, 0, "completed", [0.99], tweak=lambda c: c["optimizer"].update(lr=0.5))
    fabricate(store, a_adam, 7, "completed", [0.99])
    ids["A_SGD"] = [fabricate(store, a_sgd, 0, "completed", [0.85], train_s=2.0, memory=50 * 2**20),
                    fabricate(store, a_sgd, 1, "diverged", [0.30], epochs_done=1.0, train_s=1.0, memory=50 * 2**20),
                    fabricate(store, a_sgd, 2, "completed", [0.86], train_s=2.0, memory=50 * 2**20)]
    ids["B_SGD"] = [fabricate(store, b_sgd, 0, "preempted", [0.5], epochs_done=0.5, train_s=0.5)]
    ids = {k: " ".join(r.run_id for r in v) for k, v in ids.items()}
    return spec, store, ids


def _tables(spec, store):
    from results.report import StoreIndex, collect

    return collect(spec, StoreIndex(store))


def test_golden_markdown_and_csv(golden):
    from results import tables as render

    spec, store, ids = golden
    tables = _tables(spec, store)
    assert render.markdown(tables) == EXPECTED_MD
    assert render.csv_text(tables) == EXPECTED_CSV.format(**ids)


def test_latex_and_summary(golden):
    from results import tables as render
    from results.report import reproduction_summary

    spec, store, _ = golden
    tables = _tables(spec, store)
    tex = render.latex(tables)
    assert r"$91.00_{\pm 0.82}$ (90.00 $\pm$ 1.00)" in tex and r"\begin{tabular}{lcc}" in tex
    verdicts = reproduction_summary(tables)
    assert verdicts["reproduced"] == ["golden/best_acc1: net A × Adam"]
    assert verdicts["not reproduced"] == ["golden/best_acc1: net A × SGD"]
    assert verdicts["missing"] == ["golden/best_acc1: net B × Adam"]  # "—" cells are not judged


def test_figures_written(golden, tmp_path):
    from results.figures import all_figures

    spec, store, _ = golden
    paths = all_figures(_tables(spec, store)[0], tmp_path)
    names = sorted({p.name for p in paths})
    assert names == ["cost.pdf", "cost.png", "fisher_spread.pdf", "fisher_spread.png", "wct.pdf", "wct.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_report_script_on_fabricated_store(golden, tmp_path, capsys):
    """The command line: tables under <out>/tables/, figures under <out>/figures/<spec>/, a console table."""
    import importlib.util

    spec, store, _ = golden
    mod_spec = importlib.util.spec_from_file_location("report_script", Path(__file__).parent.parent / "scripts" / "report.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    assert mod.main([str(spec.path), "--results-dir", str(store), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "net A  Adam    91.00 ± 0.82" in out and "✓ golden/best_acc1: net A × Adam" in out
    assert (tmp_path / "tables" / "golden.md").read_text() == EXPECTED_MD
    assert (tmp_path / "figures" / "golden" / "wct.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------ metric definitions
def test_metrics_against_brute_force():
    from results.report import METRICS

    rows = [{"test/acc1": 0.5, "test/acc5": 0.9, "val/ppl": 30.0, "test/ppl": 31.0},
            {"test/acc1": "nan", "test/acc5": 0.95, "val/ppl": 20.0, "test/ppl": 22.0},
            {"test/acc1": 0.7, "test/acc5": 0.91, "val/ppl": 25.0, "test/ppl": 19.0}]
    assert METRICS["best_acc1"].score({}, rows) == pytest.approx(70.0)
    assert METRICS["best_acc5"].score({}, rows) == pytest.approx(95.0)
    # test perplexity at the epoch of the best validation perplexity, not the best test perplexity
    assert METRICS["test_ppl"].score({}, rows) == pytest.approx(22.0)
    # no rows: the summary's selected row
    assert METRICS["best_acc1"].score({"best": {"test/acc1": 0.25}}, []) == pytest.approx(25.0)


def test_population_std_matches_numpy():
    from results.report import CellResult, METRICS, SeedResult, StoredRun

    values = [91.2, 90.1, 92.7, 89.9, 90.0]
    seeds = [SeedResult(i, StoredRun(RunDir("x"), {"seed": i}, {"status": "completed"}, ""), v, 0)
             for i, v in enumerate(values)]
    c = CellResult("r", "c", "main", METRICS["best_acc1"], list(range(5)), seeds, None)
    assert c.mean == pytest.approx(np.mean(values))
    assert c.std == pytest.approx(np.std(values, ddof=0))
    assert not math.isclose(c.std, np.std(values, ddof=1))


def test_stability_panels_from_tagged_rows(tmp_path):
    """Figure 5's panels read batch size and learning rate from each run's config (scaled LR rows too)."""
    from engine.identity import resolved_dict
    from results.figures import _config_value, stability
    from results.report import StoreIndex, collect
    from sweep.expand import composed_cells
    from sweep.spec import load_spec

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
    spec = load_spec(p)
    for cc in composed_cells(spec, ["main"]):
        fabricate(tmp_path / "runs", resolved_dict(cc.config), 0, "completed", [0.5, 0.6], train_s=2.0)
    (t,) = collect(spec, StoreIndex(tmp_path / "runs"))
    lr_x3 = t.cell("lr x3", "SGD")
    assert _config_value(lr_x3, "optimizer.lr") == pytest.approx(0.3) and _config_value(lr_x3, "data.batch_size") == 32
    paths = stability(t, tmp_path / "fig")
    assert sorted(q.name for q in paths) == ["stability.pdf", "stability.png"]
    assert all(q.stat().st_size > 1000 for q in paths)


def test_table6_across_specs(golden):
    from results import tables as render

    spec, store, _ = golden
    text = render.table6_markdown(_tables(spec, store))
    assert text.splitlines()[-1] == "| golden | 2 (2) | 1.1 (3) |"  # SGD: mean of net A (5/3) and net B (0.5)
