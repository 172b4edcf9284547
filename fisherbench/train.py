"""fisherbench: train one configuration under a budget and record it in the results store.

    python train.py                                     # offline default: small CNN on MNIST-5k
    python train.py model=resnet18_cifar data=cifar10 optimizer=adafisher budget=epochs budget.epochs=200
    python train.py -m optimizer=adam,adafisher seed=0,1,2   # Hydra multirun
    python train.py optimizer=sgd budget=reference budget.reference_optimizer=adamw budget.reference_epochs=2

Exit codes: 0 completed / skipped, 1 failed or out of memory, 2 configuration error, 3 diverged,
4 preempted (SIGTERM, SIGINT/Ctrl-C or SIGUSR1: checkpointed) or stopped by a full disk: launch the same
command again to resume.
A multirun (`-m`) exits with the largest code of its jobs and lists the jobs that did not complete; it
writes `<results_dir>/_multirun/<time>/jobs.jsonl`, one line per job: its overrides, run id and status.
With `FISHERBENCH_OUTCOME_FILE=<path>` set, a single run also writes how it ended to that file as JSON
(run_id, status, exit_code, error, skipped; fisherbench/core/outcome.py): launchers read that, never stdout.
"""
from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fisherbench.core import plugins
from fisherbench.core.errors import CorruptRunDirectoryError, UserError, explain_compose_error, is_compose_error
from fisherbench.core.orphans import watch_parent_from_env
from fisherbench.core.outcome import ProcessOutcome, write_outcome
from fisherbench.core.status import (
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RUN_FAILED,
    EXIT_USER_ERROR,
    SETTLED,
    OutcomeStatus,
    RunOutcome,
    Status,
)

# Everything below torch (engine, models, data, optim, wandb, timm, datasets: ~5 s) is imported only once the
# config has composed (`_precheck`), so that a mistyped option is reported before the heavy stack loads.

_jobs: list[dict] = []  # multirun: one entry per job, reported when the sweep ends


def _record_job(hc, overrides: list[str], run_id: str | None, status: OutcomeStatus, code: int) -> None:
    entry = {"job": hc.job.num, "overrides": overrides, "run_id": run_id, "status": str(status), "exit_code": code}
    _jobs.append(entry)
    from fisherbench.core.store import append_text  # lazy: see the module's imports

    index = Path(hc.sweep.dir) / "jobs.jsonl"
    try:
        append_text(index, json.dumps(entry, sort_keys=True) + "\n")  # never through a planted link
    except OSError as exc:  # e.g. a full disk: the index is a record of the multirun, not the multirun
        print(f"[fisherbench] cannot write {index} ({exc.strerror or exc})", file=sys.stderr)


def _end(hc, overrides: list[str], outcome: ProcessOutcome) -> None:
    """Report how this job ended: a multirun records it in jobs.jsonl (and goes on with the next job unless
    the job was preempted); a single run writes the outcome file its launcher asked for and exits with its code."""
    if hc.mode == RunMode.MULTIRUN:
        _record_job(hc, overrides, outcome.run_id, outcome.status, outcome.exit_code)
        if outcome.exit_code == EXIT_PREEMPTED:  # a stop signal stops the whole multirun, not just this job
            sys.exit(outcome.exit_code)
        return
    write_outcome(outcome)
    if outcome.exit_code != EXIT_OK:
        sys.exit(outcome.exit_code)


