"""The time ledger (where a run's wall-clock time went) and the clock that fills it without stalling a GPU.

`train_s` is the budget clock (data fetch + forward/backward + optimizer step, curvature work included);
`eval_s`, `log_s`, `ckpt_s`, `warmup_s` are excluded from the budget. `wall_s` runs from the start of the
training phase to its end, and the parts add up to it: every moment between two readings of the clock lands
in exactly one part. `data_s` is the part of `train_s` the loop spent waiting for batches; `setup_s`
(building model, data, calibration) precedes the wall clock.

How training time is measured without a host synchronisation per step:

* Training steps run in *segments*. A segment opens at a moment when the device is idle (right after a
  synchronisation: the start of training, the end of an evaluation or a checkpoint) and closes at the next
  synchronisation. Its length on the host clock, read after that synchronisation, is added to `train_s`, so
  `train_s` is exact wall time at every segment boundary, GPU work included.
* Inside a segment the loop marks each step boundary: on CUDA by recording an event (no synchronisation),
  on the CPU by reading `perf_counter`. Completed events are read lazily (`Event.query()` never waits), so
  the loop knows `train_s` up to a step a few steps behind the one it is launching, and estimates the rest
  from the mean step time. That estimate drives seconds budgets, the learning-rate schedule of seconds
  budgets and `eval.every_fraction`; `read_exact()` (one synchronisation) replaces it in the last steps of a
  seconds budget, so a run still stops at the first step boundary at or past its budget.
"""
from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch

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
    def from_dict(cls, d: dict[str, Any]) -> "Ledger":
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def parts_sum(self) -> float:
        return float(sum(getattr(self, p) for p in PARTS))


def _cuda_sync() -> None:
    torch.cuda.synchronize()


