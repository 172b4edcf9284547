"""A search spec's report after a successful Optuna search: the searched cell is the best trial's runs (it used to
say `missing 0/1`: every trial overrides the searched parameters, so no run has the cell's composed config)."""
from __future__ import annotations

import pytest

from tests.results.test_report_golden import fabricate, report_script

SPEC = """
title: "Search"
seeds: [0]
metric: best_acc1
overrides: [model=small_cnn, model.hidden=0, data=synthetic_image, budget=epochs, budget.epochs=2, logger=none]
families: {cnn: {}}
rows:
  net: {family: cnn}
arms:
  main:
    Adam: [optimizer=adam]
search:
  row: net
  column: Adam
  seeds: [0]
  trials: 2
  metric: best_acc1
  params:
    optimizer.lr: {low: 1.0e-4, high: 1.0e-1, log: true}
"""


def test_search_spec_report_shows_the_best_trial(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    from fisherbench.sweep.spec import load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec_path = tmp_path / "searchy.yaml"
    spec_path.write_text(SPEC)
    data = report_script().report_input(load_spec(spec_path), ["main"])
    (cell,) = data.cells
    store = tmp_path / "runs"
    (store / "_optuna").mkdir(parents=True)
    study = optuna.create_study(study_name="searchy:net:Adam", direction="maximize",
                                storage=f"sqlite:///{store / '_optuna' / 'searchy.db'}")
    study.set_user_attr("metric", "best_acc1")
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for lr, acc in ((0.003, 0.80), (0.02, 0.93)):
        rd = fabricate(store, cell.config, 0, "completed", [acc], tweak=lambda c, lr=lr: c["optimizer"].update(lr=lr))
        study.enqueue_trial({"optimizer.lr": lr})
        trial = study.ask(space)
        trial.set_user_attr("run_ids", [rd.run_id])
        study.tell(trial, 100 * acc)
    out = tmp_path / "out"
    assert report_script().main([str(spec_path), "--store", str(store), "--out", str(out), "--no-figures"]) == 0
    md = (out / "tables" / "searchy.md").read_text()
    assert "missing" not in md and "0/1" not in md
    assert "| net | Adam (Optuna best of 2: #1, lr=0.02) | 93.00 (n=1) | 1/1 |  |" in md
    assert "the runs of the search's best trial (#1, selected on best_acc1)" in md
    assert (out / "tables" / "searchy_trials.md").exists()
