"""Optuna search over one cell of a sweep spec, with SQLite storage, that survives interruption.

The spec's `search` section names the cell and the search space:

    search:
      row: ResNet-18
      column: AdaFisher
      seeds: [0]                     # each trial's value: the metric's mean over these seeds
      trials: 30                     # finished trials wanted (`--trials` overrides)
      metric: best_val_acc1          # the objective (default: the validation counterpart of the spec's metric)
      overrides: [data.val_fraction=0.1]   # for every trial, after the cell's own
      params:
        optimizer.lr: {low: 1.0e-4, high: 0.9, log: true}
        optimizer.update_interval: {choices: [10, 50, 100]}
        optimizer.gamma: {low: 0.5, high: 0.99}
        data.batch_size: {low: 64, high: 512, step: 64, type: int}

The objective is a validation metric (`sweep.selection`): a search refuses to start on a cell without a
validation split unless `search.metric` names a test metric explicitly (that tunes on the test set).

Every trial's runs are ordinary runs in the store (run ids by config hash), trained in this process
(`--in-process`, the default with one CPU worker: no start-up cost per trial) or as `train.py` processes
through the local queue. Each run's config `tags` record the study, the trial number and its parameters, so
a report can list the trials from the store alone. The study lives in `<results_dir>/_optuna/<spec>.db`
(Optuna's own RDB storage).

What each trial ends as:
- its runs finished: COMPLETE with the metric's mean over the seeds;
- a run diverged: PRUNED (a result: these parameters make training blow up), with the error;
- a run failed, ran out of memory, or its config was refused: FAIL with the error; the search goes on with new
  parameters (after `MAX_FAILURES_IN_A_ROW` such trials in a row it stops: the cause is not the parameters);
- a run crashed (its process died) or was preempted: FAIL, and the same parameters are queued again, at most
  `--max-retries` times (the retry resumes the runs from their checkpoints);
- the sweep itself was stopped (SIGTERM/SIGINT): FAIL and queued again without using up a retry; exit 4.
Re-running the same command continues the study: a trial left RUNNING by a sweep process that died is
failed and retried the same way.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna

from fisherbench.core.errors import UserError
from fisherbench.core.status import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, SUCCESS, RunOutcome, Status
from fisherbench.core.store import check_optuna_storage, ensure_dir, refuse_link
from fisherbench.data.registry import unchanged_data
from fisherbench.engine.identity import run_id_of
from fisherbench.sweep.expand import PlannedRun, compose_cell, hydra_context
from fisherbench.sweep.inprocess import InProcessRunner
from fisherbench.sweep.local import LocalRunner, make_workers
from fisherbench.sweep.overrides import override
from fisherbench.sweep.selection import has_validation_split, score_run, selection_for
from fisherbench.sweep.spec import SpecError, SweepSpec, merge_overrides

SEARCH_KEYS = {"row", "column", "seeds", "trials", "params", "metric", "overrides", "sampler_seed"}
# the process died / was stopped: run it again
RETRY = frozenset({RunOutcome.CRASHED, Status.PREEMPTED, RunOutcome.INTERRUPTED, RunOutcome.NOT_STARTED})
PRUNE = frozenset({Status.DIVERGED})
MAX_FAILURES_IN_A_ROW = 5


def _distribution(name: str, spec: dict[str, Any]):
    if not isinstance(spec, dict):
        raise SpecError(f"search.params.{name} must be a mapping with `choices` or `low`/`high`")
    if "choices" in spec:
        return optuna.distributions.CategoricalDistribution(list(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise SpecError(f"search.params.{name} needs `choices` or `low` and `high`")
    try:
        if spec.get("type") == "int" or (isinstance(spec["low"], int) and isinstance(spec["high"], int)
                                           and not spec.get("log") and spec.get("type") != "float"):
            return optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]),
                                                        log=bool(spec.get("log")), step=int(spec.get("step", 1)))
        return optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]),
                                                      log=bool(spec.get("log")), step=spec.get("step"))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"search.params.{name}: {exc}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _attempt(trial: Any) -> int:
    return int(trial.user_attrs.get("attempt", 1))


def _retry(study, trial: Any, max_retries: int, counts: bool = True) -> bool:
    """Queue `trial`'s parameters again (same run ids: the runs resume). False when out of retries."""
    attempt = _attempt(trial) + (1 if counts else 0)
    if attempt > max_retries + 1:
        return False
    study.set_user_attr(f"retried_{trial.number}", True)
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number, "attempt": attempt},
                        skip_if_exists=False)
    return True


