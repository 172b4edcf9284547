"""Expansion with Hydra: every preset composes, run ids match what train.py computes, the dry run lists the
paper's runs with epoch counts, and estimates come from calibration caches and stored runs."""
from __future__ import annotations

import json
import re

import pytest

from fisherbench.sweep.spec import available_specs, load_spec


def test_every_experiment_preset_composes():
    from fisherbench.core.config import CONFIG_DIR
    from fisherbench.sweep.expand import compose, hydra_context

    presets = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("_"))
    assert {"quick", "table2_cifar10", "table2_cifar100", "table10a_cifar10", "table10a_cifar100", "table3_imagenet",
            "table4_transfer_cifar10", "table4_transfer_cifar100", "table5_wikitext2", "table11_tiny_imagenet",
            "fig5_stability"} <= set(presets)
    with hydra_context():
        for name in presets:
            cfg = compose([f"experiment={name}"])
            assert cfg.experiment == name, name
            assert cfg._choices["experiment"] == name


@pytest.mark.slow
def test_first_cell_of_every_spec_composes_and_names_its_preset():
    from fisherbench.sweep.expand import expand

    for name in available_specs():
        spec = load_spec(name)
        first = spec.cells(("main",))[0]
        runs = expand(spec, ("main",), seeds=[0], rows=[first.row], columns=[first.column])
        assert len(runs) == 1, name
        if spec.preset:
            assert runs[0].config.experiment == spec.preset


def test_run_ids_are_the_ones_train_py_computes():
    """The subprocess composes `run.overrides`; its run id must be the one the sweep planned (incl. a row
    that scales the recipe's LR and a fixed arm with a variant)."""
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.identity import run_id_of
    from fisherbench.sweep.expand import expand

    fig5 = load_spec("fig5_stability")
    runs = expand(fig5, ("main",), seeds=[3], rows=["lr x0.3"], columns=["K-FAC"])
    assert "optimizer.lr=0.09" in runs[0].overrides  # 0.3 x K-FAC's 0.3, written back as an override
    t2 = load_spec("table2_cifar10")
    runs += expand(t2, ("fixed",), seeds=[1], rows=["FocalNet"], columns=["AdaFisher (F = λ)"])
    for r in runs:
        cfg = compose_config(r.overrides)
        assert run_id_of(cfg) == r.run_id
    assert runs[1].config.optimizer.variant == "constf" and runs[1].config.optimizer.weight_decay == 0.05


def test_dry_run_lists_the_200_runs_of_table2(capsys, tmp_path):
    from fisherbench.sweep.cli import main

    # CIFAR-10 is not on this machine: the plan is printed only when the user asks to go on without it
    assert main(["table2_cifar10", "--dry-run", "--results-dir", str(tmp_path), "--gpus", "none",
                 "--allow-missing-data"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"^\s*\d+\s{2}", line)]
    assert len(lines) == 200
    ids = {line.split()[-5] for line in lines}
    assert len(ids) == 200  # 8 networks x 5 optimizers x 5 seeds, all distinct runs
    # derived epoch counts: the reference arm's are its budget, the others' the paper's until calibrated
    epochs = {}
    for line in lines:
        m = re.search(r"(\S+)\s+(\d+)\s+\((budget|paper)\)", line)
        col = next(c for c in ("Adam", "AdaHessian", "K-FAC", "Shampoo", "AdaFisher") if f" {c} " in line)
        epochs.setdefault(col, set()).add(int(m.group(2)))
    assert epochs == {"Adam": {210}, "AdaHessian": {89}, "K-FAC": {107}, "Shampoo": {36}, "AdaFisher": {200}}
    # a sweep that trains on the CPU counts CPU-hours, never "GPU-hours"
    assert "200 runs" in out and "estimated CPU-hours: unknown" in out and "GPU-hours" not in out


