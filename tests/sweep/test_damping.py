"""The damping study spec: λ ∈ {1e-3 … 1e-6} × {default, paper} with lr/λ = 1 in every cell, plus the two
no-curvature arms once, 5 seeds; offline by default, CIFAR-10 / ResNet-18 with an override; and the offline
Optuna example spec composes with a validation split."""
from __future__ import annotations

from fisherbench.sweep.spec import load_spec

COLUMNS = ["default", "paper", "F = λ", "SGD (bias-corrected)"]


def _expand(*overrides: str):
    from fisherbench.sweep.expand import expand

    return expand(load_spec("damping_study"), ("main",), list(overrides), columns=COLUMNS)


def test_damping_study_cells_hold_lr_over_damping_fixed():
    runs = _expand()
    cells = {(r.cell.row, r.cell.column) for r in runs}
    lam = ["λ 1e-3", "λ 1e-4", "λ 1e-5", "λ 1e-6"]
    assert cells == {(row, col) for row in lam for col in ("default", "paper")} | {
        ("no curvature", col) for col in COLUMNS[2:]}
    assert len(runs) == 50  # 5 seeds: at 3 the paper variant's spread hides a 15-point drop (docs/sweeps.md)
    assert len(runs) == 5 * len(cells) and {r.seed for r in runs} == {0, 1, 2, 3, 4}
    for r in runs:
        opt = r.config.optimizer
        if r.cell.column in ("default", "paper", "F = λ"):
            assert opt.name == "adafisher" and opt.lr == opt.damping  # lr/λ = 1 everywhere
            assert opt.variant == {"default": "default", "paper": "paper", "F = λ": "constf"}[r.cell.column]
        if r.cell.row != "no curvature":
            assert opt.damping == float(r.cell.row.split()[1])
        if r.cell.column == "SGD (bias-corrected)":  # the same steps as F = λ at lr/λ = 1e-3/1e-3
            assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd_biascorrected", 1.0, 0.9, 5e-4)
        assert (r.config.model.name, r.config.data.name, r.config.budget.mode) == ("small_cnn", "mnist5k", "epochs")
    assert len({r.run_id for r in runs}) == len(runs)


def test_damping_study_runs_on_cifar10_resnet18_with_an_override():
    runs = _expand("experiment=table2_cifar10", "model=resnet18_cifar", "budget=epochs", "budget.epochs=200")
    for r in runs:
        assert (r.config.model.name, r.config.data.name) == ("resnet18_cifar", "cifar10")
        assert (r.config.budget.mode, r.config.budget.epochs, r.config.data.batch_size) == ("epochs", 200, 256)
        if r.cell.row != "no curvature":
            assert r.config.optimizer.lr == r.config.optimizer.damping


def test_the_offline_optuna_example_selects_on_a_validation_split():
    from fisherbench.sweep.search import trial_runs
    from fisherbench.sweep.selection import has_validation_split, selection_for

    spec = load_spec("optuna_quick")
    (cell,) = spec.cells(("main",), rows=[spec.search["row"]], columns=[spec.search["column"]])
    (run,) = trial_runs(spec, cell, {"optimizer.lr": 1e-3, "optimizer.gamma": 0.8}, [0], [], "measured")
    assert run.config.data.name == "mnist5k" and run.config.data.val_fraction == 0.1
    assert has_validation_split(run.config)
    assert selection_for(spec.metric, run.config).metric.name == "best_val_acc1"
    assert run.config.selection.metric == "val/acc1"  # each run's own `best` row is chosen on validation too
