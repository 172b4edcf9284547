"""One run end to end: config -> objects -> (resume) -> train under the budget -> store.

`run(cfg)` is what `python train.py` calls for each composed config; `compose_config(overrides)` composes
the same config from Python (tests, sweeps). Errors a user can cause (bad values, unknown names, missing
dataset files, an unwritable results dir) raise `ConfigError` *before* a run directory is created. Failures
during training are recorded in the store as results (diverged / oom / failed / preempted).
"""
from __future__ import annotations

import datetime as _dt
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from fisherbench import checkpoint as ckpt
from fisherbench.budget import plan_budget
from fisherbench.config import CONFIG_DIR, NON_IDENTITY_KEYS, register_configs, validate
from fisherbench.distributed import DistInfo, all_gather_object, broadcast_object, init_from_env
from fisherbench.env import (
    device_info,
    git_state,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    seed_everything,
    set_determinism,
    versions,
)
from fisherbench.loggers import make_logger
from fisherbench.tasks import get_task
from fisherbench.trainer import Trainer, params_sha256

EXIT_CODES = {"completed": 0, "budget_exhausted": 0, "skipped": 0, "diverged": 3, "preempted": 4,
              "failed": 1, "oom": 1}


class ConfigError(ValueError):
    """A problem with the user's configuration or environment; the message says what to do."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    skipped: bool = False

    @property
    def status(self) -> str:
        return str(self.summary.get("status"))


# ------------------------------------------------------------------------------------------- composing
def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose `configs/<config_name>.yaml` with Hydra overrides, outside of `@hydra.main`.

    The config choices (e.g. `optimizer: adafisher_paper`) are kept under the key `_choices`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    return attach_choices(cfg, dict(cfg.hydra.runtime.choices))


def attach_choices(cfg: DictConfig, choices: dict[str, Any]) -> DictConfig:
    """Drop the `hydra` node and remember which option of each group was chosen."""
    plain = {k: v for k, v in choices.items() if not k.startswith("hydra/") and not k.startswith("schema/")}
    cfg = cfg.copy()
    with _open(cfg):
        cfg.pop("hydra", None)
        cfg["_choices"] = plain
    return cfg


class _open:
    """Temporarily lift struct mode (to add/remove our bookkeeping keys)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        self.flag = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: Any) -> None:
        OmegaConf.set_struct(self.cfg, self.flag)


def load_group_option(group: str, option: str) -> dict[str, Any]:
    """The resolved node of one option of a config group (e.g. the reference optimizer's config)."""
    cfg = compose_config([f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=True)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ identity
def resolved_dict(cfg: DictConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(d, dict)
    d.pop("_choices", None)
    return d


def identity_of(cfg: DictConfig) -> dict[str, Any]:
    """The part of the resolved config that determines what a run computes (hashed into the run id)."""
    d = resolved_dict(cfg)
    for key in NON_IDENTITY_KEYS:
        d.pop(key, None)
    d.get("budget", {}).pop("recalibrate", None)
    return d


def run_id_of(cfg: DictConfig, world_size: int = 1) -> str:
    """The run's identity hash. Data-parallel runs (world_size > 1) are other runs than single-process ones."""
    from results.store import run_id

    identity = identity_of(cfg)
    if world_size > 1:
        identity["world_size"] = world_size
    return run_id(identity)


# ------------------------------------------------------------------------------------------- helpers
def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"results_dir {root} is not writable ({exc.strerror or exc}). Choose another with results_dir=PATH."
        ) from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(f"[fisherbench] {msg}", file=sys.stderr, flush=True)


def _build(cfg: DictConfig, device: torch.device, info: DistInfo):
    """Data, model and optimizer adapter; user errors become ConfigError."""
    import data as data_pkg
    import models as models_pkg
    import optim as optim_pkg
    from fisherbench.registry import UnknownNameError

    try:
        data_entry = data_pkg.DATASETS.get(cfg.data.name)
        model_entry = models_pkg.MODELS.get(cfg.model.name)
        opt_entry = optim_pkg.OPTIMIZERS.get(cfg.optimizer.name)
    except UnknownNameError as exc:
        raise ConfigError(str(exc)) from None
    data_kind = getattr(data_entry.capabilities, "input_kind", None)
    model_kind = getattr(model_entry.capabilities, "input_kind", None)
    if data_kind and model_kind and data_kind != model_kind:
        raise ConfigError(
            f"model '{cfg.model.name}' takes {model_kind} inputs but data '{cfg.data.name}' provides {data_kind}; "
            f"choose a matching pair (e.g. data=synthetic_tokens for language models)."
        )
    try:
        bundle = data_pkg.build_data(
            OmegaConf.to_container(cfg.data, resolve=True),
            data_pkg.BuildContext(seed=cfg.seed, device=device, rank=info.rank, world_size=info.world_size),
        )
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
        raise ConfigError(f"data '{cfg.data.name}': {exc}") from None
    double_backward = bool(getattr(opt_entry.capabilities, "needs_create_graph", False))
    model_opts = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_opts, dict)

    def build_model() -> torch.nn.Module:
        return models_pkg.create_model(
            num_classes=bundle.num_classes, input_shape=bundle.input_shape, double_backward=double_backward,
            **model_opts,
        )

    from models.gpt import EmbeddingsUnavailable
    from models.pretrained import PretrainedWeightsUnavailable

    try:
        model = build_model().to(device)
    except (ValueError, TypeError, PretrainedWeightsUnavailable, EmbeddingsUnavailable) as exc:
        raise ConfigError(f"model '{cfg.model.name}': {exc}") from None
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return bundle, model, build_model, opt_entry


