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

import enum
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import optuna

from fisherbench.core.errors import UserError
from fisherbench.core.scores import Metric
from fisherbench.core.status import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, SUCCESS, RunOutcome, Status
from fisherbench.core.store import check_optuna_storage, ensure_dir, refuse_link
from fisherbench.data.registry import unchanged_data
from fisherbench.engine.identity import run_id_of
from fisherbench.sweep.expand import PlannedRun, compose_cell, hydra_context
from fisherbench.sweep.inprocess import InProcessRunner
from fisherbench.sweep.local import LocalRunner, make_workers
from fisherbench.sweep.overrides import override
from fisherbench.sweep.selection import Selection, has_validation_split, score_run, selection_for
from fisherbench.sweep.spec import Cell, SpecError, SweepSpec, merge_overrides

SEARCH_KEYS = {"row", "column", "seeds", "trials", "params", "metric", "overrides", "sampler_seed"}
# the process died / was stopped: run it again
RETRY = frozenset({RunOutcome.CRASHED, Status.PREEMPTED, RunOutcome.INTERRUPTED, RunOutcome.NOT_STARTED})
PRUNE = frozenset({Status.DIVERGED})
MAX_FAILURES_IN_A_ROW = 5


def _distribution(name: str, spec: dict[str, Any]) -> optuna.distributions.BaseDistribution:
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


def _retry(study: optuna.Study, trial: Any, max_retries: int, counts: bool = True) -> bool:
    """Queue `trial`'s parameters again (same run ids: the runs resume). False when out of retries."""
    attempt = _attempt(trial) + (1 if counts else 0)
    if attempt > max_retries + 1:
        return False
    study.set_user_attr(f"retried_{trial.number}", True)
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number, "attempt": attempt},
                        skip_if_exists=False)
    return True


def reclaim_stale_trials(study: optuna.Study, reclaim_other_hosts: bool = False, max_retries: int = 2) -> tuple[int, int]:
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


def _finished(study: optuna.Study) -> int:
    """Trials that count toward the target: complete, pruned, or failed for good (not the ones retried)."""
    retried = {int(k.split("_", 1)[1]) for k in study.user_attrs if k.startswith(("retried_", "reclaimed_"))}
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in retried)


