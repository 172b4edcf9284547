"""Train a sweep's runs inside this process, one after another (`engine.lifecycle.run` on the composed config).

A `train.py` process pays ~10 s of start-up (imports, Hydra, data) before its first step; an Optuna trial on
a small model trains for well under a second. In-process trials skip that cost and still write one ordinary
run directory each (same run id, lock, resume and summary as `train.py`), so the store has everything.

Signals: while the trainer trains, its own SIGTERM/SIGINT handler checkpoints the run and records
`preempted`. Before that (building the model, loading data, calibrating a budget) this runner's handler
abandons the run at once (nothing was trained; the run directory, if any, resumes or restarts cleanly), and a
signal that arrives after the trainer was built but before it started makes the trainer stop after its first
step (it checkpoints). Between runs a signal only stops the loop. In every case the runner reports
`interrupted` and the caller stops.
"""
from __future__ import annotations

import gc
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from fisherbench.core.errors import UserError
from fisherbench.core.status import SETTLED, OutcomeStatus, RunOutcome, Status
from fisherbench.core.store import CorruptRunError, LockLostError, RunDir
from fisherbench.engine.compose import unlocked
from fisherbench.engine.faults import signal_at
from fisherbench.engine.lifecycle import run as run_one
from fisherbench.sweep.expand import PlannedRun
from fisherbench.sweep.local import NOT_TRAINED, STOP_SIGNALS, SWEEP_SUBDIR, EventLog, Outcome, store_state


class _Abandon(BaseException):
    """Raised by the signal handler to leave a run that has not started training (a BaseException, so the
    run's own `except Exception` bug handlers do not record it as a failure)."""


class InProcessRunner:
    """Same contract as `sweep.local.LocalRunner` (`run(runs) -> outcomes`, `interrupted`), in this process."""

    def __init__(self, results_dir: Path, sweep_name: str, device: Optional[str] = None,
                 threads: Optional[int] = None, overrides: Optional[dict[str, Any]] = None, out=None) -> None:
        self.results_dir = Path(results_dir).resolve()
        self.device = device
        self.threads = threads
        self.overrides = dict(overrides or {})  # dotted config key -> value, set on every run's config
        self.out = out or sys.stdout
        self.events = EventLog(self.results_dir / SWEEP_SUBDIR / f"{sweep_name}.events.jsonl", self.out)
        self._stop = threading.Event()
        self._phase = "idle"  # idle | setup (before the trainer exists) | trainer
        self._trainer: Any = None

    @property
    def interrupted(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------------------- signals
    def _handle(self, signum: int, frame: Any) -> None:
        self._stop.set()
        print(f"\n[sweep] {signal.Signals(signum).name}: stopping after the current run (it checkpoints); run the "
              "same command again to resume", file=self.out, flush=True)
        if self._phase == "setup":
            raise _Abandon()

    def _on_trainer(self, trainer: Any) -> None:
        self._phase, self._trainer = "trainer", trainer
        fit = trainer.fit

        def fit_or_stop() -> Any:
            if self._stop.is_set():  # a signal came between building and training: stop after one step
                trainer.after_step.append(signal_at(trainer.state.step + 1, signal.SIGTERM))
            return fit()

        trainer.fit = fit_or_stop

    # --------------------------------------------------------------------------------------------- run
    def run(self, runs: Sequence[PlannedRun]) -> list[Outcome]:
        if self.threads:
            torch.set_num_threads(self.threads)
        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS} if in_main else {}
        try:
            out = []
            for r in runs:
                if self._stop.is_set():
                    out.append(Outcome(r, RunOutcome.NOT_STARTED))
                    continue
                out.append(self._one(r))
            return out
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _config(self, run: PlannedRun):
        cfg = run.config.copy()
        with unlocked(cfg):
            OmegaConf.update(cfg, "results_dir", str(self.results_dir), merge=False)
            OmegaConf.update(cfg, "logger.progress", "never", merge=False)
            if self.device:
                OmegaConf.update(cfg, "device", self.device, merge=False)
            if self.threads:  # the worker's share of the idle cores, not the run's own `threads=auto`
                OmegaConf.update(cfg, "threads", self.threads, merge=False)
            for key, value in self.overrides.items():
                OmegaConf.update(cfg, key, value, merge=False)
        return cfg

    def _one(self, run: PlannedRun) -> Outcome:
        rd = RunDir(self.results_dir / run.run_id)
        try:
            state = store_state(self.results_dir, run.run_id)
            if state == "final":
                summary = rd.summary() or {}
                return Outcome(run, Status.parse(summary.get("status")), summary=summary)
            if state == "corrupt":
                return Outcome(run, Status.CORRUPT, error=rd.problem() or "does not validate")
            if state == "running":
                return Outcome(run, RunOutcome.RUNNING_ELSEWHERE)
            cfg = self._config(run)
        except (CorruptRunError, OSError) as exc:
            return Outcome(run, RunOutcome.ERROR, error=f"{type(exc).__name__}: {exc}")
        self.events.write(event="start", run_id=run.run_id, cell=[run.cell.row, run.cell.column], seed=run.seed,
                          worker="in-process", resume=state == "resume")
        t0 = time.time()
        status: OutcomeStatus = RunOutcome.ERROR
        summary: dict[str, Any] = {}
        error: Optional[str] = None
        self._phase = "setup"
        try:
            result = run_one(cfg, on_trainer=self._on_trainer)
            self._phase = "idle"
            summary = dict(result.summary)
            status = result.status
            if status == RunOutcome.RUNNING_ELSEWHERE:
                summary = {}
            elif status not in SETTLED:
                error = summary.get("error") or summary.get("stop_reason")
        except _Abandon:
            status, error = RunOutcome.INTERRUPTED, "stopped by a signal before training started"
        except UserError as exc:
            status, error = RunOutcome.CONFIG_ERROR, str(exc)
        except LockLostError as exc:
            status, error = RunOutcome.ERROR, f"lock lost: {exc}"
        except Exception as exc:  # noqa: BLE001 - a run must not take the search down; its error is the outcome
            status, error = RunOutcome.ERROR, f"{type(exc).__name__}: {exc}"
            print(f"[sweep] run {run.run_id} raised:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        finally:
            self._phase, self._trainer = "idle", None
            _release_memory()
        if status == Status.PREEMPTED:  # the trainer's own handler saw the signal
            self._stop.set()
        seconds = time.time() - t0
        self.events.write(event="end", run_id=run.run_id, status=status, seconds=seconds, worker="in-process",
                          error=error)
        ran = status not in NOT_TRAINED and not summary.get("skipped")
        return Outcome(run, status, None, seconds, ran=ran, summary=summary, error=error)


def _release_memory() -> None:
    """Many runs in one process: drop the last run's objects and cached device memory before the next."""
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
