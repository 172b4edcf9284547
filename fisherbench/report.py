"""Tables and figures from the results store: the paper's tables from sweep specs, or any comparison of the
runs a store holds, without a spec.

    python -m fisherbench report quick                      # one sweep spec (fisherbench/configs/sweep/<name>.yaml or a path)
    python -m fisherbench report table2_cifar10 --arms main,fixed --rows ResNet-18
    python -m fisherbench report all                        # every spec, plus Table 6 and a reproduction summary
    python -m fisherbench report fig1_iris                  # Figure 1 (trains its own tiny models, offline)
    python -m fisherbench report --store runs --group-by optimizer.name --rows model.name \\
        --metric final_test_acc1 --target 'test/acc1>=0.9'   # no spec: whatever runs the store holds

With a spec, positional `key=value` arguments are the Hydra overrides given to `python -m fisherbench sweep`, so the report
finds the runs that sweep launched; `--rows`/`--columns` select spec rows and columns by name. Without a spec
(`--group-by`), columns are the values of the group-by key, rows the values of the `--rows` keys
(`--rows model.name=small_cnn,resnet18_cifar` also filters), `--columns adam,sgd` filters and orders the
columns, and `--where KEY=VALUE` filters runs by any config key. `--target` adds time-to-target per cell and
a performance profile across rows. Writes Markdown, CSV and LaTeX under `<out>/tables/` and PNG+PDF figures
under `<out>/figures/<name>/`. See docs/reports.md.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from fisherbench import use_files_only_backend
from fisherbench.core import plugins
from fisherbench.core.config import TrainConfig
from fisherbench.core.errors import UserError
from fisherbench.core.scores import Target, get_metric, parse_target
from fisherbench.results import profiles, trials
from fisherbench.results import tables as render
from fisherbench.results.adhoc import AdhocRequest, build, parse_key_values
from fisherbench.results.report import (
    CellInput,
    ReportSpec,
    StoreIndex,
    TableResult,
    collect,
    grid_key,
    reproduction_summary,
)
from fisherbench.results.runs import parse_where, progress_printer
from fisherbench.sweep.expand import compose_cell, hydra_context
from fisherbench.sweep.spec import SpecError, available_specs, load_spec

FIGURE_ONLY = ("fig1_iris",)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _csv(text: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


# ------------------------------------------------------------------------------------ spec -> plain data
def report_input(spec, arm_sets: Sequence[str], overrides: Sequence[str] = (), wct: str = "measured",
                 rows: Optional[Sequence[str]] = None, columns: Optional[Sequence[str]] = None,
                 progress=None) -> ReportSpec:
    """A sweep spec's cells composed exactly as the sweep launches them, as the report's plain input."""
    from fisherbench.engine.identity import (
        resolved_dict,  # lazy: engine pulls in torch (~4 s); --group-by reports need none
    )

    for metric in spec.metrics():  # a metric name is checked before anything is composed
        try:
            get_metric(metric)
        except UserError as exc:
            raise UserError(f"sweep spec {spec.path or spec.name}: {exc}") from None
    cells = spec.cells(arm_sets, rows, columns)
    if columns:
        known = {c for _, c in spec.columns(arm_sets)}
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise SpecError(f"sweep spec {spec.path or spec.name}: no column {unknown[0]!r} in arm sets "
                            f"{', '.join(arm_sets)} (columns: {', '.join(sorted(known))})")
    if not cells:
        raise SpecError(f"sweep spec {spec.path or spec.name}: no cells selected")
    inputs = []
    with hydra_context():
        for i, cell in enumerate(cells):
            try:
                cc = compose_cell(spec, cell, wct, overrides)
            except ValueError as exc:  # the expander's "does not compose (overrides): why" / unscalable value
                raise UserError(f"sweep spec {spec.path or spec.name}: {exc}") from None
            inputs.append(CellInput(cell.row, cell.column, cell.arm_set, resolved_dict(cc.config), dict(cell.tags)))
            if progress is not None:
                progress(i + 1, len(cells))
    paper = {}
    for metric in spec.metrics():
        for c in inputs:
            pv = spec.paper_value(c.row, c.column, metric)
            if pv is not None:
                paper[(metric, c.row, c.column)] = pv
    paper_epochs = {col: n for col in dict.fromkeys(c.column for c in inputs)
                    if (n := spec.paper_epochs(col)) is not None}
    # a grid (rows = values of one setting) marks each column's best row; other tables each row's best column.
    # Specs may say so (`grid: true`, and `select:` the metric that picks); else the rows' configs tell.
    key = grid_key(inputs)
    grid = bool(getattr(spec, "grid", False)) or key is not None
    label = (f"the best {key} of each column" if key else "the best row of each column") if grid \
        else "the best of each row"
    return ReportSpec(name=spec.name, title=spec.title, seeds=list(spec.seeds), metrics=spec.metrics(),
                      cells=inputs, paper=paper, paper_epochs=paper_epochs, wct=bool(spec.wct),
                      notes=list(spec.notes), best="column" if grid else "row", best_label=label,
                      select=getattr(spec, "select", None), baseline=getattr(spec, "baseline", None),
                      margin=dict(getattr(spec, "equivalence_margin", None) or {}))


def with_search_result(data: ReportSpec, spec, index: StoreIndex) -> ReportSpec:
    """A search spec's searched cell as the search left it: its runs are the best finished trial's.

    Every trial overrides the searched parameters, so no run ever has the cell's composed (unsearched) config:
    reporting that config would say `missing 0/1` after a successful search. The cell takes the best trial's
    config (chosen by the study's objective, on validation) and its column says which trial and parameters; the
    study's own table follows in `<name>_trials.md`. Without a finished trial the cell stays as composed."""
    search = spec.search or {}
    row, column = str(search.get("row")), str(search.get("column"))
    try:
        studies, _ = trials.from_store(index.root, index, [spec.name])
    except UserError:
        return data
    mine = [s for s in studies if s.name == f"{spec.name}:{row}:{column}"] or studies  # the sweep's study name
    best = next((s.best for s in mine if s.best is not None), None)
    run = next((r for rid in (best.run_ids if best else []) if (r := index.find(rid)) is not None), None)
    if best is None or run is None:
        return data
    params = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                       for k, v in best.params.items())
    finished = sum(t.state == "COMPLETE" for s in mine for t in s.trials)
    label = f"{column} (Optuna best of {finished}: #{best.number}, {params})"
    cells = [CellInput(c.row, label, c.arm_set, {**run.config, "seed": c.config.get("seed", 0)}, c.tags)
             if (c.row, c.column) == (row, column) else c for c in data.cells]
    note = (f"{row} × {column}: the runs of the search's best trial (#{best.number}, selected on "
            f"{next((s.metric for s in mine if s.metric), 'the objective')}); its test value is the best of "
            "several trials, so it is optimistic.")
    paper = {(m, r, label if (r, c) == (row, column) else c): v for (m, r, c), v in data.paper.items()}
    return replace(data, cells=cells, notes=[*data.notes, note], paper=paper)


