"""End to end on CPU with offline data: `python -m fisherbench sweep` (a worker killed mid-run, then the re-launch resumes
it) and `python -m fisherbench report`; two sweeps on the same spec at once never train a run twice; Optuna
continues an interrupted study; the Hydra launcher path (submitit) composes and runs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fisherbench.core.store import RunDir

REPO = Path(__file__).resolve().parents[2]

# 2 optimizers x 2 seeds on sklearn's digits (8x8, offline); Adam is the WCT reference (2 epochs), SGD gets
# the epochs that match Adam's time on this machine.
MINI = """
title: "E2E mini"
seeds: [0, 1]
metric: best_acc1
overrides: [model=small_cnn, model.width=4, model.hidden=16, data=digits, data.batch_size=64,
            eval.every_epochs=1, logger=none, device=cpu, budget.calibration_steps=4, budget.calibration_warmup=1,
            budget.calibration_tolerance=10, budget.calibration_max_s=120]
families: {cnn: {}}
rows: {small CNN: {family: cnn}}
arms: {main: {Adam: [optimizer=adam], SGD: [optimizer=sgd, optimizer.lr=0.05]}}
wct: {reference: {cnn: adam}, epochs: 2}
paper: {small CNN: {Adam: "50.0±1.0", SGD: 40.0}}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FISHERBENCH_FAULT_AT_STEP"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _sweep(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fisherbench", "sweep", *args, "--threads", "1"], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def mini(tmp_path):
    spec = tmp_path / "mini.yaml"
    spec.write_text(MINI)
    return spec, tmp_path / "runs"