def _make_adapter(cfg: DictConfig, model, device, info: DistInfo, steps_per_epoch: int, total_steps):
    import optim as optim_pkg

    caps = optim_pkg.OPTIMIZERS.get(cfg.optimizer.name).capabilities
    if cfg.precision != "fp32" and caps is not None and not caps.supports_amp:
        raise ConfigError(
            f"optimizer '{cfg.optimizer.name}' runs in fp32 only (mixed precision would change its curvature "
            f"estimates; the paper ran it in fp32): use precision=fp32"
        )
    ctx = optim_pkg.BuildContext(device=device, distributed=info.enabled, steps_per_epoch=steps_per_epoch,
                                 total_steps=total_steps)
    try:
        return optim_pkg.build_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True), model, ctx)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"optimizer '{cfg.optimizer.name}': {exc}") from None


def _meta(cfg: DictConfig, device: torch.device, bundle, info: DistInfo, param_count: int) -> dict[str, Any]:
    return {
        "git": git_state(),
        "versions": versions(),
        "device": device_info(device),
        "world_size": info.world_size,
        "deterministic": bool(cfg.deterministic),
        "dataset": {"fingerprint": bundle.fingerprint, "num_train": bundle.num_train,
                    "input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes},
        "param_count": param_count,
        "choices": dict(cfg.get("_choices", {}) or {}),
        "argv": sys.argv,
        "started_at": _now(),
    }


# ----------------------------------------------------------------------------------------------- run
def run(cfg: DictConfig, on_trainer: Optional[Callable[[Trainer], None]] = None) -> RunResult:
    """Run (or skip, or resume) the run that `cfg` identifies. Raises ConfigError for user errors.

    Only one process at a time runs a given run id (a lock file per run id in `results_dir`); another
    process that asks for the same run gets `status: running_elsewhere` and skips it.
    `on_trainer(trainer)` is called once the trainer is built (e.g. to set `trainer.on_eval` to a
    `optim.analysis.sources.FactorCallback` that collects Kronecker factors during the run; time spent in
    `on_eval` is charged to `log_s`, outside the budget clock).
    """
    from results.store import RunDir

    try:
        validate(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    info = init_from_env(cfg.device)
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    set_determinism(bool(cfg.deterministic))
    seed_everything(int(cfg.seed))

    rid = run_id_of(cfg, info.world_size)
    root = Path(cfg.results_dir)
    run_dir = RunDir(root / rid)
    lock = None
    if info.is_main:
        _check_writable(root)
        lock = RunLock(root, rid)
    busy = broadcast_object(lock is not None and not lock.acquire(), info)
    if busy:
        _log(f"skipping: run {rid} is being run by another process (lock {lock.path if lock else ''})", info)
        return RunResult(run_dir.path, {"run_id": rid, "status": "running_elsewhere", "skipped": True},
                         skipped=True)
    try:
        return _run_unlocked(cfg, info, device, rid, run_dir, on_trainer)
    finally:
        if lock is not None:
            lock.release()


class RunLock:
    """An exclusive, non-blocking lock per run id (flock: released by the OS if the process dies)."""

    def __init__(self, root: Path, rid: str) -> None:
        from filelock import FileLock

        self.path = root / f".{rid}.lock"
        self._lock = FileLock(str(self.path))

    def acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def release(self) -> None:
        self._lock.release()


def _run_unlocked(cfg: DictConfig, info: DistInfo, device: torch.device, rid: str, run_dir,
                  on_trainer: Optional[Callable[[Trainer], None]] = None) -> RunResult:
    existing = run_dir.summary() if info.is_main else None
    skip = bool(existing and run_dir.is_final() and not cfg.overwrite)
    skip = broadcast_object(skip, info)
    if skip:
        _log(f"skipping: run {rid} is already in the store with status '{existing['status']}' "
             f"({run_dir.path}); pass overwrite=true to run it again", info)
        return RunResult(run_dir.path, {**(existing or {}), "skipped": True}, skipped=True)

    t_setup = time.perf_counter()
    bundle, model, build_model, opt_entry = _build(cfg, device, info)
    task = get_task(bundle.task)
    steps_per_epoch = len(bundle.train)
    if steps_per_epoch == 0:
        raise ConfigError(f"data '{cfg.data.name}' yields no training batch (batch_size {cfg.data.batch_size} "
                          f"larger than the {bundle.num_train} examples with drop_last?)")

    derived = None
    if cfg.budget.mode == "reference":
        _log(f"calibrating: {cfg.budget.reference_optimizer} vs {cfg.optimizer.name} "
             f"({cfg.budget.calibration_steps} interleaved steps each)", info)
        derived = broadcast_object(reference_budget(cfg, bundle, build_model, device), info)
        _log(f"reference budget: {cfg.budget.reference_optimizer} x {derived['reference_epochs']:g} epochs "
             f"-> {derived['derived_epochs']} epochs of {cfg.optimizer.name} (step-time ratio "
             f"{derived['ratio']:.3f})", info)
    plan = plan_budget(cfg.budget, steps_per_epoch, derived)
    adapter = _make_adapter(cfg, model, device, info, steps_per_epoch, plan.total_steps)

    from models.registry import count_parameters
    from optim.registry import unwrap

    param_count = count_parameters(unwrap(model))
    logger = make_logger(cfg.logger) if info.is_main else make_logger(OmegaConf.create({"name": "none"}))
    trainer = Trainer(
        cfg=cfg, model=model, adapter=adapter, bundle=bundle, task=task, plan=plan, device=device,
        run_dir=run_dir if info.is_main else None, logger=logger, dist=info, run_id=rid,
    )

    if on_trainer is not None:
        on_trainer(trainer)

    # ---- resume or start fresh
    payload, notes = None, []
    if cfg.overwrite and info.is_main and run_dir.path.exists():
        _clear_run_dir(run_dir)
    if not cfg.overwrite:
        try:
            payload, notes = ckpt.load_latest(run_dir.checkpoint_path, rid, map_location=device)
        except ckpt.CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    for note in notes:
        _log(note, info)
    resumed = payload is not None
    if resumed:
        trainer.restore(payload)
        if info.is_main:
            run_dir.truncate_metrics(trainer.state.evals_done)
            run_dir.summary_path.unlink(missing_ok=True)
        _log(f"resuming run {rid} at epoch {trainer.state.epoch}, step {trainer.state.step} "
             f"(budget used: {trainer.ledger.train_s:.1f}s)", info)
    elif info.is_main:
        if run_dir.path.exists():  # an earlier attempt that failed before its first checkpoint
            _clear_run_dir(run_dir)
        run_dir.create(resolved_dict(cfg), _meta(cfg, device, bundle, info, param_count))
    if info.is_main:
        run_dir.update_meta(budget_plan=plan.as_dict(), resumed=resumed,
                            resume_count=(run_dir.meta() or {}).get("resume_count", 0) + int(resumed))
    trainer.ledger.setup_s += time.perf_counter() - t_setup
    logger.start(rid, resolved_dict(cfg) | {"_choices": dict(cfg.get("_choices", {}) or {})}, run_dir.path, resumed)

    # ---- train; failures are results
    reset_peak_memory(device)
    error: Optional[str] = None
    status = "failed"
    try:
        state = trainer.fit()
        status = state.status
    except torch.OutOfMemoryError:
        status, error = "oom", traceback.format_exc()
        trainer.state.stop_reason = "out of memory"
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        logger.finish(exit_code=130)
        raise
    except Exception:  # noqa: BLE001 - any training failure is recorded as a result
        status, error = "failed", traceback.format_exc()
        trainer.state.stop_reason = error.strip().splitlines()[-1]

    summary = _summary(cfg, trainer, status, rid, param_count, error, device, derived)
    if info.is_main:
        if error:
            run_dir.error_path.write_text(error)
        run_dir.write_summary(summary)
        if status in ("completed", "budget_exhausted", "diverged") and not cfg.checkpoint.keep_final:
            ckpt.remove(run_dir.checkpoint_path)
        elif status in ("completed", "budget_exhausted") and cfg.checkpoint.keep_final:
            trainer.save_checkpoint()
        logger.summary({k: v for k, v in _flat(summary).items() if isinstance(v, (int, float, str))})
        logger.finish(exit_code=EXIT_CODES.get(status, 1))
    return RunResult(run_dir.path, summary)


def reference_budget(cfg: DictConfig, bundle, build_model, device: torch.device) -> dict[str, Any]:
    """Derive (or read from the calibration cache) the epoch count of a `budget=reference` run."""
    from fisherbench.calibrate import derive_reference_budget

    try:
        reference_opts = load_group_option("optimizer", cfg.budget.reference_optimizer)
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types for a missing option
        raise ConfigError(f"budget.reference_optimizer={cfg.budget.reference_optimizer!r}: {exc}") from None
    loss = get_task(bundle.task).loss
    return derive_reference_budget(cfg, reference_opts, build_model, bundle, loss, device, _autocast(cfg, device))


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    """Calibrate a `budget=reference` config on this machine without training it (sweeps' --calibrate).

    The result is cached under `results_dir/_calibration/`, where the run itself will find it.
    """
    if cfg.budget.mode != "reference":
        raise ConfigError(f"calibrate() needs budget=reference, got budget.mode={cfg.budget.mode}")
    device = resolve_device(cfg.device)
    bundle, _model, build_model, _entry = _build(cfg, device, DistInfo())
    try:
        return reference_budget(cfg, bundle, build_model, device)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _autocast(cfg: DictConfig, device: torch.device):
    import contextlib

    if cfg.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _clear_run_dir(run_dir) -> None:
    import shutil

    shutil.rmtree(run_dir.path, ignore_errors=True)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _summary(cfg, trainer: Trainer, status: str, rid: str, param_count: int, error: Optional[str],
             device: torch.device, derived: Optional[dict[str, Any]]) -> dict[str, Any]:
    st, task = trainer.state, trainer.task
    select = f"{task.select_split}/{task.select_metric}"
    summary: dict[str, Any] = {
        "run_id": rid,
        "status": status,
        "stop_reason": st.stop_reason,
        "choices": dict(cfg.get("_choices", {}) or {}),
        "experiment": cfg.experiment,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "optimizer": cfg.optimizer.name,
        "seed": int(cfg.seed),
        "task": task.name,
        "select_metric": select,
        "higher_is_better": task.higher_is_better,
        "best": st.best,
        "final": st.last_eval,
        "epochs_done": st.epoch + st.batch / max(1, trainer.steps_per_epoch),
        "steps": st.step,
        "steps_per_epoch": trainer.steps_per_epoch,
        "ledger": trainer.ledger.as_dict(),
        "budget": trainer.plan.as_dict(),
        "peak_memory_bytes": peak_memory_bytes(device),
        "optimizer_state_bytes": trainer.adapter.state_bytes(),
        "param_count": param_count,
        "final_params_sha256": params_sha256(trainer.model),
        "diverged": st.diverged,
        "error": error.strip().splitlines()[-1] if error else None,
        "finished_at": _now(),
    }
    if derived is not None:
        summary["reference_budget"] = {k: v for k, v in derived.items() if k != "calibration"}
    if trainer.dist.enabled:  # replicas must agree; record every rank's parameter hash to prove it
        summary["world_size"] = trainer.dist.world_size
        summary["rank_params_sha256"] = all_gather_object(summary["final_params_sha256"], trainer.dist)
    return summary


def summary_line(result: RunResult) -> str:
    """The one line `train.py` prints at the end of a run."""
    s = result.summary
    if result.skipped:
        return f"[fisherbench] skipped (already {s.get('status')}) · {result.run_dir}"
    metric = s.get("select_metric", "")
    best = (s.get("best") or {}).get(metric)
    final = (s.get("final") or {}).get(metric)
    led = s.get("ledger", {})
    fmt = (lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "n/a")
    parts = [
        f"[fisherbench] {s.get('status')}",
        f"best {metric} {fmt(best)}",
        f"final {fmt(final)}",
        f"epochs {s.get('epochs_done', 0):.2f} ({s.get('steps')} steps)",
        "time " + " ".join(f"{k[:-2]} {led.get(k, 0):.1f}s" for k in
                           ("train_s", "eval_s", "log_s", "ckpt_s", "warmup_s", "wall_s")),
        str(result.run_dir),
    ]
    if s.get("stop_reason") and s.get("status") not in ("completed", "budget_exhausted"):
        parts.insert(1, f"({s['stop_reason']})")
    return " · ".join(parts)
