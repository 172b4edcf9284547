"""Optuna search over one cell of a sweep spec, with SQLite storage, that survives interruption.

The spec's `search` section names the cell and the search space:

    search:
      row: ResNet-18
      column: AdaFisher
      seeds: [0]                     # each trial's value: the metric's mean over these seeds
      trials: 30                     # finished trials wanted (`--trials` overrides)
      params:
        optimizer.lr: {low: 1.0e-4, high: 0.9, log: true}
        optimizer.update_interval: {choices: [10, 50, 100]}
        optimizer.gamma: {low: 0.5, high: 0.99}
        data.batch_size: {low: 64, high: 512, step: 64, type: int}

Every trial's runs are ordinary `train.py` runs in the store (run ids by config hash), run through the local
queue. The study lives in `<results_dir>/_optuna/<spec>.db` (Optuna's own RDB storage). Re-running the same
command continues the study: a trial left RUNNING by a process that died is marked failed and its parameters
are enqueued again, so the retry has the same run ids and resumes those runs from their checkpoints.
"""
from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from fisherbench.scores import get_metric
from fisherbench.store import RunDir
from sweep.expand import PlannedRun, compose_cell, hydra_context
from sweep.spec import SpecError, SweepSpec, merge_overrides


def _distribution(name: str, spec: dict[str, Any]):
    import optuna

    if "choices" in spec:
        return optuna.distributions.CategoricalDistribution(list(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise SpecError(f"search.params.{name} needs `choices` or `low` and `high`")
    if spec.get("type") == "int" or (isinstance(spec["low"], int) and isinstance(spec["high"], int)
                                       and not spec.get("log") and spec.get("type") != "float"):
        return optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                                    step=int(spec.get("step", 1)))
    return optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                                  step=spec.get("step"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale_trials(study, reclaim_other_hosts: bool = False) -> int:
    """Fail trials whose process is gone and enqueue their parameters again. Returns how many."""
    import optuna

    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        stale = (owner_host == host and pid is not None and not _pid_alive(int(pid))) or (
            owner_host != host and reclaim_other_hosts)
        if not stale:
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.set_user_attr(f"reclaimed_{t.number}", True)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        n += 1
    return n


def _finished(study) -> int:
    import optuna

    reclaimed = {int(k.split("_", 1)[1]) for k in study.user_attrs if k.startswith("reclaimed_")}
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in reclaimed)


def _format(value: Any) -> str:
    return repr(float(f"{value:.6g}")) if isinstance(value, float) else str(value)


def trial_runs(spec: SweepSpec, cell, params: dict[str, Any], seeds: Sequence[int], user_overrides: Sequence[str],
               wct_mode: str) -> list[PlannedRun]:
    from engine.identity import run_id_of

    param_ovs = [f"{k}={_format(v)}" for k, v in params.items()]
    with hydra_context():
        composed = compose_cell(spec, cell, wct_mode, merge_overrides(user_overrides, param_ovs))
    runs = []
    for seed in seeds:
        cfg = composed.config.copy()
        cfg.seed = int(seed)
        runs.append(PlannedRun(cell, int(seed), [*composed.overrides, f"seed={seed}"], run_id_of(cfg), cfg))
    return runs


def run_search(spec: SweepSpec, results_dir: Path, user_overrides: Sequence[str] = (), trials: Optional[int] = None,
               storage: Optional[str] = None, workers_gpus: Optional[str] = None, cpu_workers: int = 1,
               wct_mode: str = "measured", reclaim: bool = False, threads: Optional[int] = None, out=None) -> int:
    import optuna

    from sweep.local import LocalRunner, make_workers

    out = out or sys.stdout
    search = spec.search
    if not search:
        print(f"[sweep] spec {spec.name} has no `search` section (see sweep/search.py)", file=sys.stderr)
        return 2
    cells = spec.cells(list(spec.arms), rows=[search["row"]], columns=[search["column"]])
    if not cells:
        print(f"[sweep] search cell {search['row']} × {search['column']} is not in {spec.name}", file=sys.stderr)
        return 2
    cell = cells[0]
    metric = get_metric(str(search.get("metric", spec.metric)))
    space = {k: _distribution(k, v) for k, v in (search.get("params") or {}).items()}
    seeds = [int(s) for s in search.get("seeds", spec.seeds[:1])]
    target = int(trials if trials is not None else search.get("trials", 20))
    results_dir = Path(results_dir)
    if storage is None:
        (results_dir / "_optuna").mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{results_dir / '_optuna' / (spec.name + '.db')}"
    study_name = f"{spec.name}:{cell.row}:{cell.column}"
    study = optuna.create_study(
        study_name=study_name, storage=optuna.storages.RDBStorage(storage), load_if_exists=True,
        direction="maximize" if metric.higher_is_better else "minimize",
        sampler=optuna.samplers.TPESampler(seed=int(search.get("sampler_seed", 0))),
    )
    reclaimed = reclaim_stale_trials(study, reclaim)
    print(f"[sweep] optuna study {study_name!r} in {storage}: {_finished(study)}/{target} trials finished"
          + (f", {reclaimed} interrupted trial(s) re-queued" if reclaimed else ""), file=out, flush=True)
    runner = LocalRunner(results_dir, make_workers(workers_gpus, cpu_workers, threads=threads), f"{spec.name}.optuna")
    while _finished(study) < target:
        trial = study.ask(space)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        runs = trial_runs(spec, cell, trial.params, seeds, user_overrides, wct_mode)
        trial.set_user_attr("run_ids", [r.run_id for r in runs])
        outcomes = runner.run(runs)
        values = []
        for o in outcomes:
            s = RunDir(results_dir / o.run.run_id).summary() or {}
            if s.get("status") in ("completed", "budget_exhausted"):
                v = metric.score(s, RunDir(results_dir / o.run.run_id).metrics())
                if v is not None and math.isfinite(v):
                    values.append(v)
        statuses = [o.status for o in outcomes]
        trial.set_user_attr("statuses", statuses)
        if runner._stop.is_set():
            print("[sweep] interrupted; re-run the same command to continue the study", file=out)
            return 130
        if len(values) == len(runs):
            value = sum(values) / len(values)
            study.tell(trial, value)
            print(f"[sweep] trial {trial.number}: {metric.name} {value:.4f} · {trial.params}", file=out, flush=True)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[sweep] trial {trial.number}: failed ({', '.join(statuses)}) · {trial.params}", file=out,
                  flush=True)
    try:
        best = study.best_trial
        print(f"[sweep] best: trial {best.number} {metric.name} {best.value:.4f} · {best.params}", file=out)
    except ValueError:
        print("[sweep] no trial finished successfully", file=out)
    return 0
