"""Progress lines for long commands and the scripts of `scripts/`: what is being done, how far, and an estimate of the time
left, at most every `every` seconds (and always on the first and the last step), on stderr so that the
results on stdout stay clean."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Eta:
    """`[prefix] what: 120/800 steps (15%), 1.2 min elapsed, ~6.8 min left` — the estimate assumes the remaining
    work goes at the average pace so far (work units should cost about the same)."""

    def __init__(self, prefix: str, total: int, unit: str = "steps", every: float = 10.0,
                 out: Optional[TextIO] = None) -> None:
        self.prefix, self.total, self.unit, self.every = prefix, max(1, int(total)), unit, every
        self.out = out or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.last: Optional[float] = None

    def step(self, what: str = "", n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.last is not None and now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"[{self.prefix}] {what + ': ' if what else ''}{self.done}/{self.total} {self.unit} "
              f"({100 * self.done / self.total:.0f}%), {_duration(elapsed)} elapsed, ~{_duration(left)} left",
              file=self.out, flush=True)

    def say(self, message: str) -> None:
        print(f"[{self.prefix}] {message}", file=self.out, flush=True)
