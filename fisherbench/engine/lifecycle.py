"""One run end to end: lock it, skip/resume/start it, train it under its budget, record the outcome.

`run(cfg)` is what `python train.py` calls for each composed config. Errors a user can cause raise
`UserError` before anything is trained (and before a run directory is created where the error can be
known that early). Everything that happens once training can start is recorded in the store as a result:
`diverged`, `oom`, `failed` (a bug: traceback in `error.txt`) or `preempted` (a signal: checkpointed).

Guarantees, each tested in tests/core/test_store_hardening.py and tests/engine/test_resume.py:
- one process per run: a lock per run id, verified (same inode) before every write to the run directory;
  a process whose lock was deleted or replaced stops without writing anything more (`LockLostError`);
- a finished result is never lost: a run directory is cleared only under a verified lock, and only when it
  holds no final result; `overwrite=true` trains into a staging directory and replaces the old result only
  once the new summary is written;
- a corrupt summary, config or checkpoint is never trusted: corrupt checkpoints fall back to `.prev`, then
  to a fresh start (saying so); a corrupt summary stops with a message naming the file.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.budget import DerivedBudget, plan_budget
from fisherbench.core.config import flatten, validate
from fisherbench.core.distributed import DistInfo, broadcast_object, init_from_env
from fisherbench.core.env import configure_runtime, load_average, reset_peak_memory, resolve_device, seed_everything
from fisherbench.core.errors import CorruptRunDirectoryError, UserError
from fisherbench.core.modules import unwrap
from fisherbench.core.status import EXIT_OK, EXIT_RUN_FAILED, RECORDED, OutcomeStatus, RunOutcome, Status
from fisherbench.core.store import (
    CorruptRunError,
    DiskFullError,
    LockLostError,
    RunDir,
    RunLock,
    atomic_write_json,
    is_disk_full,
    remove_tree,
)
from fisherbench.core.tasks import get_task
from fisherbench.engine.build import autocast_factory, build_components, make_adapter, run_meta
from fisherbench.engine.calibrate import RUN_FILE as CALIBRATION_FILE
from fisherbench.engine.calibrate import describe, reference_budget
from fisherbench.engine.faults import hooks_from_env
from fisherbench.engine.identity import resolved_dict, run_identity
from fisherbench.engine.labels import line_tag
from fisherbench.engine.loggers import make_logger
from fisherbench.engine.match import find_reference_run, match_budget
from fisherbench.engine.summary import make_summary, utc_now
from fisherbench.engine.trainer import Trainer
from fisherbench.models.registry import count_parameters


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    skipped: bool = False

    @property
    def status(self) -> OutcomeStatus:
        """The recorded status, or `running_elsewhere` for a run skipped because another process holds it."""
        return RunOutcome.parse(self.summary.get("status"))

    @property
    def exit_code(self) -> int:
        """`train.py`'s exit code for this outcome (a skipped run exits 0: there is nothing to do)."""
        if self.skipped:
            return EXIT_OK
        status = self.status
        return status.exit_code if isinstance(status, Status) else EXIT_RUN_FAILED


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(f"{line_tag()} {msg}", file=sys.stderr, flush=True)


def _check_writable(root: Path, what: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"{what} {root} is not writable ({exc.strerror or exc}). Fix its permissions or choose another "
            "results_dir=PATH."
        ) from None


def _results_root(cfg: DictConfig) -> Path:
    text = str(cfg.results_dir or "").strip()
    if not text:
        raise UserError("results_dir is empty; give the store a directory, e.g. results_dir=runs")
    return Path(text).expanduser()


