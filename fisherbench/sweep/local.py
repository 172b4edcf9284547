"""Run a sweep on this machine: a queue of runs served by workers (one per GPU or GPU group, or CPU workers).

Each run is a `train.py` subprocess (under `torchrun` when a worker holds several GPUs), so a crash, an OOM or
a hung library cannot take the sweep down; its outcome is read back from the store. Before launching a run
the queue checks the store: finished runs are skipped and runs another process holds the lock for are left
to it (the runner's per-run lock is what guarantees that no run is ever trained twice at the same time; this
check only avoids starting a process for nothing). Interrupted runs resume from their checkpoint, because
`train.py` resumes by run id.

Every event is appended to `<results_dir>/_sweeps/<sweep>.events.jsonl`; each run's output goes to
`<results_dir>/_sweeps/logs/<run_id>.log`.

No fault drops a run silently: a worker never dies on an exception (the run it was serving ends as `error`
with the message, and the worker takes the next run), a corrupt run directory is reported as `corrupt` with
its path and the problem, and every planned run ends with an outcome (`not_started` when the sweep was
stopped before it). SIGTERM / SIGINT (Ctrl-C) stop the sweep: no new run starts, the running `train.py`
processes get SIGTERM (they checkpoint and stop as `preempted`), the sweep waits for them, records its end
and exits with `EXIT_INTERRUPTED` (4); running the same command again resumes.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from fisherbench.core.env import idle_cores
from fisherbench.core.orphans import child_env, die_with_parent_kwargs
from fisherbench.core.outcome import OUTCOME_FILE_ENV, ProcessOutcome, read_outcome
from fisherbench.core.status import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RUN_FAILED,
    EXIT_USER_ERROR,
    OUTCOME_OF_EXIT,
    SETTLED,
    OutcomeStatus,
    RunOutcome,
    Status,
)
from fisherbench.core.store import CorruptRunError, RunDir, append_text, lock_is_held, open_append
from fisherbench.sweep.expand import PlannedRun
from fisherbench.sweep.overrides import override, shell_line

# the children import the same fisherbench as this process (a checkout, an editable install or a wheel),
# whatever folder they run in: the environment says where, nothing edits sys.path
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
TRAIN_MODULE = ("-m", "fisherbench", "train")
SWEEP_SUBDIR = "_sweeps"
# `python -m fisherbench sweep` exits EXIT_OK when every run finished (or is being finished by another
# process), EXIT_RUN_FAILED when some run did not (failed, crashed, corrupt, ...: listed at the end),
# EXIT_USER_ERROR for a usage/spec error, EXIT_INTERRUPTED when stopped by a signal (resumable).
# outcomes of runs no process of this sweep trained
NOT_TRAINED = frozenset({RunOutcome.RUNNING_ELSEWHERE, RunOutcome.CONFIG_ERROR, RunOutcome.INTERRUPTED})
# outcomes the closing lines list as needing attention besides `corrupt`
_STOPPED = frozenset({RunOutcome.NOT_STARTED, RunOutcome.INTERRUPTED, Status.PREEMPTED})
# outcomes whose run log is worth opening
_SEE_LOG = frozenset({Status.FAILED, Status.OOM, RunOutcome.CRASHED, RunOutcome.CONFIG_ERROR})
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)


@dataclass(frozen=True)
class Worker:
    """A slot that runs one run at a time: GPU ids it may see (empty = CPU) and its thread count."""

    name: str
    gpus: tuple[str, ...] = ()
    threads: Optional[int] = None
    hide_gpus: bool = False

    @property
    def nproc(self) -> int:
        return max(1, len(self.gpus))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        elif self.hide_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # `--gpus none` on a machine with GPUs: train on the CPU
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env


def cpu_threads(workers: int) -> int:
    """Threads per CPU worker: the cores left idle at sweep start (`core.env.idle_cores`), shared among the
    workers (at least 1)."""
    return max(1, idle_cores()[1] // workers)


def visible_gpus() -> list[str]:
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def make_workers(gpus: Optional[str] = "auto", cpu_workers: int = 1, gpus_per_run: int = 1,
                 threads: Optional[int] = None) -> list[Worker]:
    """`gpus="0,1,2,3"` -> one worker per GPU (or per group of `gpus_per_run`); `auto` (or None) -> every GPU
    this process sees, else CPU workers with `threads` threads each (default: `cpu_threads`); `none` -> CPU
    workers even where there are GPUs."""
    hide = gpus == "none"
    if gpus in (None, "auto"):
        gpus = ",".join(visible_gpus()) or None
    elif hide:
        gpus = None
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if gpus_per_run < 1 or len(ids) % gpus_per_run:
            raise ValueError(f"--gpus-per-run {gpus_per_run} must divide the {len(ids)} GPUs given ({gpus})")
        groups = [tuple(ids[i:i + gpus_per_run]) for i in range(0, len(ids), gpus_per_run)]
        return [Worker(f"gpu{'+'.join(g)}", g) for g in groups]
    if cpu_workers < 1:
        raise ValueError("--workers must be >= 1")
    threads = threads or cpu_threads(cpu_workers)
    return [Worker(f"cpu{i}", (), threads, hide_gpus=hide) for i in range(cpu_workers)]


def train_command(run: PlannedRun, results_dir: Path, nproc: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """The command that trains `run`: `python -m fisherbench train ...`, or `torchrun` for a multi-GPU
    data-parallel run."""
    args = [*run.overrides, override("results_dir", str(results_dir)), "logger.progress=never", *extra]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--module", "fisherbench", "train", *args]
    return [sys.executable, *TRAIN_MODULE, *args]


@dataclass
class Outcome:
    run: PlannedRun
    # a store status (corrupt: the run directory does not validate), or a RunOutcome (core/status.py)
    status: OutcomeStatus
    returncode: Optional[int] = None
    seconds: float = 0.0
    ran: bool = False  # trained by a train.py process of this sweep (not skipped as done / held elsewhere)
    summary: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # what went wrong, for every outcome that is not a result


class EventLog:
    """Append-only JSONL of what the sweep did (one line per event, written atomically by O_APPEND)."""

    def __init__(self, path: Path, out=None, below: Optional[Path] = None) -> None:
        self.path = path
        self.below = below  # the store root: no directory between it and the log may be a link
        self.out = out or sys.stderr
        self._lock = threading.Lock()
        self._warned = False

    def write(self, **event: Any) -> None:
        """Append one event. The log is a record, not the sweep: a failure to write it is reported once."""
        event = {"time": time.time(), "host": socket.gethostname(), "sweep_pid": os.getpid(), **event}
        line = json.dumps(event, sort_keys=True, default=str) + "\n"
        with self._lock:
            try:
                append_text(self.path, line, below=self.below)  # never through a planted link
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    print(f"[sweep] cannot write the event log {self.path} ({exc.strerror or exc}); "
                          "the sweep goes on without it", file=self.out, flush=True)


def store_state(results_dir: Path, run_id: str) -> str:
    """`final` (nothing to do), `running` (locked elsewhere), `corrupt`, `resume`, or `new`."""
    rd = RunDir(results_dir / run_id)
    if rd.path.exists():
        if rd.problem() is not None:
            return "corrupt"
        if rd.is_final():
            return "final"
    if lock_is_held(results_dir, run_id):
        return "running"
    return "resume" if rd.exists() else "new"


def _metric_text(summary: dict[str, Any]) -> str:
    metric = summary.get("select_metric")
    best = (summary.get("best") or {}).get(metric) if metric else None
    if isinstance(best, (int, float)):
        return f"best {metric} {best:.4f}"
    return ""


def _budget_mode(run: PlannedRun) -> str:
    try:
        return str(run.config.budget.mode)
    except Exception:  # noqa: BLE001 - a planned run without a composed budget keeps its place
        return ""


class LocalRunner:
    """Serve the runs of a sweep from a queue to the workers; print one line per finished run.

    `run()` returns one outcome per planned run, in plan order, whatever happened; `interrupted` says whether a
    stop signal ended it early.
    """

    def __init__(self, results_dir: Path, workers: Sequence[Worker], sweep_name: str, overwrite: bool = False,
                 extra_args: Sequence[str] = (), out=None, env: Optional[dict[str, str]] = None) -> None:
        self.results_dir = Path(results_dir).resolve()
        self.workers = list(workers)
        self.overwrite = overwrite
        self.extra_args = list(extra_args)
        self.out = out or sys.stdout
        self.extra_env = dict(env or {})
        self.events = EventLog(self.results_dir / SWEEP_SUBDIR / f"{sweep_name}.events.jsonl", self.out,
                               below=self.results_dir)
        self.log_dir = self.results_dir / SWEEP_SUBDIR / "logs"
        self._procs: dict[str, subprocess.Popen] = {}
        self._launches = itertools.count()  # numbers this process's launches (outcome file names)
        self._procs_lock = threading.Lock()
        self._stop = threading.Event()
        self._signals: list[int] = []
        self._print_lock = threading.Lock()

    @property
    def interrupted(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------------------- public
    def run(self, runs: Sequence[PlannedRun]) -> list[Outcome]:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        todo: "queue.Queue[tuple[int, PlannedRun]]" = queue.Queue()
        # runs with a fixed budget (the reference arms) are served first: an equal-time run that starts after
        # its cell's reference run has finished takes that run's measured time (budget.reference_method=auto)
        # instead of an estimate; outcomes keep the planned order
        for i, r in sorted(enumerate(runs), key=lambda ir: _budget_mode(ir[1]) in ("reference", "match")):
            todo.put((i, r))
        outcomes: list[Optional[Outcome]] = [None] * len(runs)
        self._total, self._done, self._t0 = len(runs), 0, time.time()
        self.events.write(event="sweep_start", runs=len(runs), workers=[w.name for w in self.workers])
        threads = [threading.Thread(target=self._serve, args=(w, todo, outcomes), daemon=True) for w in self.workers]
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                previous[s] = signal.signal(s, self._interrupt)
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        done: list[Outcome] = []
        for r, o in zip(runs, outcomes):
            if o is None:  # only a stopped sweep leaves runs unserved; say so rather than drop them
                o = Outcome(r, RunOutcome.NOT_STARTED if self._stop.is_set() else RunOutcome.ERROR,
                            error=None if self._stop.is_set() else "never served (a bug in the sweep's queue)")
            done.append(o)
        self.events.write(event="sweep_end", interrupted=self._stop.is_set(),
                          signals=[signal.Signals(s).name for s in self._signals],
                          statuses=_count(o.status for o in done), exit_code=exit_code(done, self._stop.is_set()))
        return done

    # ---------------------------------------------------------------------------------------- workers
    def _interrupt(self, signum, frame) -> None:  # noqa: ANN001
        """SIGINT/SIGTERM: stop handing out runs; running runs get SIGTERM (they checkpoint, stop as preempted).

        Runs in the main thread, which only waits for the workers: it never holds the print or process lock
        when the signal arrives, so taking them here cannot deadlock.
        """
        first = not self._stop.is_set()
        self._signals.append(signum)
        self._stop.set()
        with self._procs_lock:
            procs = list(self._procs.values())
        running = [p for p in procs if p.poll() is None]
        name = signal.Signals(signum).name
        if len(self._signals) >= 3:  # asked three times: the runs do not stop by themselves, so end them
            for proc in running:
                _kill(proc, signal.SIGKILL)
            msg = f"{name} again: killing {len(running)} run(s) (they resume from their last checkpoint)"
        else:
            for proc in running:
                _kill(proc, signal.SIGTERM)
            msg = (f"{name}: stopping; {len(running)} running run(s) checkpoint and stop (`preempted`); "
                   "run the same command again to resume" if first else
                   f"{name} again: still waiting for {len(running)} run(s) to checkpoint (a third signal kills them)")
        print(f"\n[sweep] {msg}", file=self.out, flush=True)

    def _serve(self, worker: Worker, todo: "queue.Queue", outcomes: list) -> None:
        """One worker's loop. Nothing raised while serving a run ends the loop: the run gets an `error` outcome."""
        while not self._stop.is_set():
            try:
                i, run = todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = self._one(worker, run)
            except Exception as exc:  # noqa: BLE001 - a worker thread must survive anything one run does
                outcome = Outcome(run, RunOutcome.ERROR, error=f"{type(exc).__name__}: {exc}")
                self.events.write(event="error", run_id=run.run_id, worker=worker.name, error=outcome.error)
            outcomes[i] = outcome
            try:
                self._report(outcome, worker)
            except Exception as exc:  # noqa: BLE001 - e.g. a closed stdout: the sweep goes on
                self.events.write(event="error", run_id=run.run_id, worker=worker.name,
                                  error=f"reporting: {type(exc).__name__}: {exc}")

    def _one(self, worker: Worker, run: PlannedRun) -> Outcome:
        rd = RunDir(self.results_dir / run.run_id)
        state = "new" if self.overwrite else store_state(self.results_dir, run.run_id)
        if state == "final":
            summary = rd.summary() or {}
            return Outcome(run, Status.parse(summary.get("status")), summary=summary)
        if state == "corrupt":
            problem = rd.problem() or "does not validate"
            self.events.write(event="corrupt", run_id=run.run_id, path=str(rd.path), problem=problem)
            return Outcome(run, Status.CORRUPT, error=problem)
        if state == "running":
            return Outcome(run, RunOutcome.RUNNING_ELSEWHERE)
        extra = [*self.extra_args, *(["overwrite=true"] if self.overwrite else [])]
        cmd = train_command(run, self.results_dir, worker.nproc, extra)
        log_path = self.log_dir / f"{run.run_id}.log"
        self.events.write(event="start", run_id=run.run_id, cell=[run.cell.row, run.cell.column], seed=run.seed,
                          worker=worker.name, resume=state == "resume", command=cmd)
        t0 = time.time()
        # one file per launch: two sweeps sharing a store may start the same run at once (one trains, the other
        # finds it held or done), and each must read its own process's outcome, not the other's
        outcome_path = self.log_dir / f"{run.run_id}.{os.getpid()}.{next(self._launches)}.outcome.json"
        outcome_path.unlink(missing_ok=True)  # a previous attempt's file says nothing about this one
        with os.fdopen(open_append(log_path, below=self.results_dir), "a") as log:  # never through a link
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {worker.name}: {shell_line(cmd)}\n")
            log.flush()
            env = {**worker.env(), **self.extra_env}
            env["PYTHONPATH"] = os.pathsep.join(x for x in (PACKAGE_PARENT, env.get("PYTHONPATH")) if x)
            env[OUTCOME_FILE_ENV] = str(outcome_path)  # how the run ended, as data (its output is for people)
            # the child stops (SIGTERM: it checkpoints) when this process dies, even of SIGKILL
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=child_env(env), start_new_session=True, **die_with_parent_kwargs())
            with self._procs_lock:
                self._procs[run.run_id] = proc
                stopping = self._stop.is_set()
            if stopping:  # the stop signal came while this run was starting: it stops too
                _kill(proc, signal.SIGTERM)
            try:
                for line in proc.stdout:  # relay to the run's log; our own process's output only
                    log.write(line)
                    log.flush()
                rc = proc.wait()
            finally:
                with self._procs_lock:
                    self._procs.pop(run.run_id, None)
                if proc.poll() is None:  # relaying failed (e.g. the log's disk is full): never orphan the run
                    _kill(proc, signal.SIGTERM)
                    proc.wait()
        seconds = time.time() - t0
        said = _own_outcome(read_outcome(outcome_path), run, rc)
        outcome_path.unlink(missing_ok=True)
        status, summary, error = self._read_back(run, rc, said)
        trained = not (said is not None and said.skipped) and status != RunOutcome.CONFIG_ERROR
        self.events.write(event="end", run_id=run.run_id, status=status, returncode=rc, seconds=seconds,
                          worker=worker.name, trained=trained, error=error)
        return Outcome(run, status, rc, seconds, ran=trained, summary=summary, error=error)

    def _read_back(self, run: PlannedRun, rc: int,
                   said: Optional[ProcessOutcome]) -> tuple[OutcomeStatus, dict[str, Any], Optional[str]]:
        """(outcome status, summary, error message) of a finished train.py process, from the store, its exit
        code and the outcome file it wrote (`said`: validated, None when it wrote none); never from its output."""
        if said is not None and said.status == RunOutcome.RUNNING_ELSEWHERE:
            return RunOutcome.RUNNING_ELSEWHERE, {}, None
        rd = RunDir(self.results_dir / run.run_id)
        try:
            summary = rd.summary() or {}
        except CorruptRunError as exc:
            return Status.CORRUPT, {}, exc.problem
        if summary.get("status"):
            status = Status.parse(summary["status"])
            error = None if status in SETTLED else (summary.get("error") or summary.get("stop_reason"))
            return status, summary, error
        if self._stop.is_set() and (rc == EXIT_PREEMPTED or rc < 0):
            return RunOutcome.INTERRUPTED, {}, f"stopped by the sweep's signal before it recorded a status (exit {rc})"
        if said is not None and not said.skipped:  # no summary: the process says why (config error, lost lock, ...)
            return said.status, {}, said.error
        if rc in (EXIT_OK, EXIT_USER_ERROR, EXIT_PREEMPTED):
            return OUTCOME_OF_EXIT[rc], {}, None
        return RunOutcome.CRASHED, {}, f"train.py exited {rc} without a summary"

    def _report(self, outcome: Outcome, worker: Worker) -> None:
        with self._print_lock:
            self._done += 1
            elapsed = time.time() - self._t0
            n = f"[{self._done:>{len(str(self._total))}}/{self._total}]"
            detail = _metric_text(outcome.summary) if outcome.status != RunOutcome.RUNNING_ELSEWHERE else ""
            took = f"{outcome.seconds:.0f}s" if outcome.ran else "-"
            hint = ""
            if outcome.status == Status.CORRUPT:
                hint = f" (corrupt: {outcome.error})"
            elif outcome.status == RunOutcome.ERROR:
                hint = f" (error: {outcome.error})"
            elif outcome.status in _SEE_LOG:
                hint = f" (log: {self.log_dir / (outcome.run.run_id + '.log')})"
            print(f"{n} {outcome.status:<17} {outcome.run.label:<44} {detail:<26} {took:>6} "
                  f"{outcome.run.run_id} · {worker.name} · {elapsed / 60:.1f} min{hint}",
                  file=self.out, flush=True)


