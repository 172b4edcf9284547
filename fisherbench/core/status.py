"""Run statuses: what a run directory says about a run, the exit code `train.py` returns for it, and whether
the run is final (a finished result that is not run again unless `overwrite=true`).

This is the one place these facts live; the store, the runner, the sweep and the reports read them here.
"""
from __future__ import annotations

import enum

# Exit codes of `train.py` and `python -m fisherbench sweep` that are not tied to a run status.
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # a run failed (a bug, out of memory, an unreadable store): see its error.txt
EXIT_USER_ERROR = 2  # something the user can fix (the message says what); nothing was trained
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 4  # stopped by a signal after a checkpoint; launch the same command again to resume


class Status(str, enum.Enum):
    """The status recorded in `summary.json` (and two states a reader can find instead of a summary)."""

    COMPLETED = "completed"  # trained for its whole budget
    BUDGET_EXHAUSTED = "budget_exhausted"  # a `seconds` budget ran out (the run is complete)
    DIVERGED = "diverged"  # a non-finite training loss: a result, recorded with the step where it happened
    OOM = "oom"  # out of device memory
    FAILED = "failed"  # an exception (a bug in the suite or a component): traceback in error.txt
    PREEMPTED = "preempted"  # SIGTERM / SIGINT / SIGUSR1: checkpointed, resumes when launched again
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
        return self in _FINAL

    @property
    def is_success(self) -> bool:
        """The run trained for its whole budget (its metrics are a result of the configured budget)."""
        return self in (Status.COMPLETED, Status.BUDGET_EXHAUSTED)

    @classmethod
    def parse(cls, value: object) -> "Status":
        """The status named by `value`; ValueError for anything else (store readers treat that as corrupt)."""
        if isinstance(value, Status):
            return value
        try:
            return cls(str(value))
        except ValueError:
            raise ValueError(f"unknown run status {value!r}; known: {', '.join(s.value for s in cls)}") from None


_EXIT_CODES = {
    Status.COMPLETED: EXIT_OK,
    Status.BUDGET_EXHAUSTED: EXIT_OK,
    Status.DIVERGED: EXIT_DIVERGED,
    Status.OOM: EXIT_RUN_FAILED,
    Status.FAILED: EXIT_RUN_FAILED,
    Status.PREEMPTED: EXIT_PREEMPTED,
    Status.UNFINISHED: EXIT_RUN_FAILED,
    Status.CORRUPT: EXIT_RUN_FAILED,
}
_FINAL = frozenset({Status.COMPLETED, Status.BUDGET_EXHAUSTED, Status.DIVERGED})

# The statuses a run can write into summary.json (UNFINISHED and CORRUPT are what readers find otherwise).
RECORDED = tuple(s for s in Status if s not in (Status.UNFINISHED, Status.CORRUPT))
FINAL = tuple(s for s in Status if s.is_final)
