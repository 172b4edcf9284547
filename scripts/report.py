"""Regenerate the paper's tables and figures from the results store.

    python scripts/report.py quick                     # one sweep spec (configs/sweep/<name>.yaml)
    python scripts/report.py table2_cifar10 --arms main,fixed
    python scripts/report.py all                       # every spec, plus Table 6 and a reproduction summary
    python scripts/report.py fig1_iris                 # Figure 1 (trains its own tiny models, offline)

Reads only the store (and the specs, to know which runs make which cell). Writes Markdown, CSV and LaTeX under
`<out>/tables/` and PNG+PDF figures under `<out>/figures/<spec>/`. Positional `key=value` arguments are the
same Hydra overrides given to `python -m sweep`, so the report finds the runs that sweep launched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import tables as render  # noqa: E402
from results.report import StoreIndex, TableResult, collect, reproduction_summary  # noqa: E402
from sweep.spec import SpecError, available_specs, load_spec  # noqa: E402

FIGURE_ONLY = ("fig1_iris",)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def report_spec(name: str, index: StoreIndex, out: Path, overrides: Sequence[str], arm_sets: Sequence[str],
                wct: str, seeds: Optional[Sequence[int]], figures: bool, verbose: bool) -> list[TableResult]:
    spec = load_spec(name)

    def progress(i: int, n: int) -> None:
        if sys.stderr.isatty():
            print(f"\r[report] {name}: composing cells {i}/{n}", end="\n" if i == n else "", file=sys.stderr,
                  flush=True)

    tables = collect(spec, index, arm_sets, overrides, wct, seeds, progress)
    name = spec.name  # a spec given as a path is written under its file name
    files = [_write(out / "tables" / f"{name}.md", render.markdown(tables)),
             _write(out / "tables" / f"{name}.csv", render.csv_text(tables)),
             _write(out / "tables" / f"{name}.tex", render.latex(tables))]
    fig_files = []
    if figures and any(c.seeds for c in tables[0].cells):
        from results.figures import all_figures

        fig_files = all_figures(tables[0], out / "figures" / name)
    found = sum(c.n for c in tables[0].cells)
    if verbose:
        print(f"\n{spec.title}\n")
        for t in tables:
            print(f"{t.metric.label}:")
            print(render.console_table(t))
            print()
    else:
        print(f"[report] {name}: {found} seed results in {len(tables[0].cells)} cells")
    for f in files + [p for p in fig_files if p.suffix == ".png"]:
        print(f"[report] wrote {f}")
    return tables


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("spec", help=f"all, {', '.join(FIGURE_ONLY)}, or one of: {', '.join(available_specs())}")
    p.add_argument("overrides", nargs="*", help="the Hydra overrides the sweep was given (key=value)")
    p.add_argument("--results-dir", default=None, help="results store (default: the config's results_dir)")
    p.add_argument("--out", default="results", help="where tables/ and figures/ go (default: results)")
    p.add_argument("--arms", default="main", help="arm sets, comma-separated (main, fixed)")
    p.add_argument("--seeds", default=None, help="seeds instead of the spec's, e.g. 0,1")
    p.add_argument("--wct", default="measured", choices=("measured", "paper"))
    p.add_argument("--no-figures", action="store_true")
    args = p.parse_intermixed_args(argv)

    out = Path(args.out)
    if args.spec in FIGURE_ONLY or args.spec == "all":
        from analysis.trajectories import figure1

        if args.spec == "fig1_iris" or not args.no_figures:
            files, final = figure1(out / "figures" / "fig1_iris" / "trajectories")
            losses = ", ".join(f"{k} {v:.3f}" for k, v in final.items())
            print(f"[report] Figure 1 (IRIS): final training loss {losses}")
            print(f"[report] wrote {files[0]}")
        if args.spec in FIGURE_ONLY:
            return 0

    overrides = [o for o in args.overrides if not o.startswith("results_dir=")]
    results_dir = args.results_dir or next((o.split("=", 1)[1] for o in args.overrides if o.startswith("results_dir=")),
                                           None)
    if results_dir is None:
        from fisherbench.config import TrainConfig

        results_dir = TrainConfig.results_dir
    arm_sets = [a for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    index = StoreIndex(Path(results_dir), progress=True)
    # `all`: every table/figure spec; search specs (`search:`) only define Optuna studies over a table's cell
    names = [n for n in available_specs() if not load_spec(n).search] if args.spec == "all" else [args.spec]
    all_tables: list[TableResult] = []
    for name in names:
        try:
            all_tables += report_spec(name, index, out, overrides, arm_sets, args.wct, seeds, not args.no_figures,
                                      verbose=len(names) == 1)
        except SpecError as exc:
            print(f"[report] {exc}", file=sys.stderr)
            return 2
    verdicts = reproduction_summary(all_tables)
    summary = render.summary_markdown(verdicts)
    if args.spec == "all":
        _write(out / "tables" / "summary.md", "# Reproduction summary\n\n" + summary + "\n")
        _write(out / "tables" / "table6.md", "# Table 6: epochs reached under the WCT budget (ours (paper))\n\n"
               + render.table6_markdown(all_tables) + "\n")
        print(f"[report] wrote {out / 'tables' / 'summary.md'} and {out / 'tables' / 'table6.md'}")
    if sum(len(v) for v in verdicts.values()):
        print("\n" + summary.split("\n")[0])
    for k in ("reproduced", "not reproduced"):
        for cell in verdicts.get(k, [])[:40]:
            print(f"  {'✓' if k == 'reproduced' else '✗'} {cell}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
