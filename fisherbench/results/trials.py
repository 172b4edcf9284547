"""Optuna searches in reports: each trial's parameters, value, state and runs; the best trial marked.

`python -m fisherbench sweep SPEC --optuna` keeps its study in Optuna's own storage, `<results_dir>/_optuna/<spec>.db`
(SQLite); every trial's runs are ordinary runs in the store, and the trial records their run ids in its user
attributes (`run_ids`, `statuses`, `error`). This module reads the study through Optuna's API (read only:
nothing is asked, told or enqueued) and joins each trial with its runs in the store, so that a failed trial is
reported with its runs' statuses and error lines. A trial that the sweep re-queued after its process died
(`retry_of`) is listed as such. Runs of a search also carry the study, the trial number and its parameters in
their config `tags` (`optuna`, `optuna.study=…`, `optuna.trial=…`, `optuna.param.KEY=…`): a store copied
without its `_optuna/` folder still lists its trials, rebuilt from the runs (`from_run_tags`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import quote

import yaml

from fisherbench.core.errors import UserError
from fisherbench.core.scores import VALIDATION_COUNTERPART, get_metric
from fisherbench.core.status import Status
from fisherbench.core.store import check_optuna_storage
from fisherbench.results.adhoc import default_metric
from fisherbench.results.runs import StoreIndex
from fisherbench.results.tables import format_columns


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE, FAIL, RUNNING, PRUNED, WAITING
    value: Optional[float]
    params: dict[str, Any]
    log_params: set[str]  # parameters searched on a log scale (plotted so)
    run_ids: list[str] = field(default_factory=list)
    run_statuses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class StudyReport:
    name: str
    storage: str
    direction: str  # maximize / minimize
    trials: list[TrialRow]
    metric: Optional[str] = None  # the objective's metric, when the study records it (user attribute `metric`)

    @property
    def best(self) -> Optional[TrialRow]:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
        if not done:
            return None
        return (max if self.direction == "maximize" else min)(done, key=lambda t: t.value)  # type: ignore[arg-type]

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys(k for t in self.trials for k in t.params))


def study_files(root: Path | str) -> list[Path]:
    """The Optuna databases of a store (`<root>/_optuna/*.db`)."""
    return sorted((Path(root) / "_optuna").glob("*.db"))


def load_studies(db: Path | str, index: Optional[StoreIndex] = None,
                 study_name: Optional[str] = None) -> list[StudyReport]:
    """Every study in an Optuna SQLite file (or the one named), joined with the runs of `index`."""
    db = Path(db)
    if db.is_symlink():
        raise UserError(f"{db} is a symbolic link; a search writes a plain file there, and a link is not followed")
    if not db.is_file():
        raise UserError(f"no Optuna storage at {db} (a search writes <results_dir>/_optuna/<spec>.db)")
    check_optuna_storage(db)
    import optuna  # lazy: ~0.3 s to import; only stores with Optuna studies need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = read_only_storage(db)
    try:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
        return [_study_report(optuna, storage, db, summary, index) for summary in summaries
                if study_name is None or summary.study_name == study_name]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/Optuna raise many types for a file that is not a study
        raise UserError(f"{db} is not a readable Optuna storage ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def read_only_storage(db: Path) -> Any:
    """An Optuna storage on `db` that cannot write to it (SQLite's read-only URI mode)."""
    import optuna

    url = f"sqlite:///file:{quote(str(db.resolve()))}?mode=ro&uri=true"
    return optuna.storages.RDBStorage(url, skip_compatibility_check=False)


def _study_report(optuna: Any, storage: Any, db: Path, summary: Any,
                  index: Optional[StoreIndex]) -> StudyReport:
    """One study of the storage as a report, each trial joined with its runs in `index`."""
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    reclaimed = {int(k.split("_", 1)[1]) for k in study.user_attrs if k.startswith(("reclaimed_", "retried_"))}
    direction = "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = TrialRow(t.number, t.state.name, t.value, dict(t.params),
                       {k for k, d in t.distributions.items() if getattr(d, "log", False)},
                       [str(x) for x in t.user_attrs.get("run_ids") or []],
                       [str(x) for x in t.user_attrs.get("statuses") or []])
        if t.number in reclaimed:
            row.note = "interrupted; re-queued"
        elif t.user_attrs.get("retry_of") is not None:
            row.note = f"retry of #{t.user_attrs['retry_of']}"
        if index is not None:
            _join_runs(row, index)
        if not row.errors and t.user_attrs.get("error"):
            row.errors = [str(t.user_attrs["error"])]
        rows.append(row)
    metric = study.user_attrs.get("metric")
    return StudyReport(summary.study_name, str(db), direction, rows, str(metric) if metric else None)




