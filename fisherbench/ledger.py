"""The time ledger: where a run's wall-clock time went.

`train_s` is the budget clock (data fetch + forward/backward + optimizer step, curvature work included);
`eval_s`, `log_s`, `ckpt_s`, `warmup_s` are excluded from the budget. `wall_s` runs from the start of the
training phase to its end, so the parts add up to it (up to loop bookkeeping). `data_s` is the part of
`train_s` spent waiting for batches; `setup_s` (building model, data, calibration) precedes the wall clock.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

PARTS = ("train_s", "eval_s", "log_s", "ckpt_s", "warmup_s")


@dataclass
class Ledger:
    train_s: float = 0.0
    eval_s: float = 0.0
    log_s: float = 0.0
    ckpt_s: float = 0.0
    warmup_s: float = 0.0
    wall_s: float = 0.0
    data_s: float = 0.0
    setup_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def parts_sum(self) -> float:
        return sum(getattr(self, p) for p in PARTS)


class Clock:
    """Measures sections into a `Ledger`. `sync` (e.g. torch.cuda.synchronize) runs before each reading so
    that GPU work is charged to the section that launched it."""

    def __init__(self, ledger: Ledger, sync: Optional[Callable[[], None]] = None) -> None:
        self.ledger = ledger
        self.sync = sync or (lambda: None)
        self._wall_start: Optional[float] = None
        self._mark: Optional[float] = None
        self._mark_parts = 0.0

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def start_wall(self) -> None:
        self._wall_start = self.settle()

    def stop_wall(self) -> None:
        if self._wall_start is not None:
            self.ledger.wall_s += self.settle() - self._wall_start
            self._wall_start = None
            self._mark = None

    def settle(self, part: str = "log_s") -> float:
        """Charge the loop's own bookkeeping since the last call (time no section measured) to `part`.

        Called at the boundaries of every training step, so that every moment of the wall clock lands in
        exactly one part of the ledger. Returns the current time.
        """
        t = self.now()
        parts = self.ledger.parts_sum()
        if self._mark is not None:
            unaccounted = (t - self._mark) - (parts - self._mark_parts)
            if unaccounted > 0:
                setattr(self.ledger, part, getattr(self.ledger, part) + unaccounted)
                parts += unaccounted
        self._mark, self._mark_parts = t, parts
        return t

    def wall_so_far(self) -> float:
        extra = time.perf_counter() - self._wall_start if self._wall_start is not None else 0.0
        return self.ledger.wall_s + extra

    @contextlib.contextmanager
    def section(self, part: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            setattr(self.ledger, part, getattr(self.ledger, part) + self.now() - t0)
