"""Submit a sweep's runs through a Hydra launcher plugin (`submitit_slurm` for SLURM, `submitit_local` to try
the same path on this machine).

The launcher gets one override list per run, exactly as Hydra's own sweepers hand it jobs, and runs
`hydra_task` (the same code path as `train.py`) in each job. Launcher settings are Hydra overrides, e.g.
`hydra.launcher.partition=gpu hydra.launcher.timeout_min=1440 hydra.launcher.gpus_per_node=1`. The submitit
launcher waits for its jobs, so keep the submitting process alive (tmux/screen) or re-launch later: runs that
finished are skipped and interrupted ones resume, as with the local runner. A SLURM preemption or time limit
sends SIGUSR1 (`signal_delay_s` before the end); the trainer checkpoints and stops as `preempted`, and
`hydra.launcher.max_num_timeout=N` lets submitit requeue the job, which then resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig

from fisherbench.core.errors import UserError
from fisherbench.core.status import RunOutcome
from fisherbench.engine.compose import attach_choices
from fisherbench.engine.lifecycle import run as run_one
from fisherbench.sweep.expand import PlannedRun, hydra_context
from fisherbench.sweep.overrides import override

LAUNCHERS = ("submitit_slurm", "submitit_local")


def hydra_task(cfg: DictConfig) -> dict[str, Any]:
    """What each launched job runs: the `train.py` task (compose -> run -> store); returns the outcome."""
    cfg = attach_choices(cfg, dict(HydraConfig.get().runtime.choices))
    try:
        result = run_one(cfg)
    except UserError as exc:
        return {"status": str(RunOutcome.CONFIG_ERROR), "error": str(exc)}
    return {"run_id": result.summary.get("run_id"), "status": str(result.status), "skipped": result.skipped,
            "run_dir": str(result.run_dir)}


def launcher_config(launcher: str, launcher_overrides: Sequence[str], sweep_dir: Path) -> DictConfig:
    """The composed primary config with `hydra/launcher=<launcher>` (MULTIRUN mode), as Hydra would build it."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    loader = GlobalHydra.instance().config_loader()
    return loader.load_configuration(
        "train",
        overrides=[f"hydra/launcher={launcher}", override("hydra.sweep.dir", str(sweep_dir)),
                   "hydra.sweep.subdir=${hydra.job.num}",
                   *launcher_overrides],
        run_mode=RunMode.MULTIRUN,
    )


def launch(runs: Sequence[PlannedRun], results_dir: Path, launcher: str, launcher_overrides: Sequence[str] = (),
           sweep_name: str = "sweep", extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Submit every run as one job of the launcher; returns each job's outcome (blocks until they end)."""
    try:  # lazy: a private Hydra module, absent from some versions
        from hydra._internal.callbacks import Callbacks
    except ImportError:  # pragma: no cover - older Hydra
        Callbacks = None  # type: ignore[assignment]

    results_dir = Path(results_dir).resolve()
    sweep_dir = results_dir / "_sweeps" / f"{sweep_name}.{launcher}"
    job_overrides = [[*r.overrides, override("results_dir", str(results_dir)), "logger.progress=never", *extra]
                     for r in runs]
    with hydra_context():
        cfg = launcher_config(launcher, launcher_overrides, sweep_dir)
        HydraConfig.instance().set_config(cfg)
        callbacks = Callbacks(cfg) if Callbacks is not None else None
        ctx = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
        plugin = Plugins.instance().instantiate_launcher(config=cfg, hydra_context=ctx, task_function=hydra_task)
        returns = plugin.launch(job_overrides, initial_job_idx=0)
    outcomes = []
    for run, ret in zip(runs, returns):
        if ret.status == JobStatus.COMPLETED:
            outcomes.append({"run_id": run.run_id, **(ret.return_value or {})})
        else:
            outcomes.append({"run_id": run.run_id, "status": str(RunOutcome.CRASHED), "error": repr(ret._return_value)})
    return outcomes
