"""Browse a results store from the command line: `python -m fisherbench results ls|show|best|trials|wandb`.

    python -m fisherbench results ls [--store runs] [--where optimizer.name=adam] [--status completed] [--sort KEY]
    python -m fisherbench results show RUN                # config, summary and the last metric rows of one run (id or prefix)
    python -m fisherbench results best [--group-by optimizer] [--metric best_acc1]   # optimizer: the option chosen
    python -m fisherbench results trials                  # Optuna studies of the store, the best trial marked
    python -m fisherbench results wandb FILE|RUN          # an offline W&B run file, read back without a server

Every file is read through the store's validating readers: a corrupt run is listed with status `corrupt` and
its problem, and never stops the command. Mistakes a user can fix (no store, unknown run, bad filter) print a
message and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from fisherbench import use_files_only_backend
from fisherbench.core.config import TrainConfig, flatten
from fisherbench.core.errors import UserError
from fisherbench.core.scores import as_number, get_metric
from fisherbench.core.status import EXIT_USER_ERROR
from fisherbench.core.store import CorruptRunError, printable
from fisherbench.results import trials
from fisherbench.results.adhoc import _identity_items, default_metric
from fisherbench.results.runs import (
    StoredRun,
    StoreIndex,
    filter_runs,
    parse_where,
    progress_printer,
    resolve_run,
    run_epochs,
    value_text,
)
from fisherbench.results.tables import format_columns
from fisherbench.results.wandb_offline import print_run, resolve_run_files


def _out(*parts: Any, **kwargs: Any) -> None:
    """print() of text that may come from a store (run-directory names, configs, errors): control characters
    are escaped (`printable`), so a planted name cannot drive the terminal."""
    print(*(printable(p) for p in parts), **kwargs)


def default_store() -> Path:
    return Path(TrainConfig.results_dir)


def open_store(path: Optional[str]) -> StoreIndex:
    root = Path(path) if path else default_store()
    if not root.is_dir():
        raise UserError(f"no results store at {root} (give --store DIR: the results_dir the runs were written to)")
    return StoreIndex(root, progress=True)


def _fmt(v: Any, digits: int = 4) -> str:
    n = as_number(v)
    if n is None:
        return "" if v is None else str(v)
    return f"{n:.{digits}f}" if isinstance(v, float) else str(v)


def best_text(run: StoredRun) -> str:
    """The run's selected metric at its best evaluation (`test/acc1 0.9400`), from the summary."""
    s = run.summary or {}
    key = s.get("select_metric")
    value = (s.get("best") or {}).get(key) if key else None
    return f"{key} {_fmt(value)}" if key and value is not None else ""


def _train_s(run: StoredRun) -> str:
    v = as_number(((run.summary or {}).get("ledger") or {}).get("train_s"))
    if v is None:
        rows = run.rows() if run.summary is None and run.problem is None else []
        v = as_number(rows[-1].get("train_s")) if rows else None  # an unfinished run: its last evaluation
    return "" if v is None else f"{v:.1f}"


# ------------------------------------------------------------------------------------------------- ls
LS_COLUMNS = ("id", "model", "data", "optimizer", "seed", "status", "best", "train s", "epochs")


def differing_keys(runs: Sequence[StoredRun], limit: int = 3) -> list[str]:
    """Config keys (of the run identity) whose values differ between runs of the same model, data and
    optimizer (the seed aside): what tells apart two rows that would otherwise look the same."""
    groups: dict[tuple, list[dict[str, str]]] = {}
    for r in runs:
        if not r.signature.startswith("corrupt:"):
            names = tuple(value_text(r.get(k)) for k in ("model.name", "data.name", "optimizer.name"))
            groups.setdefault(names, []).append(_identity_items(r))
    keys: set[str] = set()
    for items in groups.values():
        every = {k for it in items for k in it}
        keys |= {k for k in every if len({it.get(k) for it in items}) > 1}
    return sorted(keys)[:limit]


