"""budget=match end to end: a candidate trains for exactly the measured train_s of a finished reference run
(named by id, or found as its cell's reference run), on the same kind of device; refusals say what to do."""
import json

import pytest

from fisherbench.core.errors import UserError
from fisherbench.core.store import RunDir
from fisherbench.engine import match as cal
from fisherbench.engine.compose import compose_config

REF = ("budget=epochs", "budget.epochs=2")
CELL = ("budget=match", "budget.reference_optimizer=adam", "budget.reference_epochs=2")


def test_match_by_cell_trains_for_the_reference_runs_measured_time(run_train, tmp_path):
    ref = run_train(*REF)  # conftest's TINY base trains adam
    assert ref.status == "completed"
    ref_train_s = ref.summary["ledger"]["train_s"]
    cand = run_train("optimizer=sgd", "optimizer.lr=0.05", *CELL)
    s = cand.summary
    rb = s["reference_budget"]
    assert rb["method"] == "match" and rb["reference_run"] == ref.run_dir.name
    assert rb["seconds"] == ref_train_s and rb["reference_epochs_done"] == 2.0
    # both runs record their machine load and time per step: reports compare a matched pair's conditions
    assert rb["reference_step_s"] == pytest.approx(ref_train_s / ref.summary["steps"])
    assert rb["reference_step_s"] == pytest.approx(ref.summary["step_s"], rel=1e-4)  # stored rounded
    assert len(ref.summary["load_avg"]) == 2 and rb["reference_load_avg"] == pytest.approx(
        sum(ref.summary["load_avg"]) / 2)
    assert rb["load_avg"] is not None and rb["loads_differ"] == (abs(rb["load_avg"] - rb["reference_load_avg"]) > 0.5)
    assert s["step_s"] == pytest.approx(s["ledger"]["train_s"] / s["steps"], rel=1e-4)
    # one-off first-step costs are excluded in both runs, as in a calibration: an untimed warm-up step
    assert ref.summary["ledger"]["warmup_s"] > 0 and s["ledger"]["warmup_s"] > 0
    assert s["budget"]["mode"] == "seconds" and s["budget"]["seconds"] == ref_train_s
    assert s["status"] == "budget_exhausted"
    per_step = s["ledger"]["train_s"] / s["steps"]
    assert ref_train_s <= s["ledger"]["train_s"] < ref_train_s + 3 * per_step + 0.05
    assert s["epochs_done"] > 0  # the Table 6 entry: epochs done in the reference's time
    # the LR schedule followed the fraction of that time used (cosine down to ~0 at the end)
    rows = RunDir(cand.run_dir).metrics()
    assert rows[-1]["lr"] < rows[0]["lr"]


def test_match_by_run_id_and_the_reference_itself(run_train):
    ref = run_train(*REF)
    by_id = run_train("optimizer=sgd", "budget=match", f"budget.match_run={ref.run_dir.name}",
                      )
    assert by_id.summary["reference_budget"]["reference_run"] == ref.run_dir.name
    assert by_id.summary["budget"]["seconds"] == ref.summary["ledger"]["train_s"]
    same = run_train(*CELL)  # adam against adam's own cell: its epochs, nothing measured
    assert same.summary["reference_budget"]["method"] == "identity" and same.summary["steps"] == 8


def test_find_reference_run_is_what_sweeps_ask(run_train, tmp_path):
    cfg = compose_config(["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image",
                          "data.shape=[3,8,8]", "data.num_train=64", "data.num_test=32", "data.batch_size=16",
                          "optimizer=sgd", "logger=none", f"results_dir={tmp_path / 'runs'}",
                          "budget=reference", "budget.reference_optimizer=adam", "budget.reference_epochs=2"])
    assert cal.find_reference_run(cfg, tmp_path / "runs") is None
    ref = run_train(*REF)
    found = cal.find_reference_run(cfg, tmp_path / "runs")
    assert found is not None and found.run_id == ref.run_dir.name


