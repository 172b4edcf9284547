"""Run a sweep on this machine: a queue of runs served by workers (one per GPU or GPU group, or CPU workers).

Each run is a `train.py` subprocess (under `torchrun` when a worker holds several GPUs), so a crash, an OOM or
a hung library cannot take the sweep down; its outcome is read back from the store. Before launching a run
the queue checks the store: finished runs are skipped and runs another process holds the lock for are left
to it (the runner's per-run lock is what guarantees that no run is ever trained twice at the same time; this
check only avoids starting a process for nothing). Interrupted runs resume from their checkpoint, because
`train.py` resumes by run id.

Every event is appended to `<results_dir>/_sweeps/<sweep>.events.jsonl`; each run's output goes to
`<results_dir>/_sweeps/logs/<run_id>.log`.
"""
from __future__ import annotations

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
from typing import Any, Optional, Sequence

from fisherbench.status import FINAL
from fisherbench.store import RunDir, lock_is_held
from sweep.expand import PlannedRun

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "train.py"
SWEEP_SUBDIR = "_sweeps"
# train.py exit codes (train.py's docstring): what a run ended as when it left no summary to read
EXIT_MEANING = {0: "completed", 1: "failed", 2: "config_error", 3: "diverged", 4: "preempted"}


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
    """Threads per CPU worker: the cores left idle at sweep start, shared among the workers (at least 1).

    Oversubscribed OpenMP threads spin against each other: on a busy 2-core machine a small CNN step took
    1.0 s with 2 threads and 0.047 s with 1, so the free cores, not all cores, set the count.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = max(1, int(cores - busy + 0.5))
    return max(1, min(cores, free) // workers)


def visible_gpus() -> list[str]:
    import torch

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
    """The command that trains `run`: `python train.py ...`, or `torchrun` for a multi-GPU data-parallel run."""
    args = [*run.overrides, f"results_dir={results_dir}", "logger.progress=never", *extra]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(TRAIN_SCRIPT), *args]
    return [sys.executable, str(TRAIN_SCRIPT), *args]


@dataclass
class Outcome:
    run: PlannedRun
    status: str  # a store status, or running_elsewhere / crashed (no summary) / config_error
    returncode: Optional[int] = None
    seconds: float = 0.0
    ran: bool = False  # trained by a train.py process of this sweep (not skipped as done / held elsewhere)
    summary: dict[str, Any] = field(default_factory=dict)


class EventLog:
    """Append-only JSONL of what the sweep did (one line per event, written atomically by O_APPEND)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, **event: Any) -> None:
        event = {"time": time.time(), "host": socket.gethostname(), "sweep_pid": os.getpid(), **event}
        line = json.dumps(event, sort_keys=True, default=str) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def store_state(results_dir: Path, run_id: str) -> str:
    """`final` (nothing to do), `running` (locked elsewhere), `resume`, or `new`."""
    rd = RunDir(results_dir / run_id)
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