class Clock:
    """Measures a run's time into a `Ledger`; see the module docstring for the segment scheme.

    `device_type` is "cuda" (events, `torch.cuda.synchronize`) or anything else (host clock only).
    `timer` and `sync` can be replaced (tests use a fake timer). `syncs` counts the device synchronisations
    the clock itself performed (scripts/bench_harness.py reports them).
    """

    def __init__(self, ledger: Ledger, device_type: str = "cpu", timer: Callable[[], float] = time.perf_counter,
                 sync: Optional[Callable[[], None]] = None) -> None:
        self.ledger = ledger
        self.timer = timer
        self.cuda = device_type == "cuda"
        self._sync = sync or (_cuda_sync if self.cuda else (lambda: None))
        self.syncs = 0
        self._wall_start: Optional[float] = None
        self._mark: Optional[float] = None  # host time of the last reading that settled the ledger
        self._mark_parts = 0.0
        # the open training segment
        self._seg_start: Optional[float] = None  # host time it opened (the device was idle then)
        self._seg_base = 0.0  # train_s when it opened
        self._seg_first_step = 0
        self._start_event: Any = None
        self._events: collections.deque[tuple[int, Any]] = collections.deque()  # (step, event) recorded, not yet known done
        self._known: tuple[int, float] = (0, 0.0)  # (step, seconds into the segment) of the latest known boundary
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=256)  # (step, train_s) of known boundaries
        self._last_duration = 0.0  # the longest recent step (margin for seconds budgets)
        # mean step time over everything measured so far (for estimates before a segment has data)
        self._steps_measured = 0
        self._seconds_measured = 0.0

    # ------------------------------------------------------------------------------------ basic readings
    def device_sync(self) -> None:
        """Wait until the device has done everything queued so far (a no-op on the CPU, still counted)."""
        self.syncs += 1
        self._sync()

    def now(self) -> float:
        self.device_sync()
        return self.timer()

    def start_wall(self) -> None:
        self._wall_start = self.now()
        self._mark, self._mark_parts = self._wall_start, self.ledger.parts_sum()

    def stop_wall(self, step: Optional[int] = None) -> None:
        if self._wall_start is None:
            return
        self.close_segment(step)
        t = self.settle()
        self.ledger.wall_s += t - self._wall_start
        self._wall_start = None
        self._mark = None

    def settle(self, part: str = "log_s", t: Optional[float] = None) -> float:
        """Charge the time since the last settled reading that no part measured (the loop's own
        bookkeeping) to `part`, so that the parts add up to the wall clock. Returns the current time."""
        t = self.timer() if t is None else t
        parts = self.ledger.parts_sum()
        if self._mark is not None:
            unaccounted = (t - self._mark) - (parts - self._mark_parts)
            if unaccounted > 0:
                setattr(self.ledger, part, getattr(self.ledger, part) + unaccounted)
                parts += unaccounted
        self._mark, self._mark_parts = t, parts
        return t

    def wall_so_far(self) -> float:
        extra = self.timer() - self._wall_start if self._wall_start is not None else 0.0
        return self.ledger.wall_s + extra

    @contextlib.contextmanager
    def section(self, part: str) -> Iterator[None]:
        """Time a block (evaluation, checkpoint, warm-up, ...) into `part`, synchronised at both edges."""
        self.close_segment()
        t0 = self.settle(t=self.now())
        try:
            yield
        finally:
            t1 = self.now()
            setattr(self.ledger, part, getattr(self.ledger, part) + t1 - t0)
            self.settle(t=t1)

    # ------------------------------------------------------------------------------- training segments
    def open_segment(self, step: int) -> None:
        """Start timing training steps (no-op when a segment is open). The device must be idle: call it
        only after a synchronised reading (start, section, close), as the trainer does."""
        if self._seg_start is not None:
            return
        t = self.settle()
        self._seg_start, self._seg_base, self._seg_first_step = t, self.ledger.train_s, step
        self._known = (step, 0.0)
        self._events.clear()
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def step_done(self, step: int) -> None:
        """Mark the end of optimizer step `step` (no synchronisation)."""
        if self._seg_start is None:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append((step, event))
            self.poll()
        else:
            self._learn(step, self.timer() - self._seg_start)

    def poll(self) -> None:
        """Read every step-boundary event the device has passed (never waits)."""
        while self._events and self._events[0][1].query():
            step, event = self._events.popleft()
            self._learn(step, self._start_event.elapsed_time(event) / 1e3)

    def _learn(self, step: int, seconds: float) -> None:
        prev_step, prev_s = self._known
        if step > prev_step:
            self._last_duration = max(0.9 * self._last_duration, (seconds - prev_s) / (step - prev_step))
        self._known = (step, seconds)
        self._recent.append((step, self._seg_base + seconds))

    def mean_step_s(self) -> float:
        """Mean step time: of the open segment where it has data, else of everything measured so far."""
        step, seconds = self._known
        if self._seg_start is not None and step > self._seg_first_step:
            return seconds / (step - self._seg_first_step)
        return self._seconds_measured / self._steps_measured if self._steps_measured else 0.0

    def margin_s(self) -> float:
        """How far ahead of a seconds budget the loop switches to exact readings: two long steps."""
        return 2.0 * max(self._last_duration, self.mean_step_s())

    def train_s_estimate(self, step: int) -> float:
        """`train_s` at the end of step `step`: known up to a recent step, extrapolated with the mean step."""
        if self._seg_start is None:
            return self.ledger.train_s
        known_step, seconds = self._known
        return self._seg_base + seconds + max(0, step - known_step) * self.mean_step_s()

    def read_exact(self, step: int) -> float:
        """`train_s` at the end of step `step` (the last one launched), exactly: one synchronisation."""
        if self._seg_start is None:
            return self.ledger.train_s
        self.device_sync()
        seconds = self.timer() - self._seg_start
        self._events.clear()
        self._learn(step, seconds)
        return self._seg_base + seconds

    def train_s_at(self, step: int) -> Optional[float]:
        """`train_s` at the end of an earlier step, where the clock still knows it (recent steps)."""
        for s, value in reversed(self._recent):
            if s == step:
                return value
            if s < step:
                break
        return None

    def close_segment(self, step: Optional[int] = None, synced: bool = False) -> None:
        """End the open segment: `train_s` becomes exact. `synced`: the caller has just synchronised."""
        if self._seg_start is None:
            return
        if not synced:
            self.device_sync()
        t = self.timer()
        if self.cuda:
            self.poll()  # everything has completed: learn the last boundaries (train_s_at)
        if step is not None and step > self._seg_first_step:
            self._learn(step, t - self._seg_start)
            self._steps_measured += step - self._seg_first_step
            self._seconds_measured += t - self._seg_start
        self.ledger.train_s = self._seg_base + (t - self._seg_start)
        self._seg_start, self._start_event = None, None
        self._events.clear()
        self._mark, self._mark_parts = t, self.ledger.parts_sum()