def _own_outcome(said: Optional[ProcessOutcome], run: PlannedRun, rc: int) -> Optional[ProcessOutcome]:
    """`said` if it is this process's account of this run (same run id when it names one, same exit code),
    else None: the sweep then decides from the exit code and the store alone."""
    if said is None or (said.run_id is not None and said.run_id != run.run_id) or said.exit_code != rc:
        return None
    return said


def _kill(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):  # it ended meanwhile
        pass


def _count(items: Iterable[OutcomeStatus]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


def exit_code(outcomes: Sequence[Outcome], interrupted: bool = False) -> int:
    """The sweep's exit code: 4 stopped by a signal, 1 a run did not finish, else 0 (see EXIT_INTERRUPTED)."""
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(o.status in SETTLED for o in outcomes) else EXIT_RUN_FAILED


def summarize(outcomes: Sequence[Outcome], results_dir: Optional[Path] = None, interrupted: bool = False) -> str:
    """The closing lines: counts per outcome, then every run that needs attention, with its path or error."""
    counts = _count(o.status for o in outcomes)
    ran = sum(o.ran for o in outcomes)
    parts = [f"{k} {v}" for k, v in sorted(counts.items())]
    lines = [f"[sweep] {len(outcomes)} runs: " + ", ".join(parts) + f" ({ran} trained now)"]
    if counts.get(RunOutcome.RUNNING_ELSEWHERE):
        lines[0] += "; running_elsewhere = another process holds the run (its lock); it finishes them"
    corrupt = [o for o in outcomes if o.status == Status.CORRUPT]
    if corrupt:
        lines.append(f"[sweep] {len(corrupt)} corrupt run director{'y' if len(corrupt) == 1 else 'ies'} (nothing "
                     "was changed in them; inspect, then delete them or pass --overwrite to train them again):")
        for o in corrupt:
            path = (Path(results_dir) / o.run.run_id) if results_dir is not None else o.run.run_id
            lines.append(f"  {path}  {o.run.label}: {o.error}")
    problems = [o for o in outcomes if o.status not in SETTLED | _STOPPED | {Status.CORRUPT}]
    if problems:
        lines.append(f"[sweep] {len(problems)} run(s) did not finish:")
        for o in problems:
            lines.append(f"  {o.status:<13} {o.run.run_id}  {o.run.label}" + (f": {o.error}" if o.error else ""))
    if interrupted:
        lines.append("[sweep] stopped by a signal (exit 4): run the same command again to resume the interrupted "
                     "runs and start the others")
    elif any(o.status not in SETTLED for o in outcomes):
        lines.append("[sweep] re-launch the same command to retry/resume the unfinished ones")
    return "\n".join(lines)