def test_match_refuses_a_missing_reference_and_another_device(run_train, tmp_path):
    with pytest.raises(UserError, match="not a finished run"):
        run_train("optimizer=sgd", *CELL)
    with pytest.raises(UserError, match="not a finished run"):
        run_train("optimizer=sgd", "budget=match", "budget.match_run=0123456789abcdef")
    ref = run_train(*REF)
    meta_path = RunDir(ref.run_dir).meta_path
    meta = json.loads(meta_path.read_text())
    meta["device"]["name"] = "NVIDIA H100 80GB HBM3"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="same kind of device"):
        run_train("optimizer=sgd", *CELL)


def test_match_warns_when_throughput_settings_differ(run_train, capsys):
    run_train(*REF)
    r = run_train("optimizer=sgd", *CELL, "channels_last=true")
    assert r.summary["reference_budget"]["settings_differ"] == {"channels_last": [False, True]}
    assert "other throughput settings" in capsys.readouterr().err


def test_match_needs_a_run_or_a_cell():
    from fisherbench.core.config import validate

    with pytest.raises(UserError, match="match_run"):
        validate(compose_config(["budget=match"]))


def test_reference_budget_uses_the_finished_reference_run_when_the_store_has_it(run_train):
    """budget=reference (reference_method=auto): no calibration when the cell's reference run is finished; the
    method is recorded; reference_method=calibration still calibrates; a run keeps its method on resume."""
    wct = ("budget=reference", "budget.reference_optimizer=adam", "budget.reference_epochs=2",
           "budget.calibration_steps=8", "budget.calibration_tolerance=10", "budget.calibration_max_s=120")
    before = run_train("optimizer=sgd", "optimizer.lr=0.05", *wct)
    assert before.summary["reference_budget"]["method"] == "calibration"  # no reference run yet
    ref = run_train(*REF)
    after = run_train("optimizer=sgd", "optimizer.lr=0.02", *wct)
    rb = after.summary["reference_budget"]
    assert rb["method"] == "match" and rb["reference_run"] == ref.run_dir.name
    assert after.summary["budget"]["mode"] == "seconds"
    assert after.summary["budget"]["seconds"] == ref.summary["ledger"]["train_s"]
    forced = run_train("optimizer=sgd", "optimizer.lr=0.03", *wct, "budget.reference_method=calibration")
    assert forced.summary["reference_budget"]["method"] == "calibration"
    with pytest.raises(UserError, match="reference_method"):
        run_train("optimizer=sgd", *wct, "budget.reference_method=guess")


def test_fractional_reference_epochs_are_one_budget_everywhere(run_train, tmp_path):
    """E = 2.5 with 4 steps per epoch: the reference trains round(2.5 x 4) = 10 steps (not floor(E) = 2
    epochs), and the equal-time cell's lookup finds exactly that run (not a 2-epoch one)."""
    two = run_train("budget=epochs", "budget.epochs=2")  # a 2-epoch adam run must not be taken for E = 2.5
    ref = run_train("budget=reference", "budget.reference_optimizer=adam", "budget.reference_epochs=2.5")
    assert ref.summary["steps"] == 10 and ref.summary["reference_budget"]["method"] == "identity"
    cand = run_train("optimizer=sgd", "budget=match", "budget.reference_optimizer=adam",
                     "budget.reference_epochs=2.5")
    rb = cand.summary["reference_budget"]
    assert rb["reference_run"] == ref.run_dir.name != two.run_dir.name
    assert rb["seconds"] == ref.summary["ledger"]["train_s"] and rb["reference_steps"] == 10


def test_a_damaged_reference_time_is_refused_not_replayed(run_train):
    ref = run_train(*REF)
    path = RunDir(ref.run_dir).summary_path
    summary = json.loads(path.read_text())
    summary["ledger"]["train_s"] = -5.0
    path.write_text(json.dumps(summary))
    with pytest.raises(UserError, match="no usable train_s|not a finished run"):  # the store may refuse it first
        run_train("optimizer=sgd", *CELL)