def ls_rows(index: StoreIndex, runs: Sequence[StoredRun], metric: Optional[str] = None,
            sort: Optional[str] = None, keys: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    m = get_metric(metric) if metric else None
    header = list(LS_COLUMNS) if m is None else [*LS_COLUMNS[:6], m.name, *LS_COLUMNS[7:]]
    header[4:4] = list(keys)
    progress = progress_printer("scoring runs")
    body = []
    for i, r in enumerate(runs):
        if m is not None:
            v = m.score(r.summary or {}, r.rows()) if r.ok else None
            best = "" if v is None else f"{v:.{m.digits}f}"
            progress(i + 1, len(runs))
        else:
            best = best_text(r)
        epochs = run_epochs(r)
        body.append([r.run_id, value_text(r.get("model.name")), value_text(r.get("data.name")),
                     value_text(r.get("optimizer.name")), *[value_text(r.get(k)) for k in keys],
                     str(r.seed) if r.seed >= 0 else "?", r.status, best, _train_s(r),
                     "" if epochs is None else f"{epochs:.2f}"])
    if not sort:  # model, data, optimizer, the extra keys, seed
        n = 4 + len(keys)
        body.sort(key=lambda row: (*row[1:n], _sort_key(row[n]), row[0]))
    else:
        col = header.index(sort) if sort in header else None
        key = (lambda row: _sort_key(row[col])) if col is not None else None
        if key is None:  # a config key
            by_id = {r.run_id: r for r in runs}
            key = (lambda row: _sort_key(value_text(by_id[row[0]].get(sort))))
        body.sort(key=key)
    return header, body


def _sort_key(text: str) -> tuple:
    try:
        return (0, float(text.split()[-1]), "")
    except (ValueError, IndexError):
        return (1, 0.0, text)


def cmd_ls(args) -> int:
    index = open_store(args.store)
    where = [parse_where(w) for w in args.where or []]
    if args.status:
        where.append(parse_where(f"status={args.status}"))
    runs = filter_runs(index.runs, where)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else differing_keys(runs)
    header, body = ls_rows(index, runs, args.metric, args.sort, keys)
    unreadable = [c for c in index.corrupt] if not where else []
    body += [[c.path.name, "?", "?", "?", *["?"] * len(keys), "?", "corrupt", "", "", ""] for c in unreadable]
    if args.limit:
        body = body[: args.limit]
    _out(format_columns(header, body))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    for _ in unreadable:
        counts["corrupt"] = counts.get("corrupt", 0) + 1
    _out(f"\n{len(runs) + len(unreadable)} runs in {index.root}"
          + (f" matching {' '.join(w.text for w in where)}" if where else "") + ": "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    problems = [(r.run_dir.path, r.problem) for r in runs if r.problem] + [(c.path, c.problem) for c in unreadable]
    if problems:
        _out("\ncorrupt runs (left out of reports):")
        for path, problem in problems:
            _out(f"  {path}: {problem}")
    return 0


# ----------------------------------------------------------------------------------------------- show
find_run = resolve_run  # the one resolver of run ids, prefixes and paths (fisherbench.results.runs)


def cmd_show(args) -> int:
    index = open_store(args.store)
    found = find_run(index, args.run)
    if isinstance(found, Path):
        problem = next(c.problem for c in index.corrupt if c.path == found)
        _out(f"run {found.name}  ({found})\nstatus: corrupt\nproblem: {problem}")
        _out("files: " + ", ".join(sorted(p.name for p in found.iterdir())))
        return 0
    r = found
    _out(f"run {r.run_id}  ({r.run_dir.path})")
    _out(f"status: {r.status}" + (f"\nproblem: {r.problem}" if r.problem else ""))
    _out("\nconfig:")
    for key, value in r.config.items():  # one line per group: `optimizer: name=adam lr=0.001 ...`
        if isinstance(value, dict):
            _out(f"  {key}: " + " ".join(f"{k}={value_text(v)}" for k, v in flatten(value).items()))
        else:
            _out(f"  {key}: {value_text(value)}")
    s = r.summary
    if s:
        _out("\nsummary:")
        skip = {"best", "final", "choices", "ledger", "budget"}
        for k, v in s.items():
            if k not in skip and v not in (None, {}, []):
                _out(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        for k in ("ledger", "budget"):
            if s.get(k):
                _out(f"  {k}: " + ", ".join(f"{a}={_fmt(b, 2)}" for a, b in s[k].items() if b is not None))
        for k in ("best", "final"):
            if s.get(k):
                _out(f"  {k}: " + ", ".join(f"{a}={_fmt(b)}" for a, b in s[k].items()))
    rows = r.rows()
    _out(f"\nmetrics: {len(rows)} evaluations" + (f"; the last {min(args.rows, len(rows))}:" if rows else ""))
    if rows:
        keys = list(dict.fromkeys(k for row in rows for k in row if not k.startswith("opt/")))
        tail = rows[-args.rows:]
        _out(format_columns(keys, [[_fmt(row.get(k)) for k in keys] for row in tail]))
    if r.problem:
        _out(f"\nproblem: {r.problem}")
    try:
        tail = r.run_dir.error_tail()  # never through a link: a planted error.txt -> /etc/passwd is not shown
    except CorruptRunError as exc:
        _out(f"\nerror.txt: not shown ({exc.problem})")
    else:
        if tail is not None:
            _out("\nerror.txt (last lines):\n  " + "\n  ".join(tail.strip().splitlines()[-5:]))
    return 0


# ----------------------------------------------------------------------------------------------- best
def cmd_best(args) -> int:
    index = open_store(args.store)
    runs = filter_runs(index.runs, [parse_where(w) for w in args.where or []])
    metric = get_metric(args.metric or default_metric(runs))
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()]
    groups: dict[tuple[str, ...], list[tuple[float, StoredRun]]] = {}
    progress = progress_printer("scoring runs")
    for i, r in enumerate(runs):
        progress(i + 1, len(runs))
        if not r.ok:
            continue
        v = metric.score(r.summary or {}, r.rows())
        if v is not None and r.ok:
            groups.setdefault(tuple(value_text(r.get(k)) for k in keys), []).append((v, r))
    if not groups:
        _out(f"no finished run with {metric.name} in {index.root}")
        return 0
    sign = 1 if metric.higher_is_better else -1
    body = []
    for group in sorted(groups):
        scored = groups[group]
        v, r = max(scored, key=lambda vr: (sign * vr[0], vr[1].run_id))
        body.append([*group, r.run_id, str(r.seed), f"{v:.{metric.digits}f}", f"{len(scored)}", _train_s(r)])
    _out(f"best run per {', '.join(keys)} by {metric.label} ({'higher' if sign > 0 else 'lower'} is better):")
    _out(format_columns([*keys, "run", "seed", metric.name, "runs", "train s"], body))
    return 0


# --------------------------------------------------------------------------------------------- trials
def cmd_trials(args) -> int:
    index = open_store(args.store)
    studies, problems = trials.from_store(index.root, index)
    for p in problems:
        _out(p, file=sys.stderr)
    if not studies:
        _out(f"no Optuna studies in {index.root / '_optuna'}")
    for s in studies:
        _out(trials.console(s) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- wandb
def cmd_wandb(args) -> int:
    ref = Path(args.file)
    if ref.is_file() or ref.is_dir():
        files = resolve_run_files(args.file)
    else:  # a run id or a unique prefix of one, resolved as `show` resolves it
        found = resolve_run(open_store(args.store), args.file)
        files = resolve_run_files(str(found if isinstance(found, Path) else found.run_dir.path))
    for f in files:
        try:
            print_run(f, history=args.history)
        except ValueError as exc:  # not a W&B run file, or a damaged one: the user's file to check
            raise UserError(str(exc)) from None
    return 0


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fisherbench results", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--store", default=None, help="the results store (default: ./runs, the config's results_dir)")

    q = sub.add_parser("ls", help="runs as a table: id, model, data, optimizer, seed, status, best metric, time")
    common(q)
    q.add_argument("--where", action="append", metavar="KEY=VALUE",
                   help="keep runs whose config has KEY=VALUE (V1,V2: any of them; KEY!=V excludes); repeatable")
    q.add_argument("--status", default=None, help="keep runs with this status (completed, diverged, corrupt, ...)")
    q.add_argument("--metric", default=None, help="score each run with this metric (e.g. final_test_acc1)")
    q.add_argument("--sort", default=None, help="a column (status, best, train s, ...) or a config key")
    q.add_argument("--keys", default=None, metavar="KEY,KEY",
                   help="config keys to show as columns (default: up to 3 keys in which the runs differ)")
    q.add_argument("--limit", type=int, default=None)
    q.set_defaults(func=cmd_ls)

    q = sub.add_parser("show", help="one run: config, summary, the last metric rows, its problem if corrupt")
    common(q)
    q.add_argument("run", help="run id, a unique prefix of it, or the run directory")
    q.add_argument("--rows", type=int, default=5, help="how many of the last metric rows to print")
    q.set_defaults(func=cmd_show)

    q = sub.add_parser("best", help="the best finished run per group")
    common(q)
    q.add_argument("--group-by", default="optimizer",
                   help="config key(s), comma-separated; a config group's name (optimizer, model) groups by the "
                        "option chosen, e.g. adafisher_paper apart from adafisher (default: optimizer)")
    q.add_argument("--metric", default=None, help="metric (default: the paper's for the runs' selection metric)")
    q.add_argument("--where", action="append", metavar="KEY=VALUE")
    q.set_defaults(func=cmd_best)

    q = sub.add_parser("trials", help="the Optuna studies of the store (<store>/_optuna/*.db), best trial marked")
    common(q)
    q.set_defaults(func=cmd_trials)

    q = sub.add_parser("wandb", help="print an offline W&B run file (run-*.wandb), a run directory's, or a run id's")
    common(q)
    q.add_argument("file", help="a run-*.wandb file, a run directory, or a run id (or unique prefix) of --store")
    q.add_argument("--history", type=int, default=5, help="how many of the last history rows to print")
    q.set_defaults(func=cmd_wandb)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    use_files_only_backend()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        _out(f"[results] {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `python -m fisherbench results ls | head`
        return 0