# ----------------------------------------------------------------------------------------------- output
def write_tables(name: str, tables: list[TableResult], index: StoreIndex, out: Path, figures: bool,
                 verbose: bool, target: Optional[Target], tau_max: float) -> list[Path]:
    """Markdown/CSV/LaTeX (+ time to target and profile, + corrupt runs) and the figures of one report."""
    md = render.markdown(tables)
    prof = None
    if target is not None:
        prof = profiles.profile(tables[0], target, tau_max=tau_max)
        md += "\n" + profiles.markdown(prof)
        if (warning := profiles.test_metric_warning(target)) is not None:
            print(f"[report] {warning}", file=sys.stderr)
    corrupt = index.corrupt_runs()
    if corrupt:
        md += f"\n## Corrupt runs in the store ({len(corrupt)}: left out, listed by path)\n\n" + "\n".join(
            f"- `{c.path}`: {c.problem}" for c in corrupt) + "\n"
    files = [_write(out / "tables" / f"{name}.md", md),
             _write(out / "tables" / f"{name}.csv", render.csv_text(tables)),
             _write(out / "tables" / f"{name}.tex", render.latex(tables))]
    if figures and any(c.seeds for c in tables[0].cells):
        from fisherbench.results import figures as fig  # lazy: matplotlib takes ~0.5 s; --no-figures skips it

        fig_dir = out / "figures" / name
        # curves over time and epochs, cost, and where the runs allow it the stability panels and F/λ spread
        files += fig.all_figures(tables[0], fig_dir)
        key = target.key if target is not None else tables[0].metric.key
        if key:
            files += fig.over_time(tables[0], key, fig_dir, target)
        if prof is not None:
            files += fig.profile(prof, fig_dir)
    if verbose:
        print(f"\n{tables[0].spec.title}\n")
        for t in tables:
            print(f"{t.metric.label}:")
            print(render.console_table(t))
            print()
        if prof is not None:
            print(profiles.console(prof) + "\n")
    else:
        found = sum(c.n for c in tables[0].cells)
        print(f"[report] {name}: {found} seed results in {len(tables[0].cells)} cells")
    if corrupt:
        print(f"[report] {len(corrupt)} corrupt run(s) left out:", file=sys.stderr)
        for c in corrupt[:20]:
            print(f"  {c.path}: {c.problem}", file=sys.stderr)
        if len(corrupt) > 20:
            print(f"  ... and {len(corrupt) - 20} more (listed in {files[0]})", file=sys.stderr)
    for f in files:
        if f.suffix in (".md", ".csv", ".tex", ".png"):
            print(f"[report] wrote {f}")
    return files