class LocalRunner:
    """Serve the runs of a sweep from a queue to the workers; print one line per finished run."""

    def __init__(self, results_dir: Path, workers: Sequence[Worker], sweep_name: str, overwrite: bool = False,
                 extra_args: Sequence[str] = (), out=None, env: Optional[dict[str, str]] = None) -> None:
        self.results_dir = Path(results_dir).resolve()
        self.workers = list(workers)
        self.overwrite = overwrite
        self.extra_args = list(extra_args)
        self.out = out or sys.stdout
        self.extra_env = dict(env or {})
        self.events = EventLog(self.results_dir / SWEEP_SUBDIR / f"{sweep_name}.events.jsonl")
        self.log_dir = self.results_dir / SWEEP_SUBDIR / "logs"
        self._procs: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._print_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- public
    def run(self, runs: Sequence[PlannedRun]) -> list[Outcome]:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        todo: "queue.Queue[tuple[int, PlannedRun]]" = queue.Queue()
        for i, r in enumerate(runs):
            todo.put((i, r))
        outcomes: list[Optional[Outcome]] = [None] * len(runs)
        self._total, self._done, self._t0 = len(runs), 0, time.time()
        self.events.write(event="sweep_start", runs=len(runs), workers=[w.name for w in self.workers])
        threads = [threading.Thread(target=self._serve, args=(w, todo, outcomes), daemon=True) for w in self.workers]
        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGINT, self._interrupt)
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        done = [o for o in outcomes if o is not None]
        self.events.write(event="sweep_end", interrupted=self._stop.is_set(),
                          statuses=_count(o.status for o in done))
        return done

    # ---------------------------------------------------------------------------------------- workers
    def _interrupt(self, signum, frame) -> None:  # noqa: ANN001
        """Ctrl-C: stop handing out runs; running runs get SIGTERM (they checkpoint and stop as preempted)."""
        self._stop.set()
        with self._print_lock:
            print("\n[sweep] interrupted: stopping the running runs (they checkpoint; re-launch resumes them)",
                  file=self.out, flush=True)
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _serve(self, worker: Worker, todo: "queue.Queue", outcomes: list) -> None:
        while not self._stop.is_set():
            try:
                i, run = todo.get_nowait()
            except queue.Empty:
                return
            outcomes[i] = self._one(worker, run)
            self._report(outcomes[i], worker)

    def _one(self, worker: Worker, run: PlannedRun) -> Outcome:
        state = "new" if self.overwrite else store_state(self.results_dir, run.run_id)
        if state == "final":
            summary = RunDir(self.results_dir / run.run_id).summary() or {}
            return Outcome(run, str(summary.get("status")), summary=summary)
        if state == "running":
            return Outcome(run, "running_elsewhere")
        extra = [*self.extra_args, *(["overwrite=true"] if self.overwrite else [])]
        cmd = train_command(run, self.results_dir, worker.nproc, extra)
        log_path = self.log_dir / f"{run.run_id}.log"
        self.events.write(event="start", run_id=run.run_id, cell=[run.cell.row, run.cell.column], seed=run.seed,
                          worker=worker.name, resume=state == "resume", command=cmd)
        t0 = time.time()
        skipped = None  # what train.py said when it did not train (another process holds or finished the run)
        with open(log_path, "a") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {worker.name}: {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO_ROOT, text=True,
                                    env={**worker.env(), **self.extra_env}, start_new_session=True)
            self._procs[run.run_id] = proc
            try:
                for line in proc.stdout:  # relay to the run's log; our own process's output only
                    log.write(line)
                    log.flush()
                    if line.startswith("[fisherbench] skipped"):
                        skipped = line
                rc = proc.wait()
            finally:
                self._procs.pop(run.run_id, None)
        seconds = time.time() - t0
        status, summary = self._read_back(run, rc, skipped)
        self.events.write(event="end", run_id=run.run_id, status=status, returncode=rc, seconds=seconds,
                          worker=worker.name, trained=skipped is None)
        return Outcome(run, status, rc, seconds, ran=skipped is None and status != "config_error", summary=summary)

    def _read_back(self, run: PlannedRun, rc: int, skipped: Optional[str]) -> tuple[str, dict[str, Any]]:
        if skipped and "running_elsewhere" in skipped:
            return "running_elsewhere", {}
        summary = RunDir(self.results_dir / run.run_id).summary() or {}
        if summary.get("status"):
            return str(summary["status"]), summary
        if rc == 2:
            return "config_error", {}
        return ("crashed" if rc not in (0, 4) else EXIT_MEANING[rc]), {}

    def _report(self, outcome: Outcome, worker: Worker) -> None:
        with self._print_lock:
            self._done += 1
            elapsed = time.time() - self._t0
            n = f"[{self._done:>{len(str(self._total))}}/{self._total}]"
            detail = _metric_text(outcome.summary) if outcome.status not in ("running_elsewhere",) else ""
            took = f"{outcome.seconds:.0f}s" if outcome.ran else "-"
            log_hint = f" (log: {self.log_dir / (outcome.run.run_id + '.log')})" if outcome.status in (
                "failed", "crashed", "config_error", "oom") else ""
            print(f"{n} {outcome.status:<17} {outcome.run.label:<44} {detail:<26} {took:>6} "
                  f"{outcome.run.run_id} · {worker.name} · {elapsed / 60:.1f} min{log_hint}",
                  file=self.out, flush=True)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def summarize(outcomes: Sequence[Outcome]) -> str:
    counts = _count(o.status for o in outcomes)
    ran = sum(o.ran for o in outcomes)
    parts = [f"{k} {v}" for k, v in sorted(counts.items())]
    unfinished = [o for o in outcomes if o.status not in (*FINAL, "running_elsewhere")]
    line = f"[sweep] {len(outcomes)} runs: " + ", ".join(parts) + f" ({ran} trained now)"
    if counts.get("running_elsewhere"):
        line += "; running_elsewhere = another process holds the run (its lock); it finishes them"
    if unfinished:
        line += "; re-launch the same command to retry/resume the unfinished ones"
    return line
