"""The record a finished run writes to `summary.json`: one typed dataclass that the run layer builds
(`fisherbench/engine/summary.py`) and the store validates against (`fisherbench/core/store.py`).

Each field says which JSON types a reader accepts for it (`accepts`); a reader requires `run_id` and `status`
and checks the type of every other field that is present (summaries written by older versions may lack
newer fields). Fields marked `optional` are left out of the file when they are None.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

_NONE = type(None)
NUMBER = (int, float)
REQUIRED = ("run_id", "status")


def _f(*accepts: type, optional: bool = False, default: Any = None) -> Any:
    return field(default=default, metadata={"accepts": accepts, "optional": optional})


@dataclass(frozen=True)
class RunSummary:
    """What `summary.json` holds (docs/running.md describes the fields)."""

    run_id: str = _f(str, default="")
    status: str = _f(str, default="")
    stop_reason: Optional[str] = _f(str, _NONE)
    choices: dict[str, Any] = _f(dict, default=None)
    experiment: Optional[str] = _f(str, _NONE)
    model: str = _f(str, default="")
    data: str = _f(str, default="")
    optimizer: str = _f(str, default="")
    seed: int = _f(int, default=0)
    task: str = _f(str, default="")
    select_metric: str = _f(str, default="")
    higher_is_better: bool = _f(bool, default=True)
    best: Optional[dict[str, Any]] = _f(dict, _NONE)
    final: Optional[dict[str, Any]] = _f(dict, _NONE)
    epochs_done: float = _f(*NUMBER, default=0.0)
    steps: int = _f(int, default=0)
    steps_per_epoch: int = _f(int, default=0)
    ledger: dict[str, Any] = _f(dict, default=None)
    step_s: Optional[float] = _f(float, int, _NONE)  # time per step on the budget clock
    load_avg: list[Optional[float]] = _f(list, default=None)  # 1-minute load average at start and end
    budget: dict[str, Any] = _f(dict, default=None)
    peak_memory_bytes: Optional[int] = _f(int, _NONE)
    optimizer_state_bytes: Optional[int] = _f(int, _NONE)
    param_count: Optional[int] = _f(int, _NONE)
    final_params_sha256: str = _f(str, default="")
    diverged: Optional[dict[str, Any]] = _f(dict, _NONE)
    error: Optional[str] = _f(str, _NONE)
    finished_at: str = _f(str, default="")
    reference_budget: Optional[dict[str, Any]] = _f(dict, optional=True)  # a derived budget's record
    world_size: Optional[int] = _f(int, optional=True)  # data-parallel runs only
    rank_params_sha256: Optional[list[str]] = _f(list, optional=True)  # every rank's final parameter hash

    def as_dict(self) -> dict[str, Any]:
        """The JSON object written to `summary.json` (optional fields left out when None)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (f.metadata["optional"] and value is None):
                out[f.name] = value
        return out


# key -> the JSON types a reader accepts (the store's validation reads this)
SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {f.name: f.metadata["accepts"] for f in dataclasses.fields(RunSummary)}
