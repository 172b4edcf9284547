"""Faults a sweep must survive without dropping a run: a corrupt run directory, an exception while serving a
run, hostile results paths (quoted for Hydra and for the shell), and SIGTERM/SIGINT (forwarded to the runs,
which checkpoint and stop as `preempted`; the sweep records its end and exits 4)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fisherbench.core.store import RunDir
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]

HOSTILE = ["with space", "paren (v2)", "it's", 'say "hi"', "dollar $HOME and ${HOME}", "a,b", "k=v", "back\\slash",
           "trailing\\", "[x]{y}:z", "tab\tand ~user", "#hash!"]


def _spec(tmp_path: Path, *extra: str, columns: str = "{Adam: [optimizer=adam], SGD: [optimizer=sgd]}",
          seeds: str = "[0, 1, 2, 3]") -> Path:
    overrides = ", ".join(json.dumps(o) for o in [*TINY, "device=cpu", *extra])
    spec = tmp_path / "faults.yaml"
    spec.write_text(f"""
title: "faults"
seeds: {seeds}
metric: best_acc1
overrides: [{overrides}]
families: {{cnn: {{}}}}
rows: {{tiny: {{family: cnn}}}}
arms: {{main: {columns}}}
""")
    return spec


def _plant_finished(root: Path, run_id: str, seed: int) -> None:
    rd = RunDir(root / run_id)
    rd.create({"seed": seed}, {})
    rd.append_metrics({"eval": 0, "test/acc1": 0.5})
    rd.write_summary({"run_id": run_id, "status": "completed", "best": {"test/acc1": 0.5}})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISHERBENCH_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


# ------------------------------------------------------------------------------------- corrupt run dirs
def test_a_corrupt_run_is_listed_and_every_other_run_is_served(tmp_path, capsys):
    """8 planned runs, the 2nd with a valid-JSON, non-object summary (`[1,2]`): the other 7 are served, the
    corrupt one is listed by path with its problem, and the exit code says something went wrong."""
    from fisherbench.sweep.cli import main
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.spec import load_spec

    spec = _spec(tmp_path)
    root = tmp_path / "runs"
    runs = expand(load_spec(spec), ("main",))
    assert len(runs) == 8
    for r in runs:
        _plant_finished(root, r.run_id, r.seed)
    corrupt = root / runs[1].run_id
    (corrupt / "summary.json").write_text("[1, 2]")

    code = main([str(spec), "--results-dir", str(root), "--threads", "1", "--gpus", "none"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "8 runs: completed 7, corrupt 1" in out, out
    assert f"  {corrupt}  " in out and "holds a JSON list, not an object" in out
    served = [line for line in out.splitlines() if line.startswith("[") and "/8]" in line]
    assert len(served) == 8  # one line per planned run, the corrupt one included
    assert (corrupt / "summary.json").read_text() == "[1, 2]"  # nothing was changed in it
    events = [json.loads(x) for x in (root / "_sweeps" / "faults.events.jsonl").read_text().splitlines()]
    assert [e["run_id"] for e in events if e["event"] == "corrupt"] == [runs[1].run_id]
    assert events[-1]["event"] == "sweep_end" and events[-1]["exit_code"] == 1


def test_a_dry_run_lists_corrupt_runs(tmp_path, capsys):
    from fisherbench.sweep.cli import main
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.spec import load_spec

    spec = _spec(tmp_path)
    root = tmp_path / "runs"
    runs = expand(load_spec(spec), ("main",))
    for r in runs[:3]:
        _plant_finished(root, r.run_id, r.seed)
    (root / runs[0].run_id / "summary.json").write_text("[1, 2]")
    (root / runs[1].run_id / "meta.json").write_text('"not an object"')
    (root / runs[2].run_id / "metrics.jsonl").write_text("{torn")
    assert main([str(spec), "--results-dir", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{runs[0].run_id}  corrupt" in out and f"{runs[1].run_id}  corrupt" in out
    assert f"{runs[2].run_id}  completed" in out  # a torn metrics line is skipped by the reader, not corrupt


def test_an_exception_while_serving_a_run_does_not_stop_the_worker(tmp_path, monkeypatch):
    import fisherbench.sweep.local as local
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.spec import load_spec

    root = tmp_path / "runs"
    runs = expand(load_spec(_spec(tmp_path)), ("main",))
    for r in runs:
        _plant_finished(root, r.run_id, r.seed)
    real = local.store_state
    bad = {runs[0].run_id, runs[5].run_id}

    def flaky(results_dir, run_id):
        if run_id in bad:
            raise PermissionError(13, "Permission denied", str(results_dir / run_id))
        return real(results_dir, run_id)

    monkeypatch.setattr(local, "store_state", flaky)
    runner = local.LocalRunner(root, [local.Worker("cpu0", (), 1)], "faults", out=open(os.devnull, "w"))
    outcomes = runner.run(runs)
    assert [o.run.run_id for o in outcomes] == [r.run_id for r in runs]  # every planned run, in order
    assert [o.status for o in outcomes].count("error") == 2
    assert [o.status for o in outcomes].count("completed") == 6
    assert "Permission denied" in outcomes[0].error
    assert local.exit_code(outcomes) == 1
    text = local.summarize(outcomes, root)
    assert "2 run(s) did not finish" in text and runs[5].run_id in text


# -------------------------------------------------------------------------------------------- quoting
@pytest.mark.parametrize("text", HOSTILE)
def test_override_values_round_trip_through_hydra(text):
    from omegaconf import OmegaConf

    from fisherbench.sweep.overrides import override, parse_override_value

    ov = override("results_dir", f"/tmp/{text}")
    assert parse_override_value(ov) == f"/tmp/{text}"
    # what a composed config holds: Hydra's parse, then OmegaConf's (`\${` -> a literal `${`)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.create({"results_dir": OverridesParser.create().parse_override(ov).value()})
    assert cfg.results_dir == f"/tmp/{text}"


@pytest.mark.parametrize("text", ["runs", "/abs/runs.v2", "1e-3", "10", "true", "Null", "nan", "-x", "a b", "",
                                  "x=y", "'", '"', "\\"])
def test_plain_and_lookalike_strings_stay_strings(text):
    from fisherbench.sweep.overrides import override, parse_override_value

    ov = override("logger.group", text)
    assert parse_override_value(ov) == text
    assert (ov == f"logger.group={text}") == (text in ("runs", "/abs/runs.v2"))  # only plain names go unquoted


@pytest.mark.parametrize("args, message", [
    (["--results-dir", ""], "the results directory is empty"),
    (["results_dir='unclosed"], "cannot parse the override"),
    (["results_dir=a)b"], "cannot parse the override"),
    (["results_dir=${no_such_key}"], "does not resolve on its own"),
])
def test_a_bad_results_dir_is_a_user_error(tmp_path, capsys, args, message):
    from fisherbench.sweep.cli import main

    assert main([str(_spec(tmp_path)), *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_train_command_and_report_hint_survive_a_shell(tmp_path):
    from fisherbench.sweep.cli import build_parser, report_command
    from fisherbench.sweep.expand import PlannedRun
    from fisherbench.sweep.local import train_command
    from fisherbench.sweep.overrides import parse_override_value, shell_line
    from fisherbench.sweep.spec import load_spec

    root = tmp_path / "my runs (v2)" / "it's $HOME, k=v"
    run = PlannedRun(cell=None, seed=0, overrides=["experiment=quick", "seed=0"], run_id="x", config=None)
    cmd = train_command(run, root)
    assert shlex.split(shell_line(cmd)) == cmd
    (ov,) = [a for a in cmd if a.startswith("results_dir=")]
    assert parse_override_value(ov) == str(root)
    spec = load_spec(_spec(tmp_path))
    args = build_parser().parse_args([str(spec.path), "--results-dir", str(root)])
    hint = shell_line(report_command(spec, root, args, ["optimizer.lr=0.1"]))
    assert shlex.split(hint) == ["python", "-m", "fisherbench", "report", str(spec.path), "--results-dir", str(root),
                                 "optimizer.lr=0.1"]


def test_a_sweep_runs_into_a_hostile_results_dir(tmp_path, capsys):
    """The whole path: `python -m fisherbench sweep --results-dir <hostile>` and `results_dir=<hostile, Hydra-quoted>`;
    train.py receives the directory exactly (the run lands there and completes)."""
    spec = _spec(tmp_path, "budget=steps", "budget.steps=2", columns="{Adam: [optimizer=adam]}", seeds="[0]")
    root = tmp_path / "runs (v2) it's \"$HOME\" ${HOME}, a=b"
    res = subprocess.run([sys.executable, "-m", "fisherbench", "sweep", str(spec), "--results-dir", str(root), "--threads", "1",
                          "--gpus", "none"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 runs: completed 1 (1 trained now)" in res.stdout
    (d,) = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert RunDir(d).status() == "completed"
    assert RunDir(d).config()["logger"]["group"] == "faults"  # a sweep's runs share a W&B group: its name
    (hint,) = [line for line in res.stdout.splitlines() if line.startswith("[sweep] report: ")]
    assert shlex.split(hint.split(": ", 1)[1])[-2:] == ["--results-dir", str(root)]
    # the same directory given as a Hydra override (quoted as Hydra wants) names the same store
    from fisherbench.sweep.cli import main
    from fisherbench.sweep.overrides import override

    assert main([str(spec), override("results_dir", str(root)), "--dry-run", "--gpus", "none"]) == 0
    out = capsys.readouterr().out
    assert f"-> {root}\n" in out and f"{d.name}  completed" in out, out


# -------------------------------------------------------------------------------------------- signals
def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.communicate()[0]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}: {proc.communicate()[0]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_stops_the_runs_and_the_sweep_says_so(tmp_path, sig):
    """A signal to `python -m fisherbench sweep`: the running train.py gets SIGTERM, checkpoints and records `preempted`;
    nothing keeps training after the sweep exits 4; the run not yet started is listed as `not_started`; the
    events log records the sweep's end; the run directory resumes."""
    spec = _spec(tmp_path, "budget=steps", "budget.steps=1000000", "eval.every_epochs=1",
                 columns="{Adam: [optimizer=adam]}", seeds="[0, 1]")
    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "fisherbench", "sweep", str(spec), "--results-dir", str(root), "--threads", "1",
                             "--gpus", "none"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def training() -> bool:  # a metric row: the trainer is in its loop (its signal handler installed)
            return any(RunDir(d).metrics() for d in root.glob("*") if d.is_dir() and not d.name.startswith("_"))

        _wait_for(training, 240, "the first run to train", proc)
        (run_dir,) = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith("_")]
        child = int((root / f".{run_dir.name}.lock").read_text())
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, out
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the train.py child is gone (the sweep waited for it), not orphaned
    rd = RunDir(run_dir)
    assert rd.summary()["status"] == "preempted" and rd.checkpoint_path.exists()
    assert "2 runs: not_started 1, preempted 1" in out and "run the same command again" in out
    events = [json.loads(x) for x in (root / "_sweeps" / "faults.events.jsonl").read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "sweep_end" and end["interrupted"] and end["exit_code"] == 4
    assert end["signals"] == [signal.Signals(sig).name]
    from fisherbench.sweep.local import store_state

    assert store_state(root, run_dir.name) == "resume"


def test_fixed_budget_runs_are_served_before_equal_time_runs(tmp_path, monkeypatch):
    """Reference arms first: an equal-time run that starts after its reference run finished takes that run's
    measured time instead of an estimate. Outcomes stay in the planned order."""
    import fisherbench.sweep.local as local
    from fisherbench.sweep.expand import expand
    from fisherbench.sweep.spec import load_spec

    spec = tmp_path / "order.yaml"
    spec.write_text("""
title: order
seeds: [0]
overrides: [model=small_cnn, model.width=4, model.hidden=16, data=synthetic_image, 'data.shape=[3,8,8]',
            data.num_train=64, data.num_test=32, data.batch_size=16, logger=none, budget.calibration_steps=8]
rows:
  tiny: {}
arms:
  main:
    SGD: [optimizer=sgd, budget=reference, budget.reference_optimizer=adam, budget.reference_epochs=1]
    Adam: [optimizer=adam, budget=epochs, budget.epochs=1]
""")
    runs = expand(load_spec(spec), ("main",))
    assert [str(r.config.budget.mode) for r in runs] == ["reference", "epochs"]
    served = []
    monkeypatch.setattr(local.LocalRunner, "_one", lambda self, worker, run: served.append(run) or
                        local.Outcome(run, "completed"))
    runner = local.LocalRunner(tmp_path / "runs", [local.Worker("cpu0", (), 1)], "order", out=open(os.devnull, "w"))
    outcomes = runner.run(runs)
    assert [str(r.config.budget.mode) for r in served] == ["epochs", "reference"]
    assert [o.run.run_id for o in outcomes] == [r.run_id for r in runs]
