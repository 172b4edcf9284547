"""fisherbench: train one configuration under a budget and record it in the results store.

    python train.py                                     # offline default: small CNN on MNIST-5k
    python train.py model=resnet18_cifar data=cifar10 optimizer=adafisher budget=epochs budget.epochs=200
    python train.py -m optimizer=adam,adafisher seed=0,1,2   # Hydra multirun
    python train.py optimizer=sgd budget=reference budget.reference_optimizer=adamw budget.reference_epochs=2

Exit codes: 0 completed / skipped, 1 failed or out of memory, 2 configuration error, 3 diverged,
4 preempted (SIGTERM, SIGINT/Ctrl-C or SIGUSR1: checkpointed; launch the same command again to resume).
A multirun (`-m`) exits with the largest code of its jobs and lists the jobs that did not complete; it
writes `<results_dir>/_multirun/<time>/jobs.jsonl`, one line per job: its overrides, run id and status.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fisherbench.core import plugins
from fisherbench.core.distributed import shutdown as shutdown_distributed
from fisherbench.core.errors import UserError, explain_compose_error, is_compose_error
from fisherbench.core.status import EXIT_PREEMPTED, EXIT_USER_ERROR
from fisherbench.core.store import LockLostError
from fisherbench.engine.compose import (
    TRAIN_GROUPS,
    attach_choices,
    compose_config,
    group_options,
    plugin_lines,
    register_configs,
)
from fisherbench.engine.lifecycle import run
from fisherbench.engine.summary import summary_line

_jobs: list[dict] = []  # multirun: one entry per job, reported when the sweep ends


def _record_job(hc, overrides: list[str], run_id: str | None, status: str, code: int) -> None:
    entry = {"job": hc.job.num, "overrides": overrides, "run_id": run_id, "status": status, "exit_code": code}
    _jobs.append(entry)
    index = Path(hc.sweep.dir) / "jobs.jsonl"
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


@hydra.main(version_base=None, config_path="configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    cfg = attach_choices(cfg, dict(hc.runtime.choices))
    try:
        result = run(cfg)
    except UserError as exc:
        print(f"[fisherbench] configuration error: {exc}", file=sys.stderr)
        if multirun:  # the other jobs of the sweep still run
            _record_job(hc, overrides, None, "configuration_error", EXIT_USER_ERROR)
            return
        sys.exit(EXIT_USER_ERROR)
    except LockLostError as exc:
        print(f"[fisherbench] stopped: {exc}. Another process may be running this run; this one wrote nothing "
              "more to the store.", file=sys.stderr)
        if multirun:
            _record_job(hc, overrides, None, "lock_lost", 1)
            return
        sys.exit(1)
    finally:
        shutdown_distributed()
    print(summary_line(result), flush=True)
    code = result.exit_code
    if multirun:
        _record_job(hc, overrides, result.summary.get("run_id"), result.status, code)
        if code == EXIT_PREEMPTED:  # a stop signal stops the whole multirun, not just this job
            sys.exit(code)
    elif code:
        sys.exit(code)


def _report_multirun() -> int:
    failed = [j for j in _jobs if j["exit_code"] != 0]
    if not failed:
        return 0
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
Exit codes: 0 completed/skipped, 1 failed/oom, 2 configuration error, 3 diverged, 4 preempted (resume by
running the same command). Docs: docs/running.md. The composed config{which}:

{config}"""


def _print_help(argv: list[str]) -> None:
    """`--help`: only the groups train.py accepts (Hydra's own lists internal schema groups and sweep specs)."""
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


def main() -> None:
    try:
        # `--config-dir DIR` (or hydra.searchpath) adds a user config folder: plug-ins and own configs there
        # are read by the plug-in loader, typed; the folder goes into the environment, so runs a sweep or a
        # multirun starts see it too
        dirs, sys.argv[1:] = plugins.split_config_dir_args(sys.argv[1:])
        plugins.add_config_dirs(dirs)
        if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
            _print_help(sys.argv[1:])
            return
        register_configs()
    except UserError as exc:
        print(f"[fisherbench] configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    user_wants_trace = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, to explain them
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C before training started (during training it is a stop signal)
        print("[fisherbench] interrupted before training started; nothing was recorded", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except Exception as exc:  # noqa: BLE001
        if user_wants_trace or not is_compose_error(exc):
            raise
        print(f"[fisherbench] configuration error: {explain_compose_error(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    code = _report_multirun()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