def test_dry_run_estimates_from_a_calibration_cache_and_from_stored_runs(tmp_path, capsys):
    """A cached calibration on this machine gives epochs and hours; a started run's plan beats it."""
    import torch

    from fisherbench.core.store import RunDir
    from fisherbench.engine.calibrate import METHOD, calibration_key
    from fisherbench.engine.compose import load_group_option
    from fisherbench.sweep.estimate import estimate, format_plan
    from fisherbench.sweep.expand import expand

    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text("""
title: mini
seeds: [0, 1]
overrides: [model=small_cnn, data=synthetic_image, device=cpu]
families: {cnn: {}}
rows: {net: {family: cnn}}
arms: {main: {Ref: [optimizer=adam], Other: [optimizer=sgd]}}
wct: {reference: {cnn: adam}, epochs: 10, paper_epochs: {Other: 7}}
""")
    spec = load_spec(spec_path)
    runs = expand(spec)
    other = [r for r in runs if r.cell.column == "Other"]
    cfg = other[0].config.copy()
    cfg.results_dir = str(tmp_path)
    key = calibration_key(cfg, load_group_option("optimizer", "adam"), torch.device("cpu"))
    (tmp_path / "_calibration").mkdir()
    # reference 0.03 s/step, candidate 0.01 s/step (block walls of 2 visits of 1 step): round(160 * 3) = 480
    # steps = 30 epochs of 16 steps
    (tmp_path / "_calibration" / f"{key}.json").write_text(json.dumps({
        "method": METHOD, "steps_per_epoch": 16, "look_level": 0.95,
        "arms": {"reference": {"steps_per_visit": 1}, "candidate": {"steps_per_visit": 1}},
        "block_wall_s": {"reference": [0.06] * 6, "candidate": [0.02] * 6}}))
    est = {(e.run.cell.column, e.run.seed): e for e in estimate(spec, runs, tmp_path)}
    assert (est[("Other", 0)].epochs, est[("Other", 0)].epochs_source) == (30, "calibration")
    assert est[("Other", 0)].hours == pytest.approx(30 * 16 * 0.01 / 3600)
    assert (est[("Ref", 1)].epochs, est[("Ref", 1)].epochs_source) == (10, "budget")
    # seed 1 of Other has started elsewhere with a plan of 29 epochs: both seeds now use it
    rd = RunDir(tmp_path / other[1].run_id)
    rd.create({"seed": 1}, {"budget_plan": {"epochs": 29, "steps_per_epoch": 16}})
    est = {(e.run.cell.column, e.run.seed): e for e in estimate(spec, runs, tmp_path)}
    assert (est[("Other", 1)].epochs, est[("Other", 1)].epochs_source) == (29, "run")
    assert (est[("Other", 0)].epochs, est[("Other", 0)].epochs_source) == (29, "seed 1")
    text = format_plan(list(est.values()))
    assert "unfinished" in text and "estimated GPU-hours to run" in text
    assert "estimated CPU-hours to run" in format_plan(list(est.values()), device="CPU")


def test_calibrate_then_dry_run_knows_epochs_and_hours(tmp_path):
    """`--calibrate` times each cell with the runner's calibration; the dry run then reads the cache."""
    from fisherbench.sweep.calibrate import calibrate_cells
    from fisherbench.sweep.estimate import estimate
    from fisherbench.sweep.expand import expand

    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text("""
title: mini
seeds: [0, 1]
overrides: [model=small_cnn, model.width=4, model.hidden=0, data=digits, device=cpu,
            budget.calibration_steps=3, budget.calibration_warmup=1, budget.calibration_tolerance=10,
            budget.calibration_max_s=120]
families: {cnn: {}}
rows: {net: {family: cnn}}
arms: {main: {Ref: [optimizer=adam], Other: [optimizer=sgd]}}
wct: {reference: {cnn: adam}, epochs: 4}
""")
    spec = load_spec(spec_path)
    runs = expand(spec)
    derived = calibrate_cells(runs, tmp_path)
    assert len(derived) == 1 and derived[0].steps_per_epoch == 23  # one calibration for both seeds
    est = {(e.run.cell.column, e.run.seed): e for e in estimate(spec, runs, tmp_path)}
    for seed in (0, 1):
        e = est[("Other", seed)]
        assert (e.epochs, e.epochs_source) == (derived[0].derived_epochs, "calibration")
        assert e.hours == pytest.approx(e.epochs * 23 * derived[0].candidate_step_s / 3600)


def _commands(user_overrides, columns=("Adam", "AdaFisher")):
    from fisherbench.sweep.expand import expand

    runs = expand(load_spec("table2_cifar10"), user_overrides=user_overrides, seeds=[0], rows=["ResNet-18"],
                  columns=list(columns))
    return {r.cell.column: r for r in runs}


def test_a_command_line_reference_epochs_changes_the_reference_arm_too():
    """`budget.reference_epochs=20` on the command line used to leave AdaFisher (the reference) at the spec's
    200 epochs while Adam got the time of 20 AdaFisher epochs."""
    runs = _commands(["budget.reference_epochs=20"])
    ref, adam = runs["AdaFisher"], runs["Adam"]
    assert "budget.epochs=20" in ref.overrides and ref.config.budget.mode == "epochs" and ref.config.budget.epochs == 20
    assert adam.config.budget.mode == "reference" and adam.config.budget.reference_epochs == 20
    assert adam.config.budget.reference_optimizer == "adafisher"
    # fractional E: the reference trains round(E x steps per epoch) steps as budget=reference against itself
    frac = _commands(["budget.reference_epochs=2.5"])["AdaFisher"]
    assert frac.config.budget.mode == "reference" and frac.config.budget.reference_epochs == 2.5
    assert frac.config.budget.reference_optimizer == "adafisher"
    with pytest.raises(ValueError, match="positive"):
        _commands(["budget.reference_epochs=-1"])


def test_the_dry_run_shows_the_budgets_that_will_run(tmp_path, capsys):
    from fisherbench.sweep.cli import main

    assert main(["table2_cifar10", "--rows", "ResNet-18", "--columns", "Adam,AdaFisher", "--seeds", "0",
                 "budget.reference_epochs=20", "--dry-run", "--commands", "--allow-missing-data",
                 "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    adafisher = [line for line in out.splitlines() if " optimizer=adafisher " in line and " train " in line]
    assert adafisher and all("budget.epochs=20" in line and "budget.epochs=200" not in line for line in adafisher)
    assert re.search(r"Adam .* 21 \(paper, scaled\)", out)  # the paper's 210 for E = 200, scaled to E = 20