def write_trials(name: str, results_dir: Path, index: StoreIndex, out: Path, figures: bool,
                 only: Optional[Sequence[str]] = None) -> None:
    """The Optuna studies of the store (those of `only` databases), as tables with the best trial and a plot."""
    studies, problems = trials.from_store(results_dir, index, only)
    for p in problems:
        print(f"[report] {p}", file=sys.stderr)
    if not studies:
        return
    md = "\n".join(trials.markdown(s) for s in studies)
    path = _write(out / "tables" / f"{name}_trials.md", f"# Optuna trials ({results_dir})\n\n" + md)
    for s in studies:
        print(trials.console(s) + "\n")
        if figures:
            for f in trials.figure(s, out / "figures" / name):
                if f.suffix == ".png":
                    print(f"[report] wrote {f}")
    print(f"[report] wrote {path}")


# -------------------------------------------------------------------------------------------- commands
def report_spec(name: str, index: StoreIndex, out: Path, args, overrides: Sequence[str], verbose: bool,
                target: Optional[Target]) -> list[TableResult]:
    try:
        spec = load_spec(name)
    except SpecError as exc:  # some of the spec loader's messages do not say which file they are about
        raise SpecError(str(exc) if name in str(exc) else f"sweep spec {name}: {exc}") from None
    arm_sets = _csv(args.arms) or ["main"]
    rows = _csv(",".join(args.rows_keys)) if args.rows_keys else None
    data = report_input(spec, arm_sets, overrides, args.wct, rows, _csv(args.columns),
                        progress_printer(f"{spec.name}: composing cells"))
    if spec.search:
        data = with_search_result(data, spec, index)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    tables = collect(data, index, seeds)
    write_tables(spec.name, tables, index, out, not args.no_figures, verbose, target, args.tau_max)
    if spec.search:
        write_trials(spec.name, index.root, index, out, not args.no_figures, [spec.name])
    return tables


def report_store(index: StoreIndex, out: Path, args, target: Optional[Target]) -> int:
    rows, row_values = [], {}
    for text in args.rows_keys or []:
        key, values = parse_key_values(text)
        rows.append(key)
        row_values[key] = values
    req = AdhocRequest(group_by=args.group_by, rows=rows, row_values=row_values, columns=_csv(args.columns),
                       where=[parse_where(w) for w in args.where or []], metrics=_csv(args.metric),
                       seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
                       name=args.name, title=args.title)
    tables = build(index, req)
    write_tables(req.name, tables, index, out, not args.no_figures, True, target, args.tau_max)
    write_trials(req.name, index.root, index, out, not args.no_figures)
    return 0