def _join_runs(row: TrialRow, index: StoreIndex) -> None:
    statuses, errors = [], []
    for rid in row.run_ids:
        run = index.find(rid)
        if run is None:
            statuses.append("not in store")
            continue
        statuses.append(run.status)
        s = run.summary or {}
        if run.problem:
            errors.append(run.problem)
        elif s.get("error"):
            errors.append(str(s["error"]))
        elif run.status == Status.DIVERGED:
            d = s.get("diverged") or {}
            errors.append(f"diverged at step {d.get('step')}" if d.get("step") is not None else "diverged")
    if statuses:
        row.run_statuses = statuses
    row.errors = errors


# ------------------------------------------------------------------------------------------- rendering
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trials_rows(study: StudyReport, digits: int = 4) -> tuple[list[str], list[list[str]]]:
    best = study.best
    header = ["trial", "state", "value", *study.params, "runs", "error"]
    body = []
    for t in sorted(study.trials, key=lambda t: t.number):
        mark = " ★" if best is not None and t.number == best.number else ""
        value = "" if t.value is None else f"{t.value:.{digits}f}"
        state = t.state.lower() + (f" ({t.note})" if t.note else "")
        runs = ", ".join(f"{rid} {st}" for rid, st in zip(t.run_ids, t.run_statuses)) or ", ".join(t.run_ids)
        body.append([f"{t.number}{mark}", state, value, *[_fmt(t.params.get(p, "")) for p in study.params],
                     runs, "; ".join(t.errors)])
    return header, body


def markdown(study: StudyReport) -> str:
    header, body = trials_rows(study)
    best = study.best
    lines = [f"## Optuna study `{study.name}`", "",
             f"Storage: `{study.storage}`; {study.direction} the value (each trial: "
             f"{study.metric or 'the metric'}'s mean over its seeds). ★ best trial" + (f": #{best.number}, value {best.value:.4f}, "
                                        + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()) if best
                                        else ": none finished") + ".", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
             *["| " + " | ".join(r) + " |" for r in body], ""]
    return "\n".join(lines)


def console(study: StudyReport) -> str:
    header, body = trials_rows(study)
    objective = f"{study.direction} {study.metric}" if study.metric else study.direction
    return f"Optuna study {study.name} ({objective}; ★ best)\n" + format_columns(header, body)


