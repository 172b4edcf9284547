"""Run statuses and outcomes: what a run directory says about a run, what a launcher (train.py, a sweep) can
report about a run that recorded no status, the exit codes, and which of them need nothing more.

This is the one place these facts live; the store, the runner, the sweep, the search and the reports read
them here (never as string literals of their own).
"""
from __future__ import annotations

import enum
from typing import Union

# Exit codes of `train.py`, `python -m fisherbench sweep` and `python -m fisherbench search`.
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # a run failed (a bug, out of memory, an unreadable store): see its error.txt
EXIT_USER_ERROR = 2  # something the user can fix (the message says what); nothing was trained
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 4  # stopped by a signal after a checkpoint, or by a full disk; launch the same command again to resume
# a sweep or search stopped by a signal: its runs were preempted, so the same code (launch again to resume)
EXIT_INTERRUPTED = EXIT_PREEMPTED


class Status(str, enum.Enum):
    """The status recorded in `summary.json`, the trainer's in-progress state, and two states a reader can find
    instead of a summary."""

    COMPLETED = "completed"  # trained for its whole budget
    BUDGET_EXHAUSTED = "budget_exhausted"  # a `seconds` budget ran out (the run is complete)
    DIVERGED = "diverged"  # a non-finite training loss: a result, recorded with the step where it happened
    OOM = "oom"  # out of device memory
    FAILED = "failed"  # an exception (a bug in the suite or a component): traceback in error.txt
    PREEMPTED = "preempted"  # SIGTERM / SIGINT / SIGUSR1: checkpointed, resumes when launched again
    RUNNING = "running"  # the trainer's state while its loop runs; never recorded in a summary
    UNFINISHED = "unfinished"  # a run directory without a summary: running, or killed without a trace
    CORRUPT = "corrupt"  # a run directory whose files do not validate (see the reader's message)

    def __str__(self) -> str:
        return self.value

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]

    @property
    def is_final(self) -> bool:
        """A finished result: the same config is skipped, not re-run, unless `overwrite=true`."""
        return self in FINAL

    @property
    def is_success(self) -> bool:
        """The run trained for its whole budget (its metrics are a result of the configured budget)."""
        return self in SUCCESS

    @classmethod
    def parse(cls, value: object) -> Status:
        """The status named by `value`; ValueError for anything else (store readers treat that as corrupt)."""
        if isinstance(value, Status):
            return value
        try:
            return cls(str(value))
        except ValueError:
            raise ValueError(f"unknown run status {value!r}; known: {', '.join(s.value for s in cls)}") from None


class RunOutcome(str, enum.Enum):
    """What a launcher reports about a run that has no recorded status of its own to report (a run with a
    summary is reported by its `Status`)."""

    RUNNING_ELSEWHERE = "running_elsewhere"  # another process holds the run's lock; it finishes the run
    CONFIG_ERROR = "config_error"  # train.py refused the config (exit 2); nothing was trained
    LOCK_LOST = "lock_lost"  # the run's lock was deleted or replaced; this process wrote nothing more
    CRASHED = "crashed"  # the run process ended without a summary and without a known reason
    ERROR = "error"  # an exception in the sweep while serving the run (the sweep went on)
    INTERRUPTED = "interrupted"  # stopped by the sweep's signal before the run recorded a status
    NOT_STARTED = "not_started"  # the sweep was stopped before the run's turn
    DISK_FULL = "disk_full"  # the store's disk filled up while the run wrote (exit 4): resumable, nothing recorded

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object) -> OutcomeStatus:
        """A run status or a launcher outcome named by `value`; ValueError for anything else."""
        if isinstance(value, (Status, RunOutcome)):
            return value
        try:
            return cls(str(value))
        except ValueError:
            return Status.parse(value)


OutcomeStatus = Union[Status, RunOutcome]  # what a sweep reports for one planned run

_EXIT_CODES = {
    Status.COMPLETED: EXIT_OK,
    Status.BUDGET_EXHAUSTED: EXIT_OK,
    Status.DIVERGED: EXIT_DIVERGED,
    Status.OOM: EXIT_RUN_FAILED,
    Status.FAILED: EXIT_RUN_FAILED,
    Status.PREEMPTED: EXIT_PREEMPTED,
    Status.RUNNING: EXIT_RUN_FAILED,  # a loop that returned without a status is a bug
    Status.UNFINISHED: EXIT_RUN_FAILED,
    Status.CORRUPT: EXIT_RUN_FAILED,
}

# The runs that trained for their whole budget (their metrics are results of the configured budget).
SUCCESS: frozenset[Status] = frozenset({Status.COMPLETED, Status.BUDGET_EXHAUSTED})
# Finished results: skipped, never re-run, unless `overwrite=true` (a diverged run is a result).
FINAL: frozenset[Status] = SUCCESS | {Status.DIVERGED}
# The statuses a run can write into summary.json (RUNNING is in memory only; UNFINISHED and CORRUPT are what
# readers find otherwise).
RECORDED: frozenset[Status] = frozenset(Status) - {Status.RUNNING, Status.UNFINISHED, Status.CORRUPT}
# The outcomes that need nothing more from a sweep: a final result, or a run another process is finishing.
SETTLED: frozenset[OutcomeStatus] = frozenset({*FINAL, RunOutcome.RUNNING_ELSEWHERE})
# train.py's exit code -> what a run that left no summary ended as (train.py's docstring lists the codes)
OUTCOME_OF_EXIT: dict[int, OutcomeStatus] = {
    EXIT_OK: Status.COMPLETED,
    EXIT_RUN_FAILED: Status.FAILED,
    EXIT_USER_ERROR: RunOutcome.CONFIG_ERROR,
    EXIT_DIVERGED: Status.DIVERGED,
    EXIT_PREEMPTED: Status.PREEMPTED,
}