def _format(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def trial_runs(spec: SweepSpec, cell: Cell, params: dict[str, Any], seeds: Sequence[int], user_overrides: Sequence[str],
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

    def runner(self, tags: list[str], group: str) -> InProcessRunner | LocalRunner:
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


@dataclass(frozen=True)
class SearchRequest:
    """What `python -m fisherbench sweep SPEC --optuna` asks for (sweep/cli.py builds it from its options).

    `trials` (None: the spec's `search.trials`, else 20) is the number of finished trials wanted; `storage` an
    Optuna storage URL (None: `<results_dir>/_optuna/<spec>.db`); `reclaim` also fails and retries trials left
    RUNNING by sweeps on other hosts; `workers_gpus`/`cpu_workers`/`threads`/`in_process` choose where trials
    train (see `_Executor`); `max_retries` bounds how often an interrupted trial's parameters run again."""

    spec: SweepSpec
    results_dir: Path
    user_overrides: tuple[str, ...] = ()
    trials: Optional[int] = None
    storage: Optional[str] = None
    workers_gpus: Optional[str] = None
    cpu_workers: int = 1
    wct_mode: str = "measured"
    reclaim: bool = False
    threads: Optional[int] = None
    in_process: Optional[bool] = None
    max_retries: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "results_dir", Path(self.results_dir))
        object.__setattr__(self, "user_overrides", tuple(self.user_overrides))


@dataclass(frozen=True)
class SearchPlan:
    """The search section read and checked: the cell, the space, the seeds, the target and the objective."""

    cell: Cell
    space: dict[str, Any]  # parameter -> Optuna distribution
    seeds: list[int]
    search_overrides: list[str]
    target: int
    selection: Selection  # the objective: its metric and how it was chosen
    sampler_seed: int

    @property
    def metric(self) -> Metric:
        return self.selection.metric


@dataclass(frozen=True)
class _Search:
    """A search under way: what was asked, the plan, the open study and where its lines go."""

    request: SearchRequest
    plan: SearchPlan
    study: optuna.Study
    study_name: str
    storage: str  # the storage URL, as the user reads it in messages
    out: TextIO


@dataclass(frozen=True)
class _TrialResult:
    """How one trial's runs ended (statuses as plain strings: Optuna stores user attributes as JSON)."""

    runs: list[PlannedRun]
    statuses: list[str]
    errors: list[str]
    seconds: float
    interrupted: bool

    @property
    def problem(self) -> str:
        return "; ".join(self.errors) or ", ".join(self.statuses)


class _Verdict(enum.Enum):
    """What a trial's result means for the search loop."""

    COMPLETE = "complete"  # a value: the failure streak ends
    PRUNED = "pruned"  # diverged: a result too, the streak ends
    REQUEUED = "requeued"  # interrupted runs, its parameters queued again: the streak is unchanged
    FAILED = "failed"  # failed for good: the streak grows
    STOPPED = "stopped"  # the sweep itself was stopped by a signal


def run_search(request: SearchRequest, out: Optional[TextIO] = None) -> int:
    """Run the spec's search until `request.trials` trials have finished. Returns the exit code (see sweep.cli).

    Raises UserError / SpecError for problems the user can fix (exit 2).
    """
    plan = plan_search(request)
    search = open_study(request, plan, out or sys.stdout)
    retried, given_up = reclaim_stale_trials(search.study, request.reclaim, request.max_retries)
    executor = _make_executor(request.results_dir, f"{request.spec.name}.optuna", request.workers_gpus,
                              request.cpu_workers, request.threads, request.in_process)
    _announce(search, executor, retried, given_up)
    code = _run_trials(search, executor)
    return code if code is not None else _summarize(search)


# ------------------------------------------------------------------------------------------------ plan
def plan_search(request: SearchRequest) -> SearchPlan:
    """The spec's search section checked against the cell it names; the objective chosen (`_objective`)."""
    spec = request.spec
    search = _search_section(spec)
    cells = spec.cells(list(spec.arms), rows=[search["row"]], columns=[search["column"]])
    if not cells:
        raise UserError(f"search cell {search['row']} × {search['column']} is not in {spec.name}")
    cell = cells[0]
    space = {k: _distribution(k, v) for k, v in (search.get("params") or {}).items()}
    seeds = [int(s) for s in search.get("seeds", spec.seeds[:1])]
    search_overrides = [str(o) for o in search.get("overrides") or []]
    target = int(request.trials if request.trials is not None else search.get("trials", 20))
    if target < 1 or request.max_retries < 0:
        raise UserError("--trials must be >= 1 and --max-retries >= 0")
    selection = _objective(request, search, cell, seeds, search_overrides)
    return SearchPlan(cell, space, seeds, search_overrides, target, selection, int(search.get("sampler_seed", 0)))


def _objective(request: SearchRequest, search: dict[str, Any], cell: Cell, seeds: list[int],
               search_overrides: list[str]) -> Selection:
    """The metric trials are scored by: a validation metric unless the spec names one explicitly. The cell with
    the search's overrides must compose (the space's keys are checked by the first trial)."""
    spec = request.spec
    try:
        probe = trial_runs(spec, cell, {}, seeds[:1], request.user_overrides, request.wct_mode, search_overrides)[0]
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
    return selection


# ------------------------------------------------------------------------------------------------ study
def _storage_url(request: SearchRequest) -> str:
    """The study's storage: the user's URL, or the SQLite file in `<results_dir>/_optuna/`, checked first."""
    if request.storage is not None:
        return request.storage
    root = request.results_dir
    # SQLite follows links: neither _optuna/ nor the database may be one (StoreLinkError)
    db = refuse_link(ensure_dir(root / "_optuna", below=root) / (request.spec.name + ".db"), "an Optuna study")
    if db.exists() and db.stat().st_size:  # resumed: it must be Optuna's (Optuna would write its tables into any SQLite file)
        check_optuna_storage(db)
    return f"sqlite:///{db}"


def open_study(request: SearchRequest, plan: SearchPlan, out: TextIO) -> _Search:
    """Create the study or load it to resume; a study recorded with another objective is refused."""
    storage = _storage_url(request)
    study_name = f"{request.spec.name}:{plan.cell.row}:{plan.cell.column}"
    metric = plan.metric
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=optuna.storages.RDBStorage(storage), load_if_exists=True,
        direction="maximize" if metric.higher_is_better else "minimize",
        sampler=optuna.samplers.TPESampler(seed=plan.sampler_seed),
    )
    recorded = study.user_attrs.get("metric")
    if recorded is None:
        study.set_user_attr("metric", metric.name)
    elif recorded != metric.name:
        raise UserError(f"study {study_name!r} in {storage} optimises {recorded}, not {metric.name}; give another "
                        "--storage or delete that study to start over")
    return _Search(request, plan, study, study_name, storage, out)