def figure(study: StudyReport, out_dir: Path, name: Optional[str] = None) -> list[Path]:
    """One panel per parameter: the trial values against it (log axis where searched on a log scale), the best
    trial as a star, failed trials as crosses along the bottom."""
    # lazy: matplotlib takes ~0.5 s to import; only the figure needs it
    import matplotlib.pyplot as plt

    from fisherbench.analysis.plotting import save_figure

    params = study.params
    done = [t for t in study.trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not params or not done:
        return []
    failed = [t for t in study.trials if t.state == "FAIL"]
    best = study.best
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    lo = min(t.value for t in done)  # type: ignore[type-var]
    for ax, p in zip(axes[0], params):
        numeric = all(isinstance(t.params.get(p), (int, float)) for t in done if p in t.params)
        xs = [t.params[p] for t in done if p in t.params]
        ys = [t.value for t in done if p in t.params]
        if not numeric:
            cats = list(dict.fromkeys(map(str, xs)))
            xs = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        ax.scatter(xs, ys, s=22, color="tab:blue", label="trials")
        if failed and numeric:
            fx = [t.params[p] for t in failed if p in t.params]
            ax.scatter(fx, [lo] * len(fx), marker="x", color="tab:red", label="failed")
        if best is not None and p in best.params:
            bx = best.params[p] if numeric else cats.index(str(best.params[p]))
            ax.scatter([bx], [best.value], marker="*", s=220, color="tab:orange", edgecolor="k", zorder=3,
                       label=f"best (#{best.number})")
        if numeric and any(p in t.log_params for t in study.trials):
            ax.set_xscale("log")
        ax.set(xlabel=p, ylabel="trial value")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Optuna study {study.name}: value vs parameters ({study.direction})", fontsize=9)
    fig.tight_layout()
    safe = name or study.name.replace(":", "_").replace("/", "_").replace(" ", "_")
    return save_figure(fig, out_dir / f"trials_{safe}")


def from_store(root: Path | str, index: Optional[StoreIndex] = None,
               names: Optional[Sequence[str]] = None) -> tuple[list[StudyReport], list[str]]:
    """Every study of a store (or of the databases named `<name>.db`), and the problems of databases that
    could not be read (listed, never fatal). Studies known only from the runs' tags (a store copied without
    its `_optuna/` folder) are rebuilt from the runs."""
    out, problems = [], []
    for db in study_files(root):
        if names is None or db.stem in names:
            try:
                out += load_studies(db, index)
            except UserError as exc:
                problems.append(str(exc))
    if index is not None:
        known = {s.name for s in out}
        out += [s for s in from_run_tags(index) if s.name not in known
                and (names is None or s.name.split(":", 1)[0] in names)]
    return out, problems


# ------------------------------------------------------------------------------------------ from the runs
def trial_tags(config: dict[str, Any]) -> Optional[tuple[str, int, dict[str, Any]]]:
    """(study, trial number, params) from a run config's `tags`, as a search's runs carry them
    (`optuna`, `optuna.study=NAME`, `optuna.trial=N`, `optuna.param.KEY=VALUE`); None for other runs."""
    tags = config.get("tags")
    if not isinstance(tags, list) or "optuna" not in tags:
        return None
    study, number, params = None, None, {}
    for tag in tags:
        if not isinstance(tag, str) or "=" not in tag:
            continue
        key, value = tag.split("=", 1)
        if key == "optuna.study":
            study = value
        elif key == "optuna.trial":
            try:
                number = int(value)
            except ValueError:
                return None
        elif key.startswith("optuna.param."):
            try:
                params[key[len("optuna.param."):]] = yaml.safe_load(value)  # numbers as numbers
            except yaml.YAMLError:
                params[key[len("optuna.param."):]] = value
    return (study, number, params) if study is not None and number is not None else None


def from_run_tags(index: StoreIndex, metric: Optional[str] = None) -> list[StudyReport]:
    """Studies rebuilt from the runs of a store that carry trial tags: each trial's value is `metric`'s mean
    over its runs (default: the validation counterpart of the runs' metric where they have it, as searches
    optimise); state complete when every run finished, pruned when one diverged, else failed or running."""
    by_trial: dict[str, dict[int, tuple[dict[str, Any], list]]] = {}
    for run in index.runs:
        tagged = trial_tags(run.config)
        if tagged is None:
            continue
        study, number, params = tagged
        by_trial.setdefault(study, {}).setdefault(number, (params, []))[1].append(run)
    out = []
    for study, trials in sorted(by_trial.items()):
        runs = [r for _, rs in trials.values() for r in rs]
        m = get_metric(metric) if metric else None
        if m is None:
            base = default_metric(runs)
            val = get_metric(VALIDATION_COUNTERPART.get(base, base))
            has_val = all(val.score(r.summary or {}, r.rows()) is not None for r in runs if r.ok)
            m = val if has_val and any(r.ok for r in runs) else get_metric(base)
        rows = []
        for number, (params, rs) in sorted(trials.items()):
            statuses = [r.status for r in rs]
            values = [m.score(r.summary or {}, r.rows()) if r.ok else None for r in rs]
            if all(r.ok for r in rs) and all(v is not None for v in values):
                state, value = "COMPLETE", sum(values) / len(values)  # type: ignore[arg-type]
            else:
                value = None
                failed = any(s in (Status.FAILED, Status.OOM, Status.CORRUPT) for s in statuses)
                state = ("RUNNING" if Status.UNFINISHED in statuses
                         else "PRUNED" if Status.DIVERGED in statuses and not failed else "FAIL")
            row = TrialRow(number, state, value, params, set(), [r.run_id for r in rs], statuses)
            _join_runs(row, index)
            rows.append(row)
        out.append(StudyReport(study, f"the runs' tags in {index.root}",
                               "maximize" if m.higher_is_better else "minimize", rows, m.name))
    return out