# --------------------------------------------------------------------------------------------------- run
def run(cfg: DictConfig, on_trainer: Optional[Callable[[Trainer], None]] = None) -> RunResult:
    """Run (or skip, or resume) the run that `cfg` identifies. Raises UserError for user errors.

    Only one process at a time runs a given run id; another process that asks for the same run gets
    `status: running_elsewhere` and skips it. `on_trainer(trainer)` is called once the trainer is built
    (e.g. to set `trainer.on_eval` to an analysis callback; its time is charged to `log_s`).
    """
    validate(cfg)
    root = _results_root(cfg)
    info = init_from_env(cfg.device)
    device = resolve_device(cfg.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    configure_runtime(cfg)  # threads, determinism, cuDNN autotuning: before any CUDA work and calibration
    seed_everything(int(cfg.seed))

    # the id covers the data's content (hashed once, then cached by stat) before any skip/resume decision
    rid, identity = run_identity(cfg, info.world_size, data_required=True)
    lock: Optional[RunLock] = None
    if info.is_main:
        _check_writable(root, "results_dir")
        lock = RunLock(root, rid)
    busy = broadcast_object(lock is not None and not lock.acquire(), info)
    if busy:
        _log(f"skipping: run {rid} is being run by another process (lock {lock.path if lock else ''})", info)
        return RunResult(root / rid, {"run_id": rid, "status": RunOutcome.RUNNING_ELSEWHERE, "skipped": True}, skipped=True)
    try:
        return _Run(cfg, info, device, rid, root, lock, identity.get("data_content")).execute(on_trainer)
    except OSError as exc:
        if is_disk_full(exc):  # wherever it happened: the run stays resumable (see DiskFullError)
            raise DiskFullError(getattr(exc, "filename", None) or root / rid, exc) from None
        raise
    finally:
        if lock is not None:
            lock.release()


class _Run:
    """The steps of one locked run, in order: check the store, build, place, train, record."""

    def __init__(self, cfg: DictConfig, info: DistInfo, device: torch.device, rid: str, root: Path,
                 lock: Optional[RunLock], data_content: Optional[str] = None) -> None:
        self.cfg, self.info, self.device, self.rid, self.root, self.lock = cfg, info, device, rid, root, lock
        self.final_dir = RunDir(root / rid)
        self.run_dir = self.final_dir  # the directory this attempt writes (a staging one under overwrite)
        self.derived: Optional[DerivedBudget] = None
        self.load_avg_start: Optional[float] = None
        self.data_content = data_content  # the identity's content fingerprint of the data (None: fixed content)

    def guard(self) -> None:
        """Before every write to the store: this process must still hold the run's lock."""
        if self.lock is not None:
            self.lock.verify()

    # -------------------------------------------------------------------------------------------- steps
    def execute(self, on_trainer: Optional[Callable[[Trainer], None]]) -> RunResult:
        skipped = self._existing_result()
        if skipped is not None:
            return skipped
        t_setup = time.perf_counter()
        try:
            trainer, param_count = self._build()
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - a builder that fails for any other reason has a bug: record it
            return self._record_build_bug(traceback.format_exc())
        if on_trainer is not None:
            on_trainer(trainer)
        resumed = self._place(trainer, param_count)
        trainer.ledger.setup_s += time.perf_counter() - t_setup
        cfg = self.cfg
        trainer.logger.start(self.rid, resolved_dict(cfg) | {"_choices": dict(cfg.get("_choices", {}) or {})},
                             self.final_dir.path, resumed)
        status, error = self._train(trainer)
        return self._record(trainer, status, error, param_count)

    def _existing_result(self) -> Optional[RunResult]:
        """The stored outcome when the run is finished already (skip), else None. Corrupt stores stop here."""
        decision: Optional[tuple[str, Any]] = self._decide() if self.info.is_main else None
        kind, value = broadcast_object(decision, self.info)  # every rank takes the main rank's decision
        if kind == "corrupt":
            raise CorruptRunDirectoryError(value)
        if kind == "error":
            raise UserError(value)
        if kind == "skip":
            return RunResult(self.final_dir.path, value, skipped=True)
        return None

    def _decide(self) -> tuple[str, Any]:
        rd, cfg = self.final_dir, self.cfg
        problem = rd.problem() if rd.path.exists() else None
        if problem is not None and not cfg.overwrite:
            return "corrupt", (f"run directory {rd.path} is corrupt ({problem}); nothing was changed. Inspect it, "
                             "then delete it or pass overwrite=true to train this run again.")
        existing = rd.summary() if problem is None else None
        if existing and rd.is_final() and not cfg.overwrite:
            _log(f"skipping: run {self.rid} is already in the store with status '{existing['status']}' "
                 f"({rd.path}); pass overwrite=true to run it again", self.info)
            return "skip", {**existing, "skipped": True}
        if rd.path.exists() and not os.access(rd.path, os.W_OK | os.X_OK):
            return "error", (f"run directory {rd.path} is not writable; fix its permissions or choose another "
                             "results_dir=PATH")
        return "go", None

    def _build(self) -> tuple[Trainer, int]:
        cfg, info, device = self.cfg, self.info, self.device
        parts = build_components(cfg, device, info)
        bundle = parts.bundle
        steps_per_epoch = len(bundle.train)
        if steps_per_epoch == 0:
            raise UserError(f"data '{cfg.data.name}' yields no training batch (batch_size {cfg.data.batch_size} "
                            f"larger than the {bundle.num_train} examples with drop_last?)")
        split = (cfg.selection.metric or "").split("/")[0]
        if split and split not in bundle.evals:
            hint = " (set data.val_fraction, e.g. data.val_fraction=0.1, to hold out a validation split)" \
                if split == "val" else ""
            raise UserError(f"selection.metric={cfg.selection.metric}: data '{cfg.data.name}' has no '{split}' "
                            f"split; it evaluates {', '.join(bundle.evals)}{hint}")
        if cfg.budget.mode == "reference" and broadcast_object(info.is_main and self._match_reference(), info):
            derived = (match_budget(cfg, self.root, device, steps_per_epoch, log=lambda m: _log(m, info))
                       if info.is_main else None)
            self.derived = broadcast_object(derived, info)
            _log(describe(self.derived, cfg.optimizer.name), info)
        elif cfg.budget.mode == "reference":
            self.derived = broadcast_object(
                reference_budget(cfg, bundle, parts.build_model, device, log=lambda m: _log(m, info)), info)
        elif cfg.budget.mode == "match":  # the measured train_s of a finished reference run (engine/match.py)
            derived = (match_budget(cfg, self.root, device, steps_per_epoch, log=lambda m: _log(m, info))
                       if info.is_main else None)
            self.derived = broadcast_object(derived, info)
            _log(describe(self.derived, cfg.optimizer.name), info)
        plan = plan_budget(cfg.budget, steps_per_epoch, self.derived)
        adapter = make_adapter(cfg, parts.model, device, info, steps_per_epoch, plan.total_steps)
        param_count = count_parameters(unwrap(parts.model))
        logger = make_logger(cfg.logger if info.is_main else OmegaConf.create({"name": "none"}))
        trainer = Trainer(
            cfg=cfg, model=parts.model, adapter=adapter, bundle=bundle, task=get_task(bundle.task), plan=plan,
            device=device, run_dir=None, logger=logger, dist=info, run_id=self.rid,
        )
        trainer.guard = self.guard
        trainer.after_step.extend(hooks_from_env())  # none unless a test asked for a fault
        self._bundle = bundle
        return trainer, param_count

    def _match_reference(self) -> bool:
        """Whether a `budget=reference` run takes the measured time of its finished reference run (see
        `budget.reference_method`) rather than a calibration. A resumed run keeps the method it started with."""
        b = self.cfg.budget
        if b.reference_method == "calibration":
            return False
        if b.reference_method == "match":
            return True
        if not self.cfg.overwrite and self.final_dir.path.exists():
            try:
                plan = (self.final_dir.meta() or {}).get("budget_plan") or {}
            except CorruptRunError:
                plan = {}
            started_with = (plan.get("source") or {}).get("method") if isinstance(plan, dict) else None
            if started_with in ("calibration", "match"):
                return bool(started_with == "match")
        return find_reference_run(self.cfg, self.root) is not None

    def _place(self, trainer: Trainer, param_count: int) -> bool:
        """Resume from a checkpoint or start a fresh run directory. Returns whether it resumed."""
        cfg, info = self.cfg, self.info
        payload: Optional[dict[str, Any]] = None
        notes: list[str] = []
        if cfg.overwrite and info.is_main and self.final_dir.path.exists():
            # train into a staging directory; the finished result stays until the new summary is written
            self.run_dir = RunDir(self.root / f".{self.rid}.overwrite")
            self.guard()
            remove_tree(self.run_dir.path)
        if not cfg.overwrite:
            try:
                payload, notes = ckpt.load_latest(self.run_dir.checkpoint_path, self.rid, map_location=self.device,
                                                  data_fingerprint=self._bundle.fingerprint)
            except ckpt.CheckpointError as exc:
                raise UserError(str(exc)) from None
        for note in notes:
            _log(note, info)
        resumed = payload is not None
        rd = self.run_dir
        if payload is not None:
            trainer.restore(payload)
            if info.is_main:
                self.guard()
                rd.truncate_metrics(trainer.state.evals_done)
                rd.summary_path.unlink(missing_ok=True)
                rd.error_path.unlink(missing_ok=True)  # the error of an earlier attempt is not this run's
            _log(f"resuming run {self.rid} at epoch {trainer.state.epoch}, step {trainer.state.step} "
                 f"(budget used: {trainer.ledger.train_s:.1f}s)", info)
        elif info.is_main:
            if rd.path.exists():  # an earlier attempt that stopped before its first checkpoint (never final here)
                self.guard()
                remove_tree(rd.path)
            self.guard()
            meta = run_meta(cfg, self.device, self._bundle, info, param_count, utc_now())
            if self.data_content is not None:
                meta["dataset"]["content"] = self.data_content  # what the run id holds of the data
            rd.create(resolved_dict(cfg), meta)
        if info.is_main:
            meta = rd.meta() or {}
            rd.update_meta(budget_plan=trainer.plan.as_dict(), resumed=resumed,
                           resume_count=int(meta.get("resume_count", 0) or 0) + int(resumed))
            if self.derived is not None and self.derived.record is not None:
                # the raw block times stay with the run (the cache may be recalibrated over)
                self.guard()
                atomic_write_json(rd.path / CALIBRATION_FILE, self.derived.record)
        trainer.run_dir = rd if info.is_main else None
        return resumed

    def _train(self, trainer: Trainer) -> tuple[Status, Optional[str]]:
        reset_peak_memory(self.device)
        self.load_avg_start = load_average()  # summary.json `load_avg` (a matched pair compares the loads)
        try:
            state = trainer.fit()
            if state.status not in RECORDED:  # the loop returns only after deciding how the run ended
                return Status.FAILED, f"bug: the training loop ended in state '{state.status}'"
            return state.status, None
        except (LockLostError, UserError):  # UserError: e.g. a link planted where a checkpoint is written
            raise
        except torch.OutOfMemoryError:
            trainer.state.stop_reason = "out of memory"
            return Status.OOM, traceback.format_exc()
        except Exception as exc:  # noqa: BLE001 - any training failure is recorded as a result
            if is_disk_full(exc):  # not the run's failure: it stops, resumable from its last checkpoint
                raise DiskFullError(getattr(exc, "filename", None) or self.run_dir.path, exc) from None
            error = traceback.format_exc()
            trainer.state.stop_reason = error.strip().splitlines()[-1]
            return Status.FAILED, error

    def _record(self, trainer: Trainer, status: Status, error: Optional[str], param_count: int) -> RunResult:
        cfg, info, rd = self.cfg, self.info, self.run_dir
        summary = make_summary(cfg, trainer, status, self.rid, param_count, error, self.device, self.derived,
                               load_avg_start=self.load_avg_start)
        if not info.is_main:
            return RunResult(self.final_dir.path, summary)
        try:
            self.guard()
            if error:
                rd.write_error(error)
            else:
                rd.error_path.unlink(missing_ok=True)
            rd.write_summary(summary)
            if status.is_final and not cfg.checkpoint.keep_final:
                ckpt.remove(rd.checkpoint_path)
            elif status.is_success and cfg.checkpoint.keep_final:
                trainer.save_checkpoint()
            self._promote_staging()
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(getattr(exc, "filename", None) or rd.path, exc) from None
            raise UserError(
                f"could not record run {self.rid} in {rd.path} ({exc.strerror or exc}); the run stopped with status "
                f"'{status}'. Free space / fix permissions and launch the same command again: it resumes from its "
                "last checkpoint."
            ) from None
        trainer.logger.summary({k: v for k, v in flatten(summary).items() if isinstance(v, (int, float, str))})
        trainer.logger.finish(exit_code=status.exit_code)
        return RunResult(self.final_dir.path, summary)

    def _promote_staging(self) -> None:
        """Under overwrite: the staging directory replaces the old result now that its summary exists."""
        if self.run_dir.path == self.final_dir.path:
            return
        self.guard()
        old = self.root / f".{self.rid}.replaced"
        remove_tree(old)
        if self.final_dir.path.exists():
            os.replace(self.final_dir.path, old)
        os.replace(self.run_dir.path, self.final_dir.path)
        remove_tree(old)
        self.run_dir = self.final_dir

    def _record_build_bug(self, error: str) -> RunResult:
        """A builder raised something other than UserError: a bug, recorded as a failed run with its traceback."""
        cfg, rd = self.cfg, self.final_dir
        last = error.strip().splitlines()[-1]
        summary = {
            "run_id": self.rid, "status": str(Status.FAILED), "stop_reason": f"bug while building the run: {last}",
            "model": cfg.model.name, "data": cfg.data.name, "optimizer": cfg.optimizer.name, "seed": int(cfg.seed),
            "choices": dict(cfg.get("_choices", {}) or {}), "experiment": cfg.experiment, "error": last,
            "steps": 0, "finished_at": utc_now(),
        }
        if self.info.is_main and rd.is_final():  # overwrite=true over a finished result: keep that result
            _log(f"bug: building run {self.rid} raised (this is not a configuration problem; please report it); "
                 f"the finished result in {rd.path} is unchanged:\n{error}", self.info)
            return RunResult(rd.path, summary)
        if self.info.is_main:
            self.guard()
            if not rd.exists():
                remove_tree(rd.path)
                rd.create(resolved_dict(cfg), {"argv": list(sys.argv), "started_at": utc_now()})
            rd.write_error(error)
            rd.write_summary(summary)
        _log(f"bug: building run {self.rid} raised {last} (this is not a configuration problem; the traceback "
             f"is in {rd.error_path}; please report it)", self.info)
        return RunResult(rd.path, summary)


def calibrate(cfg: DictConfig) -> DerivedBudget:
    """Calibrate a `budget=reference` config on this machine without training it (sweeps' --calibrate).

    The result is cached under `results_dir/_calibration/`, where the run itself will find it.
    """
    if cfg.budget.mode != "reference":
        raise UserError(f"calibrate() needs budget=reference, got budget.mode={cfg.budget.mode}")
    validate(cfg)
    device = resolve_device(cfg.device)
    configure_runtime(cfg)  # threads, determinism, cuDNN autotuning: before any CUDA work and calibration
    parts = build_components(cfg, device, DistInfo())
    try:
        return reference_budget(cfg, parts.bundle, parts.build_model, device)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


__all__ = ["RunResult", "run", "calibrate", "autocast_factory"]
