"""`python -m fisherbench sweep <spec> [overrides] [options]`: expand a sweep spec into runs and run them.

    python -m fisherbench sweep quick                                  # every optimizer, equal time, CPU
    python -m fisherbench sweep table2_cifar10 --dry-run               # the 200 runs, epoch counts, GPU-hours
    python -m fisherbench sweep table2_cifar10 --gpus 0,1,2,3          # a queue over four GPUs
    python -m fisherbench sweep table2_cifar10 --arms main,fixed       # + AdaFisher (paper eqs.), F = λ, SGD-momentum
    python -m fisherbench sweep table2_cifar10 --rows ResNet-18 --seeds 0,1 budget.reference_epochs=20
    python -m fisherbench sweep table2_cifar10 --gpus 0,1,2,3 --gpus-per-run 4          # each run DDP over 4 GPUs (torchrun)
    python -m fisherbench sweep table2_cifar10 --launcher submitit_slurm hydra.launcher.partition=gpu
    python -m fisherbench sweep table2_cifar10 --calibrate             # measure the WCT epoch counts on this machine
    python -m fisherbench sweep optuna_adafisher_resnet18 --optuna --trials 30

Positional `key=value` arguments are Hydra overrides for every run (`hydra.launcher.*` ones configure the
launcher). Re-running a command skips finished runs and resumes interrupted ones.

Exit codes: 0 every run finished (completed, budget_exhausted or diverged; or another process holds it),
1 some run did not finish (failed, out of memory, crashed, corrupt run directory, ...: listed at the end),
2 a usage or spec error (nothing was run), 4 stopped by SIGTERM/SIGINT: the running runs checkpointed and
stopped as `preempted`; run the same command again to resume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from fisherbench.core import plugins
from fisherbench.core.config import TrainConfig
from fisherbench.core.errors import UserError
from fisherbench.core.status import EXIT_OK, EXIT_RUN_FAILED, EXIT_USER_ERROR, FINAL
from fisherbench.sweep.expand import expand
from fisherbench.sweep.overrides import override, parse_override_value, shell_line
from fisherbench.sweep.spec import ARM_SETS, SPEC_DIR, WCT_MODES, SpecError, available_specs, load_spec


def _csv(text: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fisherbench sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("spec", nargs="?", help=f"a sweep spec: a path, a name in a --config-dir's sweep/ folder, or one "
                                           f"of the suite's: {', '.join(available_specs(SPEC_DIR))}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (key=value)")
    p.add_argument("--list", action="store_true", help="list the sweep specs and exit")
    p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="a folder of your own configs (optimizer/, model/, data/, sweep/ ...; docs/own-optimizer.md): "
                        "added to $FISHERBENCH_CONFIG_PATH, which every run of the sweep inherits (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs, epoch counts and device-hours (GPU or CPU); run nothing")
    p.add_argument("--arms", default="main", help=f"arm sets, comma-separated ({', '.join(ARM_SETS)})")
    p.add_argument("--seeds", help="seeds instead of the spec's, e.g. 0,1")
    p.add_argument("--rows", help="only these rows (comma-separated)")
    p.add_argument("--columns", help="only these columns (comma-separated)")
    p.add_argument("--wct", default="measured", choices=WCT_MODES,
                   help="measured: budgets derived on this machine (paper protocol); paper: Table 6 epoch counts")
    p.add_argument("--results-dir", default=None, help="results store (default: the config's results_dir)")
    p.add_argument("--gpus", default="auto",
                   help="GPU ids for the queue, e.g. 0,1,2,3; auto (default): every visible GPU, else the CPU; "
                        "none: the CPU")
    p.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per run; >1 runs each under torchrun (DDP)")
    p.add_argument("--workers", type=int, default=1, help="CPU workers (when training on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per CPU worker (default: the cores idle at start / workers, at least 1)")
    p.add_argument("--launcher", default="local", choices=("local", "submitit_local", "submitit_slurm"),
                   help="local queue, or a Hydra submitit launcher")
    p.add_argument("--overwrite", action="store_true", help="re-run runs that are already in the store")
    p.add_argument("--calibrate", action="store_true", help="measure and cache each cell's WCT epoch count")
    p.add_argument("--optuna", action="store_true", help="run the spec's `search` with Optuna (SQLite, resumable)")
    p.add_argument("--trials", type=int, default=None, help="Optuna: total finished trials wanted")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in <results>/_optuna/)")
    p.add_argument("--reclaim", action="store_true",
                   help="Optuna: also retry trials left running by processes on other hosts")
    p.add_argument("--commands", action="store_true", help="with --dry-run: also print each run's command")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="Optuna: train trials inside this process (no ~10 s start-up per trial); default: yes "
                        "with one worker of one device, else each run is a train.py process")
    p.add_argument("--allow-missing-data", action="store_true",
                   help="launch even when a dataset is missing (each run without its data then ends as a "
                        "configuration error); by default the sweep checks every dataset once and stops (exit 2)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="Optuna: times a trial whose process died is retried (default 2)")
    return p


def _results_dir(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, list[str]]:
    """`--results-dir` or a `results_dir=` override (it never changes a run's identity).

    The override is read as Hydra reads it (`results_dir='/data/my runs'` is the path without the quotes);
    the sweep passes the directory on to every run quoted again (`sweep.overrides`).
    """
    rest, found = [], args.results_dir
    for ov in overrides:
        if ov.startswith("results_dir="):
            value = parse_override_value(ov)
            found = None if value is None else str(value)
        else:
            rest.append(ov)
    if found is None:
        found = TrainConfig.results_dir
    if not str(found).strip():
        raise UserError("the results directory is empty; give one, e.g. --results-dir runs")
    return Path(found).expanduser().resolve(), rest


def _group_override(spec_name: str, overrides: list[str]) -> list[str]:
    """Runs of one sweep share a W&B group (the spec's name) unless the user chose one."""
    if any(o.startswith(("logger.group=", "+logger.group=")) for o in overrides):
        return []
    return [override("logger.group", spec_name)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        plugins.add_config_dirs(args.config_dir)
        return _main(args)
    except (SpecError, UserError) as exc:
        print(f"[sweep] {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _main(args: argparse.Namespace) -> int:
    if args.list or not args.spec:
        for name in available_specs():
            spec = load_spec(name)
            print(f"{name:<26} {spec.title}")
        return 0
    spec = load_spec(args.spec)
    # the spec's launcher resources (an allow-list, sweep/spec.py), then the user's own `hydra.*` settings
    launcher_overrides = [*spec.launcher, *(o for o in args.overrides if o.startswith("hydra."))]
    results_dir, overrides = _results_dir(args, [o for o in args.overrides if not o.startswith("hydra.")])
    arm_sets = _csv(args.arms) or ["main"]
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else None
    group = _group_override(spec.name, overrides)

    if args.optuna:
        # lazy: pulls in torch (2-4 s); --list and --help start without it
        from fisherbench.sweep.search import SearchRequest, run_search

        return run_search(SearchRequest(
            spec, results_dir, tuple(overrides), trials=args.trials, storage=args.storage, workers_gpus=args.gpus,
            cpu_workers=args.workers, wct_mode=args.wct, reclaim=args.reclaim, threads=args.threads,
            in_process=args.in_process, max_retries=args.max_retries))

    def progress(i: int, n: int) -> None:
        if sys.stderr.isatty() or i == n:
            print(f"\r[sweep] composing cells {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)

    try:
        runs = expand(spec, arm_sets, overrides, args.wct, seeds, _csv(args.rows), _csv(args.columns), progress)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not runs:
        raise UserError("no runs selected (check --rows/--columns/--seeds against the spec)")
    nproc = max(1, args.gpus_per_run)
    check_data(runs, args.allow_missing_data)
    print(f"[sweep] {spec.name}: {spec.title}")
    print(f"[sweep] {len(runs)} runs ({len({r.cell.key for r in runs})} cells × seeds "
          f"{seeds if seeds is not None else spec.seeds}; arms {','.join(arm_sets)}; WCT {args.wct}) "
          f"-> {results_dir}")

    if args.calibrate:
        from fisherbench.sweep.calibrate import (
            calibrate_cells,  # lazy: pulls in torch (2-4 s); --list and --help start without it
        )

        calibrate_cells(runs, results_dir)
        args.dry_run = True
    if args.dry_run:
        # lazy: pulls in torch (2-4 s); --list and --help start without it
        from fisherbench.sweep.estimate import estimate, format_plan
        from fisherbench.sweep.local import train_command, visible_gpus

        on_gpu = args.gpus != "none" and (args.gpus not in (None, "auto") or bool(visible_gpus()))
        print(format_plan(estimate(spec, runs, results_dir, nproc), nproc, "GPU" if on_gpu else "CPU"))
        if args.commands:
            for r in runs:
                print(shell_line(train_command(r, results_dir, nproc, group)))
        else:
            print("first run: " + shell_line(train_command(runs[0], results_dir, nproc, group)))
        return 0

    if args.launcher != "local":
        from fisherbench.sweep.launchers import (
            launch,  # lazy: pulls in torch (2-4 s); --list and --help start without it
        )

        outcomes = launch(runs, results_dir, args.launcher, launcher_overrides, spec.name, extra=group)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[str(o.get("status"))] = counts.get(str(o.get("status")), 0) + 1
        print(f"[sweep] {len(outcomes)} jobs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for o in outcomes:
            if o.get("status") not in FINAL:
                print(f"  {o.get('status')} {o.get('run_id')}" + (f": {o['error']}" if o.get("error") else ""))
        return EXIT_OK if all(o.get("status") in FINAL for o in outcomes) else EXIT_RUN_FAILED

    # lazy: pulls in torch (2-4 s); --list and --help start without it
    from fisherbench.sweep.local import LocalRunner, exit_code, make_workers, summarize

    try:
        workers = make_workers(args.gpus, args.workers, nproc, args.threads)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print("[sweep] workers: " + ", ".join(f"{w.name}" + (f" ({w.threads} threads)" if w.threads else "")
                                        for w in workers))
    runner = LocalRunner(results_dir, workers, spec.name, overwrite=args.overwrite, extra_args=group)
    outcomes = runner.run(runs)
    print(summarize(outcomes, results_dir, runner.interrupted))
    from fisherbench.sweep.selection import (
        grid_choice_lines,  # lazy: pulls in torch (2-4 s); --list and --help start without it
    )

    for line in grid_choice_lines(spec, outcomes, results_dir):
        print(line)
    print("[sweep] report: " + shell_line(report_command(spec, results_dir, args, overrides)))
    return exit_code(outcomes, runner.interrupted)


def check_data(runs: Sequence, allow_missing: bool = False) -> None:
    """Look for each dataset the runs need once, before anything starts (a dry run too): without this, every
    run of a paper table would fail on its own, each one trying the download first.

    A dataset is checked by building it as a run would, with downloads off; one that ships with a package or is
    synthetic is not checked. Raises UserError (exit 2) naming each missing dataset and the command that
    fetches it, unless `allow_missing`, which only warns.
    """
    import os  # lazy below: the data registry pulls in torch (2-4 s); --list and --help start without it

    from omegaconf import OmegaConf

    from fisherbench.data.download import DatasetNotFoundError, DownloadError
    from fisherbench.data.registry import DATASETS, build_data, resolve_root

    seen: dict[str, dict] = {}
    for r in runs:
        options = OmegaConf.to_container(r.config.data, resolve=True)
        entry = DATASETS.get(str(options["name"])) if str(options.get("name")) in DATASETS else None
        if entry is None or getattr(entry.capabilities, "offline", False):
            continue
        seen.setdefault(f"{options['name']}|{resolve_root(options.get('root'))}", options)
    missing = []
    saved = {k: os.environ.get(k) for k in ("FISHERBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})  # a check never downloads (nor waits for a network)
    try:
        for options in seen.values():
            name, root = options["name"], resolve_root(options.get("root"))
            print(f"[sweep] checking data: {name} ({root})", file=sys.stderr, flush=True)
            if "download" in options:
                options = {**options, "download": False}
            try:
                build_data(options)
            except (DatasetNotFoundError, DownloadError) as exc:
                fetch = (f"python -m fisherbench prepare-data {name} --root {root}"
                         if getattr(DATASETS.get(name).capabilities, "downloadable", False) else None)
                missing.append((name, root, str(exc), fetch))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not missing:
        return
    lines = []
    for name, root, why, fetch in missing:
        lines.append(f"dataset {name} is missing under {root}: {why.splitlines()[0] if why else ''}")
        if fetch:
            lines.append(f"  fetch it (on a machine with network): {fetch}")
    runs_without = sum(1 for r in runs if f"{r.config.data.name}|{resolve_root(r.config.data.get('root'))}"
                       in {f"{n}|{root}" for n, root, _, _ in missing})
    if allow_missing:
        print("[sweep] warning: " + "\n".join(lines) + f"\n[sweep] --allow-missing-data: launching anyway; "
              f"{runs_without} run(s) will end as configuration errors", file=sys.stderr)
        return
    raise UserError("\n".join(lines) + f"\nNothing was run ({runs_without} of {len(runs)} runs need it). Give "
                    "the folder with data.root=PATH if the files are elsewhere, or pass --allow-missing-data "
                    "to launch anyway.")


def report_command(spec, results_dir: Path, args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """The `python -m fisherbench report` command for this sweep's table (as a list; print it with `shell_line`)."""
    custom_dir = args.results_dir or any(o.startswith("results_dir=") for o in args.overrides)
    cmd = ["python", "-m", "fisherbench", "report", str(spec.path) if spec.path.parent != SPEC_DIR else spec.name]
    if custom_dir:
        cmd += ["--results-dir", str(results_dir)]
    for d in args.config_dir:  # the report composes the cells too: it needs the same plug-ins
        cmd += ["--config-dir", str(Path(d).expanduser().resolve())]
    return cmd + list(overrides)
