"""The spine end to end, in-process: budgets, ledger, store, skip-on-rerun, divergence, resume."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fisherbench.core.ledger import PARTS
from fisherbench.core.store import RunDir, iter_run_dirs

REPO = Path(__file__).resolve().parents[2]


def test_steps_budget_stops_exactly(run_train):
    r = run_train("budget=steps", "budget.steps=7")
    s = r.summary
    assert s["status"] == "completed"
    assert s["steps"] == 7
    assert s["steps_per_epoch"] == 4
    assert math.isclose(s["epochs_done"], 7 / 4)
    rows = RunDir(r.run_dir).metrics()
    assert rows[-1]["step"] == 7  # final evaluation at the end of the budget
    assert [row["step"] for row in rows] == [4, 7]  # one per epoch + the final one


def test_epochs_budget_and_cosine_schedule(run_train):
    r = run_train("budget=epochs", "budget.epochs=3", "optimizer.lr=0.01")
    s = r.summary
    assert s["status"] == "completed" and s["steps"] == 12 and s["epochs_done"] == 3
    rows = RunDir(r.run_dir).metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # epoch-wise cosine (official CosineAnnealingLR stepped per epoch): epoch e trains at 0.5(1+cos(pi e/3))
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (0, 1, 2)]
    assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-12)


def test_seconds_budget_overshoots_at_most_one_step(run_train):
    r = run_train("budget=seconds", "budget.seconds=1.5", "data.num_train=512")
    s = r.summary
    assert s["status"] == "budget_exhausted"
    train_s = s["ledger"]["train_s"]
    per_step = train_s / s["steps"]
    assert 1.5 <= train_s < 1.5 + 4 * per_step + 0.05  # stopped at the first step past the budget


def test_ledger_parts_add_up_to_wall_clock(run_train):
    r = run_train("budget=epochs", "budget.epochs=2", "eval.every_fraction=0.25")
    led = r.summary["ledger"]
    parts = sum(led[p] for p in PARTS)
    assert led["wall_s"] > 0
    assert abs(parts - led["wall_s"]) <= 0.05 * led["wall_s"]
    assert 0 <= led["data_s"] <= led["train_s"]


def test_eval_every_fraction(run_train):
    r = run_train("budget=steps", "budget.steps=8", "eval.every_epochs=null", "eval.every_fraction=0.25")
    assert [row["step"] for row in RunDir(r.run_dir).metrics()] == [2, 4, 6, 8]


def test_store_layout_and_summary(run_train):
    r = run_train("budget=steps", "budget.steps=3")
    d = RunDir(r.run_dir)
    assert {p.name for p in r.run_dir.iterdir()} >= {"config.yaml", "meta.json", "metrics.jsonl", "summary.json"}
    assert not d.checkpoint_path.exists()  # removed once the run is complete
    meta, s = d.meta(), d.summary()
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"]
    assert meta["dataset"]["fingerprint"].startswith("synthetic_image")
    assert meta["choices"]["optimizer"] == "adam" and meta["deterministic"] is False
    for key in ("status", "best", "final", "ledger", "epochs_done", "peak_memory_bytes", "optimizer_state_bytes",
                "final_params_sha256", "budget", "param_count"):
        assert key in s, key
    # Adam state = exp_avg + exp_avg_sq (+ step scalars) = 2 x params in fp32 (+ small)
    assert 2 * 4 * s["param_count"] <= s["optimizer_state_bytes"] <= 2 * 4 * s["param_count"] + 1024
    assert len(s["final_params_sha256"]) == 64
    assert d.config()["optimizer"]["name"] == "adam"


def test_rerun_is_skipped_and_overwrite_reruns(run_train):
    first = run_train("budget=steps", "budget.steps=2")
    again = run_train("budget=steps", "budget.steps=2")
    assert again.skipped and again.run_dir == first.run_dir
    assert again.summary["finished_at"] == first.summary["finished_at"]
    forced = run_train("budget=steps", "budget.steps=2", "overwrite=true")
    assert not forced.skipped and forced.run_dir == first.run_dir
    assert forced.summary["final_params_sha256"] == first.summary["final_params_sha256"]  # same seed


def test_run_identity_ignores_logging_but_not_seed(run_train, tmp_path):
    a = run_train("budget=steps", "budget.steps=2")
    b = run_train("budget=steps", "budget.steps=2", "logger.progress=never", "tags=[x]")
    c = run_train("budget=steps", "budget.steps=2", "seed=1")
    assert b.skipped and b.run_dir == a.run_dir
    assert c.run_dir != a.run_dir
    assert c.summary["final_params_sha256"] != a.summary["final_params_sha256"]


def test_diverged_run_records_the_exact_first_non_finite_step(run_train, tmp_path):
    r = run_train("optimizer=sgd", "optimizer.lr=1.0e+12", "budget=steps", "budget.steps=50")
    s = r.summary
    assert s["status"] == "diverged"
    # the host looks at the losses every check_every (16) steps without a sync: it may run on for fewer than
    # 2 x 16 steps, but the step recorded is the first non-finite one, as a run that checks every step finds
    eager = run_train("optimizer=sgd", "optimizer.lr=1.0e+12", "budget=steps", "budget.steps=50", "check_every=1",
                      f"results_dir={tmp_path / 'eager'}")
    assert eager.summary["diverged"]["step"] == eager.summary["steps"] < 50  # every step checked: stops there
    assert s["diverged"]["step"] == eager.summary["diverged"]["step"]
    assert s["diverged"]["step"] <= s["steps"] < s["diverged"]["step"] + 2 * 16
    assert s["diverged"]["detected_at_step"] == s["steps"]
    assert not math.isfinite(s["diverged"]["loss"])
    assert s["stop_reason"] == "non-finite training loss"
    rows = RunDir(r.run_dir).metrics()
    assert rows and rows[-1]["step"] == s["steps"]
    # a diverged run is final: re-running skips it
    assert run_train("optimizer=sgd", "optimizer.lr=1.0e+12", "budget=steps", "budget.steps=50").skipped


def test_deterministic_same_seed_same_params(run_train, tmp_path):
    a = run_train("budget=steps", "budget.steps=5", "deterministic=true")
    b = run_train("budget=steps", "budget.steps=5", "deterministic=true", f"results_dir={tmp_path / 'other'}")
    assert a.summary["final_params_sha256"] == b.summary["final_params_sha256"]
    assert RunDir(a.run_dir).meta()["deterministic"] is True


def test_reference_budget_records_derived_steps(run_train):
    wct = ("optimizer=sgd", "budget=reference", "budget.reference_optimizer=adamw", "budget.reference_epochs=2",
           "budget.calibration_steps=4", "budget.calibration_warmup=1", "budget.calibration_tolerance=10",
           "budget.calibration_max_s=120")
    r = run_train(*wct)
    s = r.summary
    ref = s["reference_budget"]
    assert ref["method"] == "calibration"
    assert ref["reference_optimizer"] == "adamw" and ref["reference_epochs"] == 2
    expected = max(1, round(2 * s["steps_per_epoch"] / ref["ratio"]))
    assert ref["steps"] == expected and ref["derived_epochs"] == expected / s["steps_per_epoch"]
    assert ref["ratio_ci"][0] <= ref["ratio"] <= ref["ratio_ci"][1]
    assert ref["blocks"] >= 6
    assert s["budget"]["steps"] == expected and s["steps"] == expected
    assert s["budget"]["source"]["steps"] == expected
    # the calibration is cached per machine/model/data/optimizers/settings and reused
    again = run_train(*wct, "seed=1")
    assert again.summary["reference_budget"]["calibration_shared"] is True
    assert again.summary["reference_budget"]["steps"] == expected


def test_reference_budget_for_the_reference_itself_is_exact(run_train):
    r = run_train("optimizer=adamw", "budget=reference", "budget.reference_optimizer=adamw",
                  "budget.reference_epochs=2")
    assert r.summary["reference_budget"]["derived_epochs"] == 2
    # fractional reference epochs: round(E x steps per epoch) steps (4 per epoch here), not floor(E) epochs
    half = run_train("optimizer=adamw", "budget=reference", "budget.reference_optimizer=adamw",
                     "budget.reference_epochs=2.5")
    assert half.summary["steps"] == 10 and half.summary["reference_budget"]["derived_epochs"] == 2.5


def test_fault_injection_then_resume_is_bitwise_identical(tmp_path):
    base = [sys.executable, str(REPO / "train.py"), "model=small_cnn", "model.width=4", "model.hidden=16",
            "data=synthetic_image", "data.shape=[3,8,8]", "data.num_train=64", "data.batch_size=16",
            "optimizer=adamw", "budget=epochs", "budget.epochs=3", "deterministic=true", "logger=none"]
    env = {**os.environ, "FISHERBENCH_FAULT_AT_STEP": "6"}
    crashed = subprocess.run([*base, f"results_dir={tmp_path / 'a'}"], env=env, capture_output=True, text=True)
    assert crashed.returncode == 86, crashed.stderr
    (run_dir,) = list(iter_run_dirs(tmp_path / "a"))
    assert run_dir.summary() is None and run_dir.checkpoint_path.exists()  # unfinished, epoch-1 checkpoint
    resumed = subprocess.run([*base, f"results_dir={tmp_path / 'a'}"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr
    clean = subprocess.run([*base, f"results_dir={tmp_path / 'b'}"], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    (clean_dir,) = list(iter_run_dirs(tmp_path / "b"))
    s_resumed, s_clean = run_dir.summary(), clean_dir.summary()
    assert s_resumed["final_params_sha256"] == s_clean["final_params_sha256"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("train_s", "data_s", "wall_s")} for r in rows]
    assert strip(run_dir.metrics()) == strip(clean_dir.metrics())  # no duplicated or missing rows
    assert s_resumed["ledger"]["train_s"] > 0


def test_on_trainer_hook_sees_every_evaluation(tmp_path):
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run
    from tests.conftest import TINY

    rows = []
    cfg = compose_config([*TINY, f"results_dir={tmp_path}", "budget=steps", "budget.steps=6"])
    result = run(cfg, on_trainer=lambda trainer: setattr(trainer, "on_eval", rows.append))
    assert [r["step"] for r in rows] == [r["step"] for r in RunDir(result.run_dir).metrics()] == [4, 6]


def test_selection_on_validation_picks_the_best_val_row_and_needs_a_val_split(tmp_path):
    from fisherbench.core.errors import UserError
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.lifecycle import run

    base = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=mnist5k", "data.batch_size=64",
            "data.val_fraction=0.1", "optimizer=adam", "budget=steps", "budget.steps=30", "eval.every_epochs=null",
            "eval.every_fraction=0.2", "logger=none", f"results_dir={tmp_path / 'runs'}"]
    result = run(compose_config([*base, "selection.metric=val/acc1"]))
    s = result.summary
    rows = RunDir(result.run_dir).metrics()
    assert s["select_metric"] == "val/acc1" and s["higher_is_better"] is True
    assert s["best"]["val/acc1"] == max(r["val/acc1"] for r in rows)
    assert "test/acc1" in s["best"]  # test at the best validation row
    # the same computation selected another way is the same run (selection is not part of the identity)
    again = run(compose_config([*base, "selection.metric=val/loss"]))
    assert again.skipped and again.run_dir == result.run_dir
    with pytest.raises(UserError, match="has no 'val' split.*data.val_fraction"):
        run(compose_config([*base[:4], *base[5:], "data.val_fraction=0.0", "selection.metric=val/acc1"]))