@hydra.main(version_base=None, config_path="configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    # lazy: the heavy stack, after the config composed (see the module's imports)
    from fisherbench.core.distributed import shutdown as shutdown_distributed
    from fisherbench.core.store import DiskFullError, LockLostError
    from fisherbench.engine.compose import attach_choices
    from fisherbench.engine.labels import line_tag, run_label
    from fisherbench.engine.lifecycle import run
    from fisherbench.engine.summary import summary_line

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    cfg = attach_choices(cfg, dict(hc.runtime.choices))
    label = _job_label(overrides, hc.job.num) if multirun else ""
    with run_label(label):
        try:
            result = run(cfg)
        except UserError as exc:  # the other jobs of a multirun still run
            print(f"{line_tag()} configuration error: {exc}", file=sys.stderr)
            status = Status.CORRUPT if isinstance(exc, CorruptRunDirectoryError) else RunOutcome.CONFIG_ERROR
            _end(hc, overrides, ProcessOutcome(None, status, EXIT_USER_ERROR, str(exc)))
            return
        except LockLostError as exc:
            print(f"{line_tag()} stopped: {exc}. Another process may be running this run; this one wrote nothing "
                  "more to the store.", file=sys.stderr)
            _end(hc, overrides, ProcessOutcome(None, RunOutcome.LOCK_LOST, EXIT_RUN_FAILED, f"lock lost: {exc}"))
            return
        except DiskFullError as exc:  # resumable, like a preempted run (a multirun stops: the disk stays full)
            print(f"{line_tag()} stopped: {exc}", file=sys.stderr)
            _end(hc, overrides, ProcessOutcome(None, RunOutcome.DISK_FULL, EXIT_PREEMPTED, str(exc)))
            return
        finally:
            shutdown_distributed()
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank gets here; one line is enough
            print(summary_line(result), flush=True)
    summary = result.summary
    error = None if result.status in SETTLED else (summary.get("error") or summary.get("stop_reason"))
    _end(hc, overrides, ProcessOutcome(summary.get("run_id"), result.status, result.exit_code, error, result.skipped))


# ------------------------------------------------------------------------------------ multirun labels
_multirun: dict[str, Any] = {"swept": [], "total": None}  # set by main() from the command line


def _job_label(overrides: Sequence[str], num: int) -> str:
    """`adafisher_paper s1 3/12`: the values that vary across the multirun (a group's option by itself, `seed`
    as `s<n>`, other keys as `name=value`), then the job's place in it."""
    swept, total = _multirun["swept"], _multirun["total"]
    values = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    parts = []
    for key in swept:
        if key not in values:
            continue
        value = values[key]
        parts.append(f"s{value}" if key == "seed" else value if "." not in key else f"{key.rsplit('.', 1)[1]}={value}")
    return " ".join([*parts, f"{num + 1}/{total if total else '?'}"])


def _multirun_plan(overrides: Sequence[str]) -> tuple[list[str], Optional[list[list[str]]]]:
    """(the swept keys, every job's overrides) of a multirun command line, as Hydra's basic sweeper expands it
    (None when the line uses a sweep this does not know how to expand)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # lazy: a Hydra internal, multirun only
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    swept = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    try:
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - a sweep kind (e.g. an interval) only a search plug-in expands
        return swept, None
    return swept, [list(job) for batch in batches for job in batch]


# -------------------------------------------------------------------------------- the early check
_SCHEMA_REF = re.compile(r"/schema/(\w+)/(\w+)")
_HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p")


def _command_overrides(argv: Sequence[str]) -> Optional[tuple[list[str], bool]]:
    """(overrides, multirun) of a train.py command line, or None when it uses Hydra flags the early check leaves
    to Hydra (another config path or name, --info, shell completion, ...)."""
    overrides, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg == "--resolve":
            pass
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return overrides, multirun


def _plugins_in_use() -> bool:
    """Whether user config folders or installed packages add options: those are registered by the plug-in
    loader (which imports their code), so only the full composition knows them."""
    from importlib import metadata

    return bool(plugins.config_dirs()) or any(metadata.entry_points(group=g)
                                               for g in plugins.ENTRY_POINT_GROUPS.values())


def _precheck(overrides: Sequence[str], multirun: bool) -> None:
    """Compose the config of every job before the heavy stack is imported: a mistyped group option, key or
    top-level value is reported in the time Hydra alone takes (the registries' schemas, which live beside the
    code of each model, dataset and optimizer, are stood in for by open nodes here; what they type is checked
    when the real composition follows). Raises the composition error; returns when everything composes or the
    check cannot decide (a config group of the user's own that names a schema only the registries know)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    from fisherbench.core.config import CONFIG_DIR, TrainConfig

    jobs: list[list[str]] = [list(overrides)]
    if multirun:
        _multirun["swept"], expanded = _multirun_plan(overrides)
        _multirun["total"] = len(expanded) if expanded is not None else None
        if expanded is None:
            return
        jobs = expanded
    if GlobalHydra.instance().is_initialized():  # composed in this process already (tests): nothing to gain
        return
    cs = ConfigStore.instance()
    stand_ins = set()
    for path in CONFIG_DIR.rglob("*.yaml"):
        stand_ins.update(_SCHEMA_REF.findall(path.read_text(encoding="utf-8", errors="replace")))
    cs.store(name="train_schema", node=TrainConfig)
    for group, name in stand_ins:
        cs.store(group=f"schema/{group}", name=name, node=OmegaConf.create({}, flags={"struct": False}))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            for job in jobs[:256]:  # a larger multirun: its first jobs (each one composes again when it runs)
                try:
                    compose("train", overrides=job)
                except Exception as exc:
                    if "schema/" in str(exc):  # a schema the stand-ins do not know: the real check decides
                        return
                    raise
    finally:
        for group, name in stand_ins:  # the real schemas are registered under the same names later
            cs.repo.get("schema", {}).get(group, {}).pop(f"{name}.yaml", None)


def _report_multirun() -> int:
    failed = [j for j in _jobs if j["exit_code"] != EXIT_OK]
    if not failed:
        return EXIT_OK
    print(f"[fisherbench] {len(failed)} of {len(_jobs)} jobs did not complete:", file=sys.stderr)
    for j in failed:
        print(f"  job {j['job']}: {j['status']} (exit {j['exit_code']}) {' '.join(j['overrides'])}", file=sys.stderr)
    return max(j["exit_code"] for j in failed)


HELP = """fisherbench: train one configuration under a budget and record it in the results store.

usage: python train.py [group=option ...] [key=value ...]     one run
       python train.py -m group=a,b key=x,y ...                a multirun (every combination)
       python train.py --cfg job [overrides]                   print the composed config and exit
       python train.py --config-dir DIR optimizer=mine ...     your own optimizer/model/data configs in DIR
                                                               (or $FISHERBENCH_CONFIG_PATH; docs/own-optimizer.md)

Config groups (group=option):
{groups}

Top-level keys: seed, results_dir (default runs), device (auto|cpu|cuda|cuda:N), precision (fp32|bf16),
deterministic, overwrite, tags, and the sections schedule.*, eval.*, checkpoint.*, budget.*, logger.*.
Exit codes: 0 completed/skipped, 1 failed/oom, 2 configuration error, 3 diverged, 4 preempted/disk full (resume by
running the same command). Docs: docs/running.md. The composed config{which}:

{config}"""


def _print_help(argv: list[str]) -> None:
    """`--help`: only the groups train.py accepts (Hydra's own lists internal schema groups and sweep specs)."""
    # lazy: the heavy stack
    from fisherbench.engine.compose import TRAIN_GROUPS, compose_config, group_options, plugin_lines

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    added = plugin_lines()
    groups = "\n".join(textwrap.fill(", ".join(group_options(g)), width=110, initial_indent=f"  {g + ':':<12} ",
                                      subsequent_indent=" " * 15) for g in TRAIN_GROUPS)
    try:
        cfg = compose_config(overrides)
        text = OmegaConf.to_yaml({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_choices"})
    except Exception as exc:  # noqa: BLE001 - help must print even when the given overrides do not compose
        text = f"(the overrides do not compose: {str(exc).splitlines()[0]})"
    which = f" with {' '.join(overrides)}" if overrides else " (defaults)"
    if added:
        groups += "\n\nPlug-ins and your own configs (docs/own-optimizer.md):\n" + "\n".join(f"  {line}" for line in added)
    print(HELP.format(groups=groups, which=which, config=text.rstrip()))


def quiet_third_party_warnings() -> None:
    """Warnings as one line of ours, and none that users cannot act on.

    torch's `torch.jit.script` deprecation (raised when ASDL and timm helpers are imported) says nothing about
    the user's run: filtered. Every other warning (ours, e.g. which layers K-FAC/Shampoo leave unpreconditioned,
    and other libraries') is printed as `[fisherbench] warning: <message> (<Category>)`, without the source line
    Python's default format echoes (`return self.adapter(...)` told a user nothing).
    """
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        text = " ".join(str(message).split())
        print(f"[fisherbench] warning: {text} ({category.__name__})", file=file or sys.stderr, flush=True)

    warnings.showwarning = one_line


def main() -> None:
    try:
        # `--config-dir DIR` (or hydra.searchpath) adds a user config folder: plug-ins and own configs there
        # are read by the plug-in loader, typed; the folder goes into the environment, so runs a sweep or a
        # multirun starts see it too
        dirs, sys.argv[1:] = plugins.split_config_dir_args(sys.argv[1:])
        plugins.add_config_dirs(dirs)
    except UserError as exc:
        print(f"[fisherbench] configuration error: {exc}", file=sys.stderr)
        write_outcome(ProcessOutcome(None, RunOutcome.CONFIG_ERROR, EXIT_USER_ERROR, str(exc)))
        sys.exit(EXIT_USER_ERROR)
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        try:
            _print_help(sys.argv[1:])
        except UserError as exc:  # a plug-in that cannot be registered: help would list it
            print(f"[fisherbench] configuration error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        return
    quiet_third_party_warnings()
    watch_parent_from_env()  # started by a sweep: stop (checkpointed) if the sweep dies (fisherbench/core/orphans.py)
    user_wants_trace = bool(os.environ.get("HYDRA_FULL_ERROR"))
    command = _command_overrides(sys.argv[1:])
    try:
        if command is not None and not _plugins_in_use():
            _precheck(*command)
        from fisherbench.engine.compose import register_configs  # lazy: the heavy stack, once the config composed

        try:
            register_configs()
        except UserError as exc:  # a plug-in or user config that cannot be registered
            print(f"[fisherbench] configuration error: {exc}", file=sys.stderr)
            write_outcome(ProcessOutcome(None, RunOutcome.CONFIG_ERROR, EXIT_USER_ERROR, str(exc)))
            sys.exit(EXIT_USER_ERROR)
        os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, to explain them
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C before training started (during training it is a stop signal)
        print("[fisherbench] interrupted before training started; nothing was recorded", file=sys.stderr)
        write_outcome(ProcessOutcome(None, RunOutcome.INTERRUPTED, EXIT_PREEMPTED, "stopped before training started"))
        sys.exit(EXIT_PREEMPTED)
    except Exception as exc:  # noqa: BLE001
        if user_wants_trace or not is_compose_error(exc):
            raise
        message = explain_compose_error(exc)
        print(f"[fisherbench] configuration error: {message}", file=sys.stderr)
        write_outcome(ProcessOutcome(None, RunOutcome.CONFIG_ERROR, EXIT_USER_ERROR, message))
        sys.exit(EXIT_USER_ERROR)
    code = _report_multirun()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