def _announce(search: _Search, executor: _Executor, retried: int, given_up: int) -> None:
    plan, metric = search.plan, search.plan.metric
    print(f"[sweep] optuna study {search.study_name!r} in {search.storage}: {_finished(search.study)}/{plan.target} "
          f"trials finished; objective {plan.selection.label}, {'max' if metric.higher_is_better else 'min'}imised "
          f"over seeds {plan.seeds}; trials train {executor.label}"
          + (f"; {retried} interrupted trial(s) re-queued" if retried else "")
          + (f"; {given_up} interrupted trial(s) given up after {search.request.max_retries} retries"
             if given_up else ""),
          file=search.out, flush=True)


# ------------------------------------------------------------------------------------------------ trials
def _run_trials(search: _Search, executor: _Executor) -> Optional[int]:
    """Ask, train and settle trials until enough have finished. None when they have; an exit code when the
    search stops early (a signal, or `MAX_FAILURES_IN_A_ROW` failures in a row)."""
    failures_in_a_row = 0
    while _finished(search.study) < search.plan.target:
        trial = _ask(search)
        result = _train(search, executor, trial)
        verdict = _settle(search, trial, result)
        if verdict is _Verdict.STOPPED:
            return EXIT_INTERRUPTED
        if verdict is _Verdict.FAILED:
            failures_in_a_row += 1
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                print(f"[sweep] {failures_in_a_row} trials in a row failed (last: {result.problem}); stopping: the "
                      "cause is probably not the parameters. Fix it and run the same command again.",
                      file=search.out, flush=True)
                return EXIT_RUN_FAILED
        elif verdict is not _Verdict.REQUEUED:
            failures_in_a_row = 0
    return None


def _ask(search: _Search) -> Any:
    """A new trial (or a queued retry), marked with this process so a later sweep can tell if it died."""
    trial = search.study.ask(search.plan.space)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("attempt", _attempt(trial))
    return trial


def _train(search: _Search, executor: _Executor, trial: Any) -> _TrialResult:
    """Train the trial's runs (one per seed) and record their statuses and errors on the trial."""
    request, plan = search.request, search.plan
    try:
        runs = trial_runs(request.spec, plan.cell, trial.params, plan.seeds, request.user_overrides,
                          request.wct_mode, plan.search_overrides)
    except ValueError as exc:  # a parameter of the space does not compose: the spec is wrong
        trial.set_user_attr("error", str(exc))
        search.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise UserError(f"search.params: {exc}") from None
    trial.set_user_attr("run_ids", [r.run_id for r in runs])
    t0 = time.time()
    runner = executor.runner(trial_tags(search.study_name, trial.number, trial.params), search.study_name)
    outcomes = runner.run(runs)
    statuses = [str(o.status) for o in outcomes]
    errors = [f"{o.status}: {o.error}" for o in outcomes if o.error]
    trial.set_user_attr("statuses", statuses)
    if errors:
        trial.set_user_attr("error", "; ".join(errors)[:2000])
    return _TrialResult(runs, statuses, errors, time.time() - t0, bool(runner.interrupted))


