"""Selection: grids name each column's best row by a validation metric where the runs have a validation split
(and say when they chose on test because there is none); validation metrics score from the metric rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fisherbench.core.store import RunDir
from tests.sweep.test_search import TINY_CNN, TINY_GPT


def _grid(tmp_path: Path, base: list[str], metric: str) -> Path:
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"""
title: "grid"
seeds: [0, 1]
metric: {metric}
grid: true
overrides: [{", ".join(json.dumps(o) for o in base)}]
families: {{f: {{}}}}
rows:
  lr 0.1: {{family: f, overrides: [optimizer.lr=0.1]}}
  lr 0.01: {{family: f, overrides: [optimizer.lr=0.01]}}
  lr 0.001: {{family: f, overrides: [optimizer.lr=0.001]}}
arms: {{main: {{Adam: [optimizer=adam], SGD: [optimizer=sgd]}}}}
""")
    return spec


def _plant(root: Path, run, rows: list[dict], status: str = "completed") -> None:
    rd = RunDir(root / run.run_id)
    rd.create({"seed": run.seed}, {})
    for i, row in enumerate(rows):
        rd.append_metrics({"eval": i, **row})
    rd.write_summary({"run_id": run.run_id, "status": status})


def _outcomes(runs):
    from fisherbench.sweep.local import Outcome

    return [Outcome(r, "completed") for r in runs]


def test_a_grid_picks_its_row_by_validation_not_by_test(tmp_path):
    """Language models have a `val` split: the row with the lowest validation perplexity is chosen even
    though another row has a lower test perplexity; a row with an unfinished seed is no candidate."""
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.selection import grid_choice_lines
    from fisherbench.sweep.spec import load_spec

    spec = load_spec(_grid(tmp_path, TINY_GPT, "test_ppl"))
    runs = expand(spec)
    root = tmp_path / "runs"
    val = {"lr 0.1": 30.0, "lr 0.01": 20.0, "lr 0.001": 10.0}  # lr 0.001 would win but has a diverged seed
    test = {"lr 0.1": 15.0, "lr 0.01": 25.0, "lr 0.001": 5.0}
    for r in runs:
        bump = r.seed * 0.5
        diverged = r.cell.row == "lr 0.001" and r.cell.column == "Adam" and r.seed == 1
        _plant(root, r, [{"val/ppl": val[r.cell.row] + bump + 5, "test/ppl": 99.0},
                         {"val/ppl": val[r.cell.row] + bump, "test/ppl": test[r.cell.row] + bump}],
               "diverged" if diverged else "completed")
    lines = grid_choice_lines(spec, _outcomes(runs), root)
    assert lines[0] == "[sweep] grid choice by best_val_ppl (validation), mean over seeds:"
    assert lines[1] == "  Adam: lr 0.01 (best_val_ppl 20.25; test_ppl 25.25; 2 seeds)"
    assert lines[2] == "  SGD: lr 0.001 (best_val_ppl 10.25; test_ppl 5.25; 2 seeds)"


def test_a_grid_without_a_validation_split_says_it_chose_on_test(tmp_path):
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.selection import grid_choice_lines, has_validation_split
    from fisherbench.sweep.spec import load_spec

    spec = load_spec(_grid(tmp_path, TINY_CNN, "best_acc1"))
    runs = expand(spec, seeds=[0])
    assert not has_validation_split(runs[0].config)
    root = tmp_path / "runs"
    for r in runs:
        _plant(root, r, [{"test/acc1": {"lr 0.1": 0.2, "lr 0.01": 0.6, "lr 0.001": 0.4}[r.cell.row]}])
    lines = grid_choice_lines(spec, _outcomes(runs), root)
    assert lines[0].startswith("[sweep] grid choice by best_acc1 (test: no validation split, the paper's protocol")
    assert "  Adam: lr 0.01 (best_acc1 60.00; 1 seed)" in lines


def test_validation_metrics_score_from_the_rows():
    from fisherbench.core.scores import VALIDATION_COUNTERPART, get_metric

    rows = [{"val/acc1": 0.5, "test/acc1": 0.9}, {"val/acc1": 0.7, "test/acc1": 0.1}, {"val/ppl": float("nan")}]
    assert get_metric("best_val_acc1").score({}, rows) == pytest.approx(70.0)
    assert get_metric("best_val_ppl").score({}, [{"val/ppl": 9.0}, {"val/ppl": 7.0}, {"val/ppl": "nan"}]) == 7.0
    assert get_metric("best_val_ppl").higher_is_better is False
    assert get_metric("best_val_acc1").score({}, [{"test/acc1": 0.9}]) is None  # no val split: no value
    assert set(VALIDATION_COUNTERPART.values()) <= {"best_val_acc1", "best_val_ppl"}