def test_sweep_resumes_a_killed_run_then_report(mini, tmp_path):
    spec, runs = mini
    # 1) one run whose training process dies hard after step 30 (epoch 1 of 2 was checkpointed at step 23)
    first = _sweep(str(spec), "--results-dir", str(runs), "--columns", "Adam", "--seeds", "0",
                   FISHERBENCH_FAULT_AT_STEP="30")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "crashed" in first.stdout and "re-launch" in first.stdout
    (crashed_id,) = [p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert RunDir(runs / crashed_id).summary() is None

    # 2) the whole sweep: the crashed run resumes from its checkpoint, the other three start
    second = _sweep(str(spec), "--results-dir", str(runs), "--workers", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    # the Adam (reference) runs are served first, so the equal-time SGD runs take their measured training time
    assert "4 runs: budget_exhausted 2, completed 2 (4 trained now)" in second.stdout
    resumed = RunDir(runs / crashed_id)
    assert resumed.meta()["resume_count"] == 1 and resumed.status() == "completed"
    assert [r["epoch"] for r in resumed.metrics()] == [1.0, 2.0]  # no row lost or written twice
    assert resumed.summary()["steps"] == 2 * resumed.summary()["steps_per_epoch"]
    # 3) the report, checked against the store read independently
    out = tmp_path / "out"
    rep = subprocess.run([sys.executable, "-m", "fisherbench", "report", str(spec), "--results-dir", str(runs), "--out",
                          str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    expected: dict[str, list[float]] = {}
    sgd_epochs = []
    for d in runs.iterdir():
        rd = RunDir(d)
        if not rd.exists():
            continue
        s = rd.summary()
        expected.setdefault(s["optimizer"], []).append(100 * max(r["test/acc1"] for r in rd.metrics()))
        if s["optimizer"] == "sgd":
            assert s["reference_budget"]["method"] == "match"
            assert s["budget"]["seconds"] == RunDir(runs / s["reference_budget"]["reference_run"]).summary()["ledger"][
                "train_s"]
            sgd_epochs.append(s["epochs_done"])
    rows = {r["column"]: r for r in csv.DictReader((out / "tables" / "mini.csv").open())}
    for col, opt in (("Adam", "adam"), ("SGD", "sgd")):
        assert rows[col]["seeds_found"] == "2"
        assert float(rows[col]["mean"]) == pytest.approx(np.mean(expected[opt]), abs=1e-4)
        assert float(rows[col]["std"]) == pytest.approx(np.std(expected[opt], ddof=1), abs=1e-4)
    # equal-time arms reach fractional epochs (Table 6 from the runs); the table rounds them to 2 decimals
    assert float(rows["Adam"]["epochs"]) == 2 and float(rows["SGD"]["epochs"]) == pytest.approx(np.mean(sgd_epochs),
                                                                                                abs=0.005)
    assert f"{np.mean(expected['adam']):.2f} ± {np.std(expected['adam'], ddof=1):.2f}" in rep.stdout
    md = (out / "tables" / "mini.md").read_text()
    assert "| small CNN | Adam |" in md and "| paper (Table 6) |" not in md
    assert "ᵐ" in md and "budget=match" in md  # the epochs table says how the SGD budgets were set
    for name in ("wct", "cost"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / "mini" / f"{name}.{ext}").stat().st_size > 1000


@pytest.mark.slow
def test_two_concurrent_sweeps_train_each_run_once(mini):
    spec, runs = mini
    procs = [subprocess.Popen([sys.executable, "-m", "fisherbench", "sweep", str(spec), "--results-dir", str(runs), "--threads", "1"],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = [d for d in runs.iterdir() if d.is_dir() and not d.name.startswith("_")]
    assert len(dirs) == 4
    for d in dirs:
        rd = RunDir(d)
        # SGD's equal-time runs end `budget_exhausted` when they took the finished Adam run's time (budget=match),
        # `completed` when they calibrated (their Adam run was still training in the other sweep)
        assert rd.status().is_success and rd.meta()["resume_count"] == 0
        assert [r["epoch"] for r in rd.metrics()] == sorted({r["epoch"] for r in rd.metrics()})
        log = (runs / "_sweeps" / "logs" / f"{d.name}.log").read_text()
        # every train.py that started either trained it (once) or found it done / locked and skipped
        finished = log.count("[fisherbench] completed") + log.count("[fisherbench] budget_exhausted")
        assert finished == 1, log
    events = [json.loads(line) for line in (runs / "_sweeps" / "mini.events.jsonl").read_text().splitlines()]
    assert {e["sweep_pid"] for e in events} == {p.pid for p in procs}
    trained = [e["run_id"] for e in events if e["event"] == "end" and e["trained"]]
    assert sorted(trained) == sorted(d.name for d in dirs)  # the sweeps agree: each run trained once
    again = _sweep(str(spec), "--results-dir", str(runs))  # re-launching finds everything done
    assert again.returncode == 0 and "(0 trained now)" in again.stdout and "4 runs: " in again.stdout, again.stdout


def test_optuna_study_resumes_and_retries_an_interrupted_trial(mini, monkeypatch, capsys):
    """The search logic with a stand-in runner (no training): a trial left RUNNING by a dead process is
    failed and its parameters re-run first; the study stops at the wanted number of finished trials."""
    import optuna

    from fisherbench.sweep import search
    from fisherbench.sweep.local import Outcome
    from fisherbench.sweep.spec import load_spec

    spec_path, runs = mini
    spec_path.write_text(MINI + """
search:
  row: small CNN
  column: Adam
  seeds: [0]
  metric: best_acc1  # digits has no validation split here: select on test explicitly
  params:
    optimizer.lr: {low: 1.0e-4, high: 1.0e-1, log: true}
""")
    spec = load_spec(spec_path)
    trained: list[tuple[str, float]] = []

    class FakeRunner:
        interrupted = False
        label = "fake"

        def __init__(self, results_dir, *args):
            self.results_dir = Path(results_dir)

        def runner(self, tags, group):
            return self

        def run(self, planned):
            for r in planned:
                lr = float(r.config.optimizer.lr)
                trained.append((r.run_id, lr))
                rd = RunDir(self.results_dir / r.run_id)
                rd.create({"seed": r.seed}, {})
                rd.append_metrics({"eval": 0, "test/acc1": 1.0 - abs(np.log10(lr) + 2) / 10})  # best at lr 1e-2
                rd.write_summary({"run_id": rd.run_id, "status": "completed", "best": {}})
            return [Outcome(r, "completed", 0, ran=True) for r in planned]

    monkeypatch.setattr("fisherbench.sweep.search._make_executor", FakeRunner)
    storage = f"sqlite:///{runs.parent / 'study.db'}"
    # an earlier process (now dead) asked for a trial and died while training it
    study = optuna.create_study(study_name="mini:small CNN:Adam", storage=storage, direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask({"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    t.set_user_attr("host", __import__("socket").gethostname())
    t.set_user_attr("pid", dead.pid)
    interrupted_lr = t.params["optimizer.lr"]

    assert search.run_search(search.SearchRequest(spec, runs, trials=3, storage=storage)) == 0
    out = capsys.readouterr().out
    assert "1 interrupted trial(s) re-queued" in out
    assert trained[0][1] == pytest.approx(float(f"{interrupted_lr:.6g}"))  # the retry comes first, same params
    study = optuna.load_study(study_name="mini:small CNN:Adam", storage=storage)
    states = [s.state for s in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and states.count(optuna.trial.TrialState.FAIL) == 1
    # running it again with the same target does nothing more
    assert search.run_search(search.SearchRequest(spec, runs, trials=3, storage=storage)) == 0
    assert len(trained) == 3


def test_hydra_launcher_configs_compose(tmp_path):
    """SLURM cannot run here: check that the submitit launchers compose with our settings."""
    from fisherbench.sweep.expand import hydra_context
    from fisherbench.sweep.launchers import launcher_config

    with hydra_context():
        slurm = launcher_config("submitit_slurm", ["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600",
                                                   "hydra.launcher.gpus_per_node=1"], tmp_path)
        local = launcher_config("submitit_local", [], tmp_path)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.partition == "gpu"
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    assert str(slurm.hydra.sweep.dir) == str(tmp_path)


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(mini):
    spec, runs = mini
    res = _sweep(str(spec), "--results-dir", str(runs), "--launcher", "submitit_local", "--columns", "Adam",
                 "--seeds", "0", "hydra.launcher.timeout_min=10")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 jobs: completed 1" in res.stdout
    (d,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert RunDir(d).status() == "completed"


def test_torchrun_command_for_multi_gpu_runs(tmp_path):
    from fisherbench.sweep.expand import PlannedRun
    from fisherbench.sweep.local import Worker, make_workers, train_command

    run = PlannedRun(cell=None, seed=0, overrides=["experiment=quick", "seed=0"], run_id="x", config=None)
    cmd = train_command(run, tmp_path, nproc=4)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:8] == ["--module", "fisherbench", "train"] and cmd[-2:] == [f"results_dir={tmp_path}", "logger.progress=never"]
    workers = make_workers("0,1,2,3,4,5,6,7", gpus_per_run=4)
    assert [w.gpus for w in workers] == [("0", "1", "2", "3"), ("4", "5", "6", "7")]
    assert workers[1].env()["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and workers[1].nproc == 4
    assert Worker("cpu0", (), 1).env()["OMP_NUM_THREADS"] == "1"
    (cpu,) = make_workers("none", threads=2)
    assert cpu.gpus == () and cpu.env()["CUDA_VISIBLE_DEVICES"] == "" and cpu.env()["OMP_NUM_THREADS"] == "2"
    with pytest.raises(ValueError, match="must divide"):
        make_workers("0,1,2", gpus_per_run=2)
