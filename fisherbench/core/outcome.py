"""How one run process tells its launcher how it ended: a small JSON file, never its printed lines.

A sweep starts each `train.py` process with `FISHERBENCH_OUTCOME_FILE=<path>`; the process writes, atomically
and once, `{"run_id", "status", "exit_code", "error", "skipped"}` there just before it exits, on every path
it controls (finished, skipped, configuration error, lost lock, stopped before training). The launcher reads
the file as untrusted input (a process may die half-way, or a stranger may have written it): anything that
does not validate is ignored, and the launcher falls back on the exit code and the store. Printed messages
can be reworded freely: nothing parses them.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from fisherbench.core.status import OutcomeStatus, RunOutcome
from fisherbench.core.store import StoreLinkError, atomic_write_json, read_json

OUTCOME_FILE_ENV = "FISHERBENCH_OUTCOME_FILE"
_MAX_BYTES = 1 << 16  # an outcome is a few hundred bytes; a larger file is not one
_MAX_ERROR = 4000  # characters of the error message kept


@dataclass(frozen=True)
class ProcessOutcome:
    """How a run process ended: its run id (None when it never got one), the status it recorded or the
    launcher outcome (`config_error`, `lock_lost`, ...), its exit code, the message a user needs, and whether it
    skipped the run (finished already, or held by another process)."""

    run_id: Optional[str]
    status: OutcomeStatus
    exit_code: int
    error: Optional[str] = None
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": str(self.status)}


def write_outcome(outcome: ProcessOutcome, path: Optional[str] = None) -> None:
    """Write `outcome` to `path` (default: `$FISHERBENCH_OUTCOME_FILE`; nothing when neither is set).

    Only the main rank of a multi-process run writes (the ranks agree on the outcome). A failure to write is
    reported on stderr and never changes the exit code: the launcher falls back on the exit code and the store.
    """
    path = path or os.environ.get(OUTCOME_FILE_ENV)
    if not path or os.environ.get("RANK", "0") != "0":
        return
    try:
        atomic_write_json(Path(path), outcome.as_dict())
    except (OSError, StoreLinkError) as exc:  # StoreLinkError: a link planted where the file goes
        print(f"[fisherbench] cannot write the outcome file {path} ({getattr(exc, 'strerror', None) or exc})", flush=True)


def read_outcome(path: Path) -> Optional[ProcessOutcome]:
    """The outcome in `path`, or None when it is missing or does not validate (never trusted). It is read like
    any store file (`read_json`): never through a symbolic link, never from a FIFO or other non-regular file,
    at most `_MAX_BYTES`, no NaN literals, bounded nesting."""
    return parse_outcome(read_json(path, _MAX_BYTES))


def parse_outcome(obj: Any) -> Optional[ProcessOutcome]:
    """A validated `ProcessOutcome` from decoded JSON, or None."""
    if not isinstance(obj, dict):
        return None
    run_id, status, code = obj.get("run_id"), obj.get("status"), obj.get("exit_code")
    error, skipped = obj.get("error"), obj.get("skipped", False)
    if not (run_id is None or isinstance(run_id, str)) or not isinstance(status, str):
        return None
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(skipped, bool):
        return None
    if not (error is None or isinstance(error, str)):
        return None
    try:
        parsed = RunOutcome.parse(status)
    except ValueError:
        return None
    return ProcessOutcome(run_id, parsed, code, error[:_MAX_ERROR] if error else error, skipped)