def _settle(search: _Search, trial: Any, result: _TrialResult) -> _Verdict:
    """Tell the study how the trial ended, print its line, and queue its parameters again where that helps."""
    if result.interrupted:
        return _settle_stopped(search, trial)
    if all(s in SUCCESS for s in result.statuses):
        return _settle_complete(search, trial, result)
    if any(s in PRUNE for s in result.statuses) and not any(s in RETRY for s in result.statuses):
        search.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _say(search, trial, f"pruned (diverged) · {_params(trial)} · {'; '.join(result.errors)}")
        return _Verdict.PRUNED
    return _settle_failed(search, trial, result)


def _settle_stopped(search: _Search, trial: Any) -> _Verdict:
    search.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    _retry(search.study, trial, search.request.max_retries, counts=False)
    _say(search, trial, f"interrupted · {_params(trial)}\n[sweep] stopped by a signal (exit 4): run the same "
                        "command again to continue the study (this trial's runs resume)")
    return _Verdict.STOPPED


def _settle_complete(search: _Search, trial: Any, result: _TrialResult) -> _Verdict:
    """The trial's value: the objective's mean over its runs, each scored from the store."""
    metric = search.plan.metric
    values = [score_run(search.request.results_dir, r.run_id, metric) for r in result.runs]
    scores = [v for v in values if v is not None]
    if len(scores) < len(values):
        trial.set_user_attr("error", f"finished runs have no {metric.name}")
        search.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise UserError(f"trial {trial.number}'s runs finished but have no {metric.name} ({metric.label}); "
                        f"runs {', '.join(r.run_id for r in result.runs)}. Does the data have the split it needs?")
    value = sum(scores) / len(scores)
    search.study.tell(trial, value)
    _say(search, trial, f"{metric.name} {value:.{metric.digits}f} · {_params(trial)} · {result.seconds:.1f} s")
    return _Verdict.COMPLETE


def _settle_failed(search: _Search, trial: Any, result: _TrialResult) -> _Verdict:
    """FAIL; runs whose process died or was stopped have their parameters queued again, within the retries."""
    search.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if not any(s in RETRY for s in result.statuses):
        _say(search, trial, f"failed · {_params(trial)} · {result.problem}")
        return _Verdict.FAILED
    again = _retry(search.study, trial, search.request.max_retries)
    _say(search, trial, f"{', '.join(result.statuses)} · {_params(trial)} · "
                        + ("queued again (its runs resume)" if again
                           else f"given up after {search.request.max_retries} retries")
                        + (f" · {'; '.join(result.errors)}" if result.errors else ""))
    return _Verdict.REQUEUED if again else _Verdict.FAILED


def _params(trial: Any) -> str:
    return ", ".join(f"{k}={_format(v)}" for k, v in trial.params.items())


def _say(search: _Search, trial: Any, text: str) -> None:
    """One line about `trial`: its number (and attempt, from the second on), then `text`."""
    head = f"[sweep] trial {trial.number}" + (f" (attempt {_attempt(trial)})" if _attempt(trial) > 1 else "")
    print(f"{head}: {text}", file=search.out, flush=True)


# ------------------------------------------------------------------------------------------------ summary
def _summarize(search: _Search) -> int:
    """The best trial, or EXIT_RUN_FAILED when no trial finished successfully."""
    metric = search.plan.metric
    try:
        best = search.study.best_trial
    except ValueError:
        print("[sweep] no trial finished successfully", file=search.out)
        return EXIT_RUN_FAILED
    print(f"[sweep] best: trial {best.number} {metric.name} {best.value:.{metric.digits}f} · {best.params}",
          file=search.out)
    return EXIT_OK


__all__ = ["SearchRequest", "SearchPlan", "run_search", "plan_search", "open_study", "trial_runs", "trial_tags",
           "reclaim_stale_trials"]
