"""Optuna searches: trials train in this process with one run directory each (tags: study, trial, params),
select on validation by default, report failed trials with their error (not re-queued), prune diverged ones,
retry interrupted ones at most N times, and stop cleanly on a signal."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fisherbench.core.store import RunDir, iter_run_dirs

TINY_GPT = ["model=tiny_gpt", "model.layers=1", "model.d_model=16", "model.heads=2", "model.mlp_hidden=32",
            "model.freeze_embeddings=false", "data=synthetic_tokens", "data.seq_len=8", "data.vocab_size=32",
            "data.num_train=16", "data.num_test=8", "budget=steps", "budget.steps=4", "device=cpu", "logger=none"]
TINY_CNN = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
            "data.num_train=64", "data.num_test=32", "data.batch_size=16", "budget=steps", "budget.steps=4",
            "device=cpu", "logger=none"]


def _spec(tmp_path: Path, base: list[str], metric: str, search_extra: str = "", trials: int = 3) -> Path:
    spec = tmp_path / "srch.yaml"
    spec.write_text(f"""
title: "search"
seeds: [0]
metric: {metric}
overrides: [{", ".join(json.dumps(o) for o in base)}]
families: {{f: {{}}}}
rows: {{tiny: {{family: f}}}}
arms: {{main: {{Adam: [optimizer=adam]}}}}
search:
  row: tiny
  column: Adam
  trials: {trials}
  params:
    optimizer.lr: {{low: 1.0e-4, high: 1.0e-1, log: true}}
{search_extra}""")
    return spec


def _study(storage: str):
    import optuna

    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


# ------------------------------------------------------------------------------------- real in-process
def test_an_in_process_search_selects_on_validation_and_tags_every_run(tmp_path, capsys):
    """Trials of a language model (which has a `val` split) train in this process: the objective is the best
    validation perplexity, each trial's value is that metric recomputed from its run in the store, and each
    run's config records the study, the trial and its parameters."""
    from fisherbench.core.scores import get_metric
    from fisherbench.sweep.search import SearchRequest, run_search
    from fisherbench.sweep.spec import load_spec

    runs, storage = tmp_path / "runs", f"sqlite:///{tmp_path / 'study.db'}"
    spec = load_spec(_spec(tmp_path, TINY_GPT, "test_ppl"))
    assert run_search(SearchRequest(spec, runs, storage=storage, threads=1)) == 0
    out = capsys.readouterr().out
    assert "objective best_val_ppl (validation), minimised" in out and "trials train in this process" in out
    study = _study(storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    metric = get_metric("best_val_ppl")
    by_trial = {}
    for rd in iter_run_dirs(runs):
        tags = rd.config()["tags"]
        assert tags[:2] == ["optuna", "optuna.study=srch:tiny:Adam"]
        by_trial[int(tags[2].split("=")[1])] = (rd, tags[3])
        assert rd.status() == "completed" and rd.config()["logger"]["group"] == "srch:tiny:Adam"
    assert sorted(by_trial) == [0, 1, 2]
    for t in study.trials:
        rd, param_tag = by_trial[t.number]
        lr = float(f"{t.params['optimizer.lr']:.6g}")
        assert param_tag == f"optuna.param.optimizer.lr={lr}"
        assert t.user_attrs["run_ids"] == [rd.run_id]
        rows = rd.metrics()
        assert t.value == pytest.approx(min(r["val/ppl"] for r in rows))
        assert t.value == pytest.approx(metric.score(rd.summary(), rows))
    assert f"best: trial {study.best_trial.number} best_val_ppl" in out


def test_a_search_without_a_validation_split_refuses_to_start(tmp_path, capsys):
    from fisherbench.sweep.cli import main

    spec = _spec(tmp_path, TINY_CNN, "best_acc1")
    assert main([str(spec), "--optuna", "--results-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "no validation split" in err and "data.val_fraction=0.1" in err and "search.metric: best_acc1" in err
    assert not list(iter_run_dirs(tmp_path / "runs"))
    # choosing the test metric explicitly is allowed (the paper's protocol)
    explicit = _spec(tmp_path, TINY_CNN, "best_acc1", "  metric: best_acc1\n", trials=1)
    assert main([str(explicit), "--optuna", "--results-dir", str(tmp_path / "runs"), "--threads", "1"]) == 0
    assert "objective best_acc1 (test: no validation split" in capsys.readouterr().out


def test_a_signal_during_an_in_process_trial_checkpoints_and_requeues_it(tmp_path, monkeypatch, capsys):
    """SIGTERM while a trial trains in this process: the trainer checkpoints and records `preempted`, the search
    exits 4 and queues the trial's parameters again (not counted as a retry); the next launch resumes it."""
    from fisherbench.sweep.search import SearchRequest, run_search
    from fisherbench.sweep.spec import load_spec

    runs, storage = tmp_path / "runs", f"sqlite:///{tmp_path / 'study.db'}"
    spec = load_spec(_spec(tmp_path, [*TINY_GPT, "budget.steps=6"], "test_ppl", trials=2))
    monkeypatch.setenv("FISHERBENCH_SIGNAL_AT_STEP", "2:SIGTERM")
    assert run_search(SearchRequest(spec, runs, storage=storage, threads=1)) == 4
    assert "interrupted" in capsys.readouterr().out
    (rd,) = iter_run_dirs(runs)
    assert rd.summary()["status"] == "preempted" and rd.checkpoint_path.exists()
    monkeypatch.delenv("FISHERBENCH_SIGNAL_AT_STEP")
    assert run_search(SearchRequest(spec, runs, storage=storage, threads=1)) == 0
    study = _study(storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params and study.trials[1].user_attrs["attempt"] == 1
    resumed = RunDir(runs / study.trials[1].user_attrs["run_ids"][0])
    assert resumed.meta()["resume_count"] == 1 and resumed.summary()["steps"] == 6


# ------------------------------------------------------------------------------------- trial outcomes
class _Scripted:
    """A stand-in executor: each trial's runs end as `script(lr)` says (status, error), written to the store."""

    def __init__(self, results_dir: Path, script):
        self.results_dir, self.script, self.calls = Path(results_dir), script, []

    def __call__(self, results_dir, name, *args):
        return self

    label = "scripted"

    def runner(self, tags, group):
        executor = self

        class Runner:
            interrupted = False

            def run(self, planned):
                from fisherbench.sweep.local import Outcome

                out = []
                for r in planned:
                    lr = float(r.config.optimizer.lr)
                    status, error = executor.script(lr, len(executor.calls))
                    executor.calls.append((lr, status))
                    rd = RunDir(executor.results_dir / r.run_id)
                    if not rd.exists():
                        rd.create({"seed": r.seed, "tags": tags}, {})
                    rd.append_metrics({"eval": 0, "val/ppl": 10 + abs(math.log10(lr) + 2)})
                    rd.write_summary({"run_id": r.run_id, "status": status, "error": error})
                    out.append(Outcome(r, status, ran=True, error=error))
                return out

        return Runner()


def _run_scripted(tmp_path, monkeypatch, script, trials=4, max_retries=2):
    from fisherbench.sweep import search
    from fisherbench.sweep.spec import load_spec

    runs, storage = tmp_path / "runs", f"sqlite:///{tmp_path / 'study.db'}"
    executor = _Scripted(runs, script)
    monkeypatch.setattr(search, "_make_executor", executor)
    spec = load_spec(_spec(tmp_path, TINY_GPT, "test_ppl", trials=trials))
    code = search.run_search(search.SearchRequest(spec, runs, storage=storage, max_retries=max_retries))
    return code, _study(storage), executor


def test_failed_and_diverged_trials_are_reported_and_the_search_goes_on(tmp_path, monkeypatch, capsys):
    def script(lr, i):
        if i == 0:
            return "failed", "RuntimeError: boom in the optimizer"
        if i == 1:
            return "diverged", "non-finite training loss"
        return "completed", None

    code, study, executor = _run_scripted(tmp_path, monkeypatch, script)
    out = capsys.readouterr().out
    assert code == 0
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "PRUNED", "COMPLETE", "COMPLETE"]  # each failure once, then new parameters
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 4
    assert "boom in the optimizer" in study.trials[0].user_attrs["error"]
    assert "trial 0: failed" in out and "boom in the optimizer" in out
    assert "trial 1: pruned (diverged)" in out and "non-finite training loss" in out


def test_a_crashed_trial_is_retried_at_most_max_retries_times(tmp_path, monkeypatch, capsys):
    code, study, executor = _run_scripted(
        tmp_path, monkeypatch, lambda lr, i: ("crashed", "train.py exited -9 without a summary") if i < 3
        else ("completed", None), trials=2, max_retries=2)
    out = capsys.readouterr().out
    assert code == 0
    states = [t.state.name for t in study.trials]
    # the same parameters three times (the first try + 2 retries), given up (a finished trial), then a new one
    assert states == ["FAIL", "FAIL", "FAIL", "COMPLETE"]
    assert len({t.params["optimizer.lr"] for t in study.trials[:3]}) == 1
    assert [t.user_attrs["attempt"] for t in study.trials[:3]] == [1, 2, 3]
    assert "given up after 2 retries" in out
    from fisherbench.sweep.search import _finished

    assert _finished(study) == 2  # the retried tries do not count; the one given up does


def test_trials_failing_in_a_row_stop_the_search(tmp_path, monkeypatch, capsys):
    code, study, executor = _run_scripted(tmp_path, monkeypatch, lambda lr, i: ("oom", "CUDA out of memory"),
                                          trials=20)
    assert code == 1 and len(study.trials) == 5
    assert "5 trials in a row failed (last: oom: CUDA out of memory)" in capsys.readouterr().out


def test_a_parameter_that_does_not_compose_is_a_spec_error(tmp_path, capsys):
    from fisherbench.sweep.cli import main

    spec = _spec(tmp_path, TINY_GPT, "test_ppl", "    optimizer.no_such_option: {low: 1, high: 3}\n")
    assert main([str(spec), "--optuna", "--results-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "search.params" in err and "no_such_option" in err


def test_a_dead_sweeps_trial_is_retried_then_given_up(tmp_path):
    import optuna

    from fisherbench.sweep.search import reclaim_stale_trials

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for attempt in (1, 3):
        t = study.ask(dist)
        t.set_user_attr("host", __import__("socket").gethostname())
        t.set_user_attr("pid", dead.pid)
        t.set_user_attr("attempt", attempt)
    assert reclaim_stale_trials(study, max_retries=2) == (1, 1)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == study.trials[0].params
    assert waiting[0].user_attrs == {"retry_of": 0, "attempt": 2}
    assert "died" in study.trials[1].user_attrs["error"]
