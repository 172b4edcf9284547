"""Optuna searches in reports: a study stored as `python -m fisherbench sweep SPEC --optuna` stores it (Optuna's SQLite
storage in <store>/_optuna/<spec>.db, run ids in each trial's user attributes), joined with the store's runs:
params-vs-value table with the best trial marked, failed trials with their runs' errors, a figure."""
from __future__ import annotations

import json

import pytest

from tests.results.test_profiles import make_run


@pytest.fixture()
def searched(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path / "runs"
    (root / "_optuna").mkdir(parents=True)
    study = optuna.create_study(study_name="demo:small:Adam", storage=f"sqlite:///{root / '_optuna' / 'demo.db'}",
                                direction="maximize")
    study.set_user_attr("metric", "best_acc1")  # as the sweep records the objective
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
             "optimizer.name": optuna.distributions.CategoricalDistribution(["adam", "sgd"])}
    plan = [(1e-3, "adam", 2, "completed"), (3e-2, "sgd", 6, "completed"), (1e-1, "sgd", None, "failed"),
            (1e-2, "adam", 4, "completed")]
    ids = []
    for i, (lr, name, reach, status) in enumerate(plan):
        study.enqueue_trial({"optimizer.lr": lr, "optimizer.name": name})  # fixed parameters, not sampled ones
        trial = study.ask(space)
        rd = make_run(root, "small", name, 100 + i, reach, status=status, lr=lr)
        if status == "failed":
            s = json.loads(rd.summary_path.read_text())
            rd.summary_path.write_text(json.dumps({**s, "error": "RuntimeError: boom"}))
        trial.set_user_attr("run_ids", [rd.run_id])
        trial.set_user_attr("statuses", [status])
        if status == "completed":
            study.tell(trial, 85.0 if reach is not None and reach < 5 else 59.0 - i)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        ids.append(rd.run_id)
    return root, ids


def test_trials_table_marks_the_best_and_reports_errors(searched):
    from fisherbench.results import trials
    from fisherbench.results.runs import StoreIndex

    root, ids = searched
    (study,), problems = trials.from_store(root, StoreIndex(root))
    assert problems == [] and study.name == "demo:small:Adam" and study.direction == "maximize"
    done = [t for t in study.trials if t.state == "COMPLETE"]
    assert [t.value for t in done] == [85.0, 58.0, 85.0] and study.best.number == done[0].number
    header, body = trials.trials_rows(study)
    assert header == ["trial", "state", "value", "optimizer.lr", "optimizer.name", "runs", "error"]
    rows = {r[0]: r for r in body}
    best = rows[f"{study.best.number} ★"]
    assert best[1:5] == ["complete", "85.0000", "0.001", "adam"] and best[5] == f"{ids[0]} completed"
    failed = [r for r in body if r[5] == f"{ids[2]} failed"]
    assert len(failed) == 1 and failed[0][1] == "fail" and failed[0][6] == "RuntimeError: boom"
    assert sum("★" in r[0] for r in body) == 1
    md = trials.markdown(study)
    assert f"★ best trial: #{study.best.number}, value 85.0000, optimizer.lr=0.001, optimizer.name=adam." in md


def test_trials_figure_and_report_sections(searched, tmp_path, capsys):
    from fisherbench.results import trials
    from fisherbench.results.runs import StoreIndex
    from tests.results.test_report_golden import report_script

    root, _ = searched
    (study,), _ = trials.from_store(root, StoreIndex(root))
    paths = trials.figure(study, tmp_path / "fig")
    assert sorted(p.name for p in paths) == ["trials_demo_small_Adam.pdf", "trials_demo_small_Adam.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # a report of the store lists the study; `python -m fisherbench results trials` prints it
    assert report_script().main(["--store", str(root), "--group-by", "optimizer.name", "--out",
                                 str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "tables" / "store_trials.md").read_text()
    assert "## Optuna study `demo:small:Adam`" in md and "★" in md
    assert (tmp_path / "out" / "figures" / "store" / "trials_demo_small_Adam.png").exists()
    capsys.readouterr()
    from fisherbench.results.browse import main

    assert main(["trials", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Optuna study demo:small:Adam (maximize best_acc1; ★ best)") and "RuntimeError: boom" in out


def test_unreadable_study_file_is_listed_not_fatal(tmp_path):
    from fisherbench.core.errors import UserError
    from fisherbench.results import trials

    root = tmp_path / "runs"
    (root / "_optuna").mkdir(parents=True)
    (root / "_optuna" / "broken.db").write_bytes(b"this is not sqlite")
    studies, problems = trials.from_store(root)
    assert studies == [] and len(problems) == 1 and "is not a readable Optuna storage" in problems[0]
    with pytest.raises(UserError, match="no Optuna storage at"):
        trials.load_studies(root / "_optuna" / "missing.db")


def test_trials_rebuilt_from_run_tags_without_the_storage(tmp_path):
    """A store copied without `_optuna/`: the trials come from the runs' config tags (study, trial, params)."""
    import copy

    from fisherbench.core.store import RunDir, run_id
    from fisherbench.results import trials
    from fisherbench.results.runs import StoreIndex
    from tests.results.test_profiles import CFG

    root = tmp_path / "runs"
    plan = [(0, 1e-3, "completed", 0.9), (1, 3e-2, "diverged", 0.3), (2, 1e-2, "completed", 0.8), (3, 0.1, None, 0.5)]
    for number, lr, status, val in plan:
        cfg = copy.deepcopy(CFG)
        cfg["optimizer"]["lr"], cfg["seed"] = lr, 0
        cfg["tags"] = ["optuna", "optuna.study=quick:small CNN:AdaFisher", f"optuna.trial={number}",
                       f"optuna.param.optimizer.lr={lr!r}"]
        rd = RunDir(root / run_id({k: v for k, v in cfg.items() if k != "tags"}))
        rd.create(cfg, {})
        rd.append_metrics({"eval": 0, "train_s": 1.0, "val/acc1": val, "test/acc1": val - 0.05})
        if status is not None:
            rd.write_summary({"run_id": rd.run_id, "status": status, "select_metric": "test/acc1"})
    make_run(root, "small", "adam", 0, 2)  # a run of no search
    (study,), problems = trials.from_store(root, StoreIndex(root))
    assert problems == [] and study.name == "quick:small CNN:AdaFisher" and study.direction == "maximize"
    assert study.metric == "best_val_acc1"  # searches optimise the validation metric
    got = [(t.number, t.state, t.value, t.params) for t in study.trials]
    assert got == [(0, "COMPLETE", pytest.approx(90.0), {"optimizer.lr": 1e-3}),
                   (1, "PRUNED", None, {"optimizer.lr": 3e-2}),
                   (2, "COMPLETE", pytest.approx(80.0), {"optimizer.lr": 1e-2}),
                   (3, "RUNNING", None, {"optimizer.lr": 0.1})]
    assert study.best.number == 0
    header, body = trials.trials_rows(study)
    assert header[-1] == "error" and body[0][0] == "0 ★" and body[1][-1] == "diverged"