def _results_dir(args) -> Path:
    results_dir = args.results_dir or next(
        (o.split("=", 1)[1] for o in args.overrides if o.startswith("results_dir=")), None)
    if results_dir is None:
        results_dir = TrainConfig.results_dir
    path = Path(results_dir)
    if not path.is_dir():
        raise UserError(f"no results store at {path} (give --store DIR, the results_dir the runs were written to)")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fisherbench report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("spec", nargs="?", default=None,
                   help="a sweep spec (name or path), all, or fig1_iris; leave out with --group-by")
    p.add_argument("overrides", nargs="*", help="the Hydra overrides the sweep was given (key=value)")
    p.add_argument("--store", "--results-dir", dest="results_dir", default=None,
                   help="results store (default: the config's results_dir, ./runs)")
    p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="a folder of your own configs and specs, as given to the sweep (docs/own-optimizer.md)")
    p.add_argument("--out", default="reports",
                   help="where tables/ and figures/ go (default: reports/ in the working directory)")
    p.add_argument("--group-by", default=None, metavar="KEY",
                   help="no spec: compare the values of this config key as columns (optimizer: the option "
                        "chosen, e.g. adafisher_paper apart from adafisher; or any dotted key, e.g. optimizer.name)")
    p.add_argument("--rows", dest="rows_keys", action="append", default=None, metavar="ROWS",
                   help="spec: row names (comma-separated); --group-by: a row key, KEY or KEY=V1,V2 (repeatable)")
    p.add_argument("--columns", default=None, help="column names (spec) or group-by values, comma-separated")
    p.add_argument("--where", action="append", metavar="KEY=VALUE",
                   help="--group-by: keep runs whose config has KEY=VALUE (V1,V2: any; KEY!=V excludes)")
    p.add_argument("--metric", default=None,
                   help="--group-by: metric(s), comma-separated (best_acc1, test_acc1_at_best_val, "
                        "final_test_acc1, test_ppl, best:KEY, final:KEY, KEY@best:KEY); default from the runs")
    p.add_argument("--target", default=None, help="time to target and a performance profile, e.g. 'val/acc1>=0.9'")
    p.add_argument("--tau-max", type=float, default=4.0, help="profile score: area under ρ on [1, τ_max]")
    p.add_argument("--name", default="store", help="--group-by: the report's file name (default: store)")
    p.add_argument("--title", default=None, help="--group-by: the report's title")
    p.add_argument("--arms", default="main", help="spec: arm sets, comma-separated (main, fixed)")
    p.add_argument("--seeds", default=None, help="seeds expected, e.g. 0,1 (default: the spec's / all found)")
    p.add_argument("--wct", default="measured", choices=("measured", "paper"))
    p.add_argument("--no-figures", action="store_true")
    return p


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    plugins.add_config_dirs(args.config_dir)
    out = Path(args.out)
    target = parse_target(args.target) if args.target else None
    if args.tau_max <= 1:
        raise UserError("--tau-max must be > 1")
    if args.group_by is not None:
        if args.spec is not None:
            raise UserError(f"give a spec ({args.spec}) or --group-by, not both")
        return report_store(StoreIndex(_results_dir(args), progress=True), out, args, target)
    if args.spec is None:
        raise UserError("give a sweep spec (e.g. quick), `all`, or --store DIR --group-by KEY (see --help)")
    if args.spec in FIGURE_ONLY or args.spec == "all":
        # lazy: Figure 1 alone needs torch, scikit-learn and scipy (~5 s to import)
        from fisherbench.analysis.trajectories import figure1

        if args.spec == "fig1_iris" or not args.no_figures:
            files, final = figure1(out / "figures" / "fig1_iris" / "trajectories")
            losses = ", ".join(f"{k} {v:.3f}" for k, v in final.items())
            print(f"[report] Figure 1 (IRIS): final training loss {losses}")
            print(f"[report] wrote {files[0]}")
        if args.spec in FIGURE_ONLY:
            return 0

    overrides = [o for o in args.overrides if not o.startswith("results_dir=")]
    index = StoreIndex(_results_dir(args), progress=True)
    # `all`: every table/figure spec; search specs (`search:`) only define Optuna studies over a table's cell
    names = [n for n in available_specs() if not load_spec(n).search] if args.spec == "all" else [args.spec]
    all_tables: list[TableResult] = []
    for name in names:
        all_tables += report_spec(name, index, out, args, overrides, len(names) == 1, target)
    verdicts = reproduction_summary(all_tables)
    summary = render.summary_markdown(verdicts)
    if args.spec == "all":
        _write(out / "tables" / "summary.md", "# Reproduction summary\n\n" + summary + "\n")
        _write(out / "tables" / "table6.md", "# Table 6: epochs reached under the WCT budget (ours (paper))\n\n"
               + render.table6_markdown(all_tables) + "\n")
        print(f"[report] wrote {out / 'tables' / 'summary.md'} and {out / 'tables' / 'table6.md'}")
    if sum(len(v) for v in verdicts.values()):
        print("\n" + summary.split("\n")[0])
    marks = {"reproduced": "✓", "differs": "✗", "inconclusive": "?", "untested": "·", "mixed": "~",
             "diverged": "÷", "incomplete": "…"}
    for k, mark in marks.items():
        for cell in verdicts.get(k, [])[:40]:
            print(f"  {mark} {cell}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`run`, with anything the user can fix (a bad spec, key, metric, target or path) as a message and exit 2."""
    use_files_only_backend()
    try:
        return run(argv)
    except (UserError, SpecError) as exc:
        print(f"[report] {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