def reclaim_stale_trials(study, reclaim_other_hosts: bool = False, max_retries: int = 2) -> tuple[int, int]:
    """Fail trials whose sweep process is gone and queue their parameters again (at most `max_retries` times
    per parameter set). Returns (retried, given up)."""
    host = socket.gethostname()
    retried = given_up = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        stale = (owner_host == host and pid is not None and not _pid_alive(int(pid))) or (
            owner_host != host and reclaim_other_hosts)
        if not stale:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", f"its sweep process ({owner_host}:{pid}) died")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if _retry(study, t, max_retries):
            retried += 1
        else:
            given_up += 1
    return retried, given_up


def _finished(study) -> int:
    """Trials that count toward the target: complete, pruned, or failed for good (not the ones retried)."""
    retried = {int(k.split("_", 1)[1]) for k in study.user_attrs if k.startswith(("retried_", "reclaimed_"))}
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in retried)


def _format(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def trial_runs(spec: SweepSpec, cell, params: dict[str, Any], seeds: Sequence[int], user_overrides: Sequence[str],
               wct_mode: str, search_overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """The runs of one trial: the cell with the search's overrides, the user's, then the trial's parameters."""
    param_ovs = [override(k, _format(v)) for k, v in params.items()]
    with hydra_context():
        composed = compose_cell(spec, cell, wct_mode, merge_overrides(search_overrides, user_overrides, param_ovs))
    runs = []
    with unchanged_data():  # the seeds share the data: its content is checked once
        for seed in seeds:
            cfg = composed.config.copy()
            cfg.seed = int(seed)
            runs.append(PlannedRun(cell, int(seed), [*composed.overrides, f"seed={seed}"], run_id_of(cfg), cfg))
    return runs


def trial_tags(study_name: str, number: int, params: dict[str, Any]) -> list[str]:
    """What a trial's runs carry in their config `tags` (not part of the run id)."""
    return ["optuna", f"optuna.study={study_name}", f"optuna.trial={number}",
            *(f"optuna.param.{k}={_format(v)}" for k, v in params.items())]


def _search_section(spec: SweepSpec) -> dict[str, Any]:
    search = spec.search
    if not search:
        raise UserError(f"spec {spec.name} has no `search` section (see fisherbench/sweep/search.py)")
    if not isinstance(search, dict):
        raise SpecError(f"spec {spec.name}: `search` must be a mapping")
    unknown = set(search) - SEARCH_KEYS
    if unknown:
        raise SpecError(f"spec {spec.name}: unknown search keys {sorted(unknown)} (known: {sorted(SEARCH_KEYS)})")
    for key in ("row", "column", "params"):
        if not search.get(key):
            raise SpecError(f"spec {spec.name}: search needs `{key}`")
    return search


class _Executor:
    """Chooses how trials train: in this process, or through the local queue of train.py processes."""

    def __init__(self, results_dir: Path, name: str, workers_gpus: Optional[str], cpu_workers: int,
                 threads: Optional[int], in_process: Optional[bool]) -> None:
        try:
            self.workers = make_workers(workers_gpus, cpu_workers, 1, threads)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        single = len(self.workers) == 1
        if in_process is None:
            in_process = single and not self.workers[0].gpus
        if in_process and not single:
            raise UserError("--in-process trains one run at a time: give one worker (--workers 1 or one GPU)")
        self.in_process = in_process
        self.results_dir, self.name = results_dir, name

    def runner(self, tags: list[str], group: str):
        if self.in_process:
            w = self.workers[0]
            device = f"cuda:{w.gpus[0]}" if w.gpus else ("cpu" if w.hide_gpus else None)
            return InProcessRunner(self.results_dir, self.name, device=device, threads=w.threads,
                                   overrides={"tags": tags, "logger.group": group})
        return LocalRunner(self.results_dir, self.workers, self.name,
                           extra_args=[override("tags", tags), override("logger.group", group)])

    @property
    def label(self) -> str:
        if self.in_process:
            return "in this process (" + (self.workers[0].name) + ")"
        return "as train.py processes on " + ", ".join(w.name for w in self.workers)


def _make_executor(*args: Any) -> _Executor:  # a seam for tests
    return _Executor(*args)


def run_search(spec: SweepSpec, results_dir: Path, user_overrides: Sequence[str] = (), trials: Optional[int] = None,
               storage: Optional[str] = None, workers_gpus: Optional[str] = None, cpu_workers: int = 1,
               wct_mode: str = "measured", reclaim: bool = False, threads: Optional[int] = None,
               in_process: Optional[bool] = None, max_retries: int = 2, out=None) -> int:
    """Run the spec's search until `trials` trials have finished. Returns the exit code (see sweep.cli).

    Raises UserError / SpecError for problems the user can fix (exit 2).
    """
    out = out or sys.stdout
    search = _search_section(spec)
    cells = spec.cells(list(spec.arms), rows=[search["row"]], columns=[search["column"]])
    if not cells:
        raise UserError(f"search cell {search['row']} × {search['column']} is not in {spec.name}")
    cell = cells[0]
    space = {k: _distribution(k, v) for k, v in (search.get("params") or {}).items()}
    seeds = [int(s) for s in search.get("seeds", spec.seeds[:1])]
    search_overrides = [str(o) for o in search.get("overrides") or []]
    target = int(trials if trials is not None else search.get("trials", 20))
    if target < 1 or max_retries < 0:
        raise UserError("--trials must be >= 1 and --max-retries >= 0")

    # the cell with the search's overrides must compose (the space's keys are checked by the first trial)
    try:
        probe = trial_runs(spec, cell, {}, seeds[:1], user_overrides, wct_mode, search_overrides)[0]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    selection = selection_for(spec.metric, probe.config, search.get("metric") or spec.select)
    if not selection.on_validation and not (search.get("metric") or spec.select):
        raise UserError(
            f"spec {spec.name}: a search selects on a validation metric, but cell {cell.row} × {cell.column} has "
            f"no validation split. Add `data.val_fraction=0.1` to `search.overrides` (or to the command line), "
            f"or set `search.metric: {spec.metric}` to tune on the test set as the paper did.")
    if selection.on_validation and not has_validation_split(probe.config):
        raise UserError(
            f"spec {spec.name}: the objective {selection.metric.name} needs a validation split, which cell "
            f"{cell.row} × {cell.column} does not have; add `data.val_fraction=0.1` to `search.overrides`.")
    metric = selection.metric

    results_dir = Path(results_dir)
    if storage is None:  # SQLite follows links: neither _optuna/ nor the database may be one (StoreLinkError)
        db = refuse_link(ensure_dir(results_dir / "_optuna", below=results_dir) / (spec.name + ".db"),
                         "an Optuna study")
        if db.exists() and db.stat().st_size:  # resumed: it must be Optuna's (Optuna would write its tables into any SQLite file)
            check_optuna_storage(db)
        storage = f"sqlite:///{db}"
    study_name = f"{spec.name}:{cell.row}:{cell.column}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=optuna.storages.RDBStorage(storage), load_if_exists=True,
        direction="maximize" if metric.higher_is_better else "minimize",
        sampler=optuna.samplers.TPESampler(seed=int(search.get("sampler_seed", 0))),
    )
    recorded = study.user_attrs.get("metric")
    if recorded is None:
        study.set_user_attr("metric", metric.name)
    elif recorded != metric.name:
        raise UserError(f"study {study_name!r} in {storage} optimises {recorded}, not {metric.name}; give another "
                        "--storage or delete that study to start over")
    retried, given_up = reclaim_stale_trials(study, reclaim, max_retries)
    executor = _make_executor(results_dir, f"{spec.name}.optuna", workers_gpus, cpu_workers, threads, in_process)
    print(f"[sweep] optuna study {study_name!r} in {storage}: {_finished(study)}/{target} trials finished; "
          f"objective {selection.label}, {'max' if metric.higher_is_better else 'min'}imised over seeds {seeds}; "
          f"trials train {executor.label}"
          + (f"; {retried} interrupted trial(s) re-queued" if retried else "")
          + (f"; {given_up} interrupted trial(s) given up after {max_retries} retries" if given_up else ""),
          file=out, flush=True)

    failures_in_a_row, last_error = 0, None
    while _finished(study) < target:
        trial = study.ask(space)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("attempt", _attempt(trial))
        try:
            runs = trial_runs(spec, cell, trial.params, seeds, user_overrides, wct_mode, search_overrides)
        except ValueError as exc:  # a parameter of the space does not compose: the spec is wrong
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise UserError(f"search.params: {exc}") from None
        trial.set_user_attr("run_ids", [r.run_id for r in runs])
        t0 = time.time()
        runner = executor.runner(trial_tags(study_name, trial.number, trial.params), study_name)
        outcomes = runner.run(runs)
        statuses = [str(o.status) for o in outcomes]  # plain strings: Optuna stores user attributes as JSON
        errors = [f"{o.status}: {o.error}" for o in outcomes if o.error]
        trial.set_user_attr("statuses", statuses)
        if errors:
            trial.set_user_attr("error", "; ".join(errors)[:2000])
        head = f"[sweep] trial {trial.number}" + (f" (attempt {_attempt(trial)})" if _attempt(trial) > 1 else "")
        params = ", ".join(f"{k}={_format(v)}" for k, v in trial.params.items())
        took = f"{time.time() - t0:.1f} s"

        if runner.interrupted:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            _retry(study, trial, max_retries, counts=False)
            print(f"{head}: interrupted · {params}\n[sweep] stopped by a signal (exit 4): run the same command "
                  "again to continue the study (this trial's runs resume)", file=out, flush=True)
            return EXIT_INTERRUPTED
        if all(s in SUCCESS for s in statuses):
            values = [score_run(results_dir, r.run_id, metric) for r in runs]
            if any(v is None for v in values):
                trial.set_user_attr("error", f"finished runs have no {metric.name}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise UserError(f"trial {trial.number}'s runs finished but have no {metric.name} ({metric.label}); "
                                f"runs {', '.join(r.run_id for r in runs)}. Does the data have the split it needs?")
            value = sum(values) / len(values)
            study.tell(trial, value)
            failures_in_a_row = 0
            print(f"{head}: {metric.name} {value:.{metric.digits}f} · {params} · {took}", file=out, flush=True)
            continue
        if any(s in PRUNE for s in statuses) and not any(s in RETRY for s in statuses):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            failures_in_a_row = 0
            print(f"{head}: pruned (diverged) · {params} · {'; '.join(errors)}", file=out, flush=True)
            continue
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if any(s in RETRY for s in statuses):
            again = _retry(study, trial, max_retries)
            print(f"{head}: {', '.join(statuses)} · {params} · "
                  + ("queued again (its runs resume)" if again else f"given up after {max_retries} retries")
                  + (f" · {'; '.join(errors)}" if errors else ""), file=out, flush=True)
            if again:
                continue
        else:
            print(f"{head}: failed · {params} · {'; '.join(errors) or ', '.join(statuses)}", file=out, flush=True)
        failures_in_a_row += 1
        last_error = "; ".join(errors) or ", ".join(statuses)
        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            print(f"[sweep] {failures_in_a_row} trials in a row failed (last: {last_error}); stopping: the cause is "
                  "probably not the parameters. Fix it and run the same command again.", file=out, flush=True)
            return EXIT_RUN_FAILED
    try:
        best = study.best_trial
        print(f"[sweep] best: trial {best.number} {metric.name} {best.value:.{metric.digits}f} · {best.params}",
              file=out)
    except ValueError:
        print("[sweep] no trial finished successfully", file=out)
        return EXIT_RUN_FAILED
    return EXIT_OK


__all__ = ["run_search", "trial_runs", "trial_tags", "reclaim_stale_trials"]
