"""Measuring optimizers' time per step against each other: ABBA blocks of whole curvature periods.

Arms (`TimedArm`: one optimizer on its own fresh model, drawing its own batches from the run's training
source the way the trainer does) take turns on one machine. docs/wall-clock.md ("Calibration") explains the
layout; fisherbench/core/calibration_stats.py turns the blocks into a ratio and an interval.

* Warm-up: each arm first takes max(`warmup`, P + 1) untimed steps (P: its curvature period, the option its
  capabilities name in `period_option`; 1 otherwise), so timed curvature steps are steady-state ones;
  compilation and cuDNN autotuning happen here too.
* Visits: an arm runs m consecutive steps at a time, m whole curvature periods (every visit holds exactly
  m / P curvature steps whatever its phase) and at least 32 steps on a GPU (the host runs ahead of the
  device as in the trainer; no synchronisation inside a visit, one at its end) or 1 on a CPU.
* Blocks: block b visits the arms in the order o_b + reversed(o_b) (ABBA for two arms), o_b rotated by b,
  so a linear drift of the machine's speed cancels within every block.
* Block value: an arm's wall time over its two visits in the block, divided by its steps in them: every
  step counted in full (curvature steps, data waits, the trainer's per-step loss bookkeeping), as a run's
  budget clock counts them. Nothing inside a block is trimmed; a burst of other work is averaged over
  blocks, as a run averages it over its steps.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.calibration_stats import fieller_interval
from fisherbench.core.env import compile_model, prepare_model, to_channels_last
from fisherbench.data.registry import DataBundle
from fisherbench.optim.registry import OPTIMIZERS, BuildContext, OptimizerAdapter, build_optimizer

# Shortest visit per device. On a GPU the host must run ahead of the device as in the trainer, and each visit
# ends with a synchronisation whose pipeline bubble costs up to min(host, device) time of one step: 32 steps
# keep that under ~3% of a visit. A CPU has no queue: single steps are exact, and the finest interleaving
# pairs the arms' steps most closely under a shared machine's changing load.
MIN_VISIT_STEPS = {"cuda": 32, "cpu": 1}


@dataclass
class TimedArm:
    """One optimizer on its own model, drawing its own batches."""

    name: str
    model: nn.Module
    adapter: OptimizerAdapter
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    period: Optional[int] = None  # curvature period (None: every step alike)
    steps: int = 0  # optimizer steps taken so far
    step_times: list[tuple[int, int, float]] = field(default_factory=list)  # (block, step index, seconds), timed

    def step(self, loss_fn: Callable[..., Any], autocast: Callable[..., Any], loss_buffer: torch.Tensor) -> None:
        x, y = next(self.batches)
        out = self.adapter.train_step(self.model, x, y, loss_fn, autocast)
        loss_buffer[self.steps % loss_buffer.numel()] = out.loss  # the trainer's per-step bookkeeping
        self.steps += 1


def sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def block_layout(periods: Sequence[Optional[int]], steps: int, min_blocks: int, min_visit_steps: int,
                 ) -> tuple[int, list[int]]:
    """(blocks, steps per visit of each arm): visits of whole curvature periods of at least `min_visit_steps`
    steps; as many blocks as `steps` timed steps per arm allow for the arm with the longest period (at least
    `min_blocks`). Every arm's visit is then about as long as the longest one (whole periods of its own, at
    least `steps` / (2 blocks)): what a visit costs beyond its steps (caches cold after the other arm ran, the
    synchronisation at its end) then weighs the same per step in every arm, instead of more in the arm with
    the shorter visits."""
    base = [max(1, p or 1) * math.ceil(min_visit_steps / max(1, p or 1)) for p in periods]
    blocks = max(min_blocks, steps // (2 * max(base)))
    target = max(max(base), math.ceil(steps / (2 * blocks)))
    return blocks, [max(1, p or 1) * math.ceil(target / max(1, p or 1)) for p in periods]


def abba_order(names: Sequence[str], block: int) -> list[str]:
    """The order in which block `block` visits the arms: o + reversed(o), o rotated by the block index."""
    k = block % len(names)
    rotated = [*names[k:], *names[:k]]
    return rotated + rotated[::-1]


@dataclass
class WarmUp:
    steps: int
    first_step_s: float  # the first step of the fresh arm (one-off costs: allocation, autotuning, compilation)
    step_s: float  # mean of the warm-up steps after the first (a rough estimate, for planning)


class BlockMeter:
    """Measures ABBA blocks of `arms`, a given number at a time (the sequential rule asks for more)."""

    def __init__(self, arms: Sequence[TimedArm], loss_fn: Callable[..., Any], device: torch.device, *,
                 visit_steps: Sequence[int], autocast: Callable[..., Any] = lambda: torch.autocast("cpu", enabled=False),
                 timer: Callable[[], float] = time.perf_counter, sync: Optional[Callable[[], None]] = None,
                 mark_steps: bool = True) -> None:
        self.arms, self.loss_fn, self.device, self.autocast, self.timer = list(arms), loss_fn, device, autocast, timer
        self.visit = {arm.name: int(m) for arm, m in zip(arms, visit_steps)}
        self.sync = sync or sync_for(device)
        self.mark_steps = mark_steps  # per-step marks (ordinary/curvature split); block values never need them
        self.loss_buffer = torch.zeros(16, device=device)
        self.walls: dict[str, list[float]] = {arm.name: [] for arm in arms}  # per block: both visits' seconds
        self.order: list[list[str]] = []
        self.elapsed = 0.0  # seconds spent in measured blocks

    @property
    def blocks(self) -> int:
        return len(self.order)

    def warm_up(self, steps: int) -> dict[str, WarmUp]:
        """Untimed (for the ratio) steps of every arm: max(`steps`, P + 1) each, timed roughly for planning."""
        out = {}
        for arm in self.arms:
            n = max(steps, (arm.period or 1) + 1)
            t0 = self.timer()
            arm.step(self.loss_fn, self.autocast, self.loss_buffer)
            self.sync()
            t1 = self.timer()
            for _ in range(n - 1):
                arm.step(self.loss_fn, self.autocast, self.loss_buffer)
            self.sync()
            out[arm.name] = WarmUp(n, t1 - t0, (self.timer() - t1) / (n - 1))
        return out

    def quick_step_s(self, steps: int = 5) -> dict[str, float]:
        """Median seconds of `steps` single steps of each arm after one untimed step: a short fresh look at
        the machine's speed (checks a cached calibration for plausibility)."""
        out = {}
        for arm in self.arms:
            arm.step(self.loss_fn, self.autocast, self.loss_buffer)
            self.sync()
            times = []
            for _ in range(steps):
                t0 = self.timer()
                arm.step(self.loss_fn, self.autocast, self.loss_buffer)
                self.sync()
                times.append(self.timer() - t0)
            out[arm.name] = statistics.median(times)
        return out

    def measure(self, blocks: int) -> dict[str, list[float]]:
        """Measure `blocks` more blocks; returns each arm's per-step time (block wall / steps) in each."""
        names = [arm.name for arm in self.arms]
        by_name = {arm.name: arm for arm in self.arms}
        cuda = self.device.type == "cuda"
        new: dict[str, list[float]] = {n: [] for n in names}
        self.sync()
        for _ in range(blocks):
            b = len(self.order)
            sequence = abba_order(names, b)
            self.order.append(sequence)
            wall = dict.fromkeys(names, 0.0)
            for name in sequence:
                arm = by_name[name]
                marks: list[Any] = []  # CUDA events or host clock readings
                first = arm.steps
                t0 = self.timer()
                if cuda and self.mark_steps:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record()
                for _ in range(self.visit[name]):
                    arm.step(self.loss_fn, self.autocast, self.loss_buffer)
                    if self.mark_steps:
                        if cuda:
                            event = torch.cuda.Event(enable_timing=True)
                            event.record()
                            marks.append(event)
                        else:
                            marks.append(self.timer())
                self.sync()
                t1 = self.timer()
                wall[name] += t1 - t0
                self.elapsed += t1 - t0
                if self.mark_steps:
                    ends = [start.elapsed_time(e) / 1e3 for e in marks] if cuda else [t - t0 for t in marks]
                    previous = 0.0
                    for j, end in enumerate(ends):
                        arm.step_times.append((b, first + j, end - previous))
                        previous = end
            for name in names:
                self.walls[name].append(wall[name])
                new[name].append(wall[name] / (2 * self.visit[name]))
        return new

    def per_step(self, name: str) -> list[float]:
        """Per-step time of every block measured so far for arm `name`."""
        return [w / (2 * self.visit[name]) for w in self.walls[name]]


def curvature_phase(step_times: list[tuple[int, int, float]], period: Optional[int]) -> Optional[int]:
    """The phase (optimizer step index mod P) of the curvature steps, found empirically as the phase with the
    largest median time, so no optimizer's counting convention is assumed."""
    if not period or period <= 1:
        return None
    by_phase: dict[int, list[float]] = {}
    for _, k, t in step_times:
        by_phase.setdefault(k % period, []).append(t)
    return max(by_phase, key=lambda p: statistics.median(by_phase[p]))


def split_steps(step_times: list[tuple[int, int, float]], period: Optional[int]) -> dict[str, Optional[float]]:
    """Median ordinary and mean curvature step time over all blocks (reported, e.g. by
    scripts/bench_optimizers.py; budgets use the block walls)."""
    phase = curvature_phase(step_times, period)
    times = [t for _, _, t in step_times]
    if phase is None or period is None:
        return {"ordinary_s": statistics.median(times) if times else None, "curvature_s": None}
    ordinary = [t for _, k, t in step_times if k % period != phase]
    curvature = [t for _, k, t in step_times if k % period == phase]
    return {"ordinary_s": statistics.median(ordinary), "curvature_s": statistics.fmean(curvature)}


def measure(
    arms: Sequence[TimedArm],
    loss_fn: Callable[..., Any],
    device: torch.device,
    *,
    steps: int,
    min_blocks: int,
    warmup: int,
    min_period_steps: Optional[int] = None,
    autocast: Callable[..., Any] = lambda: torch.autocast("cpu", enabled=False),
    timer: Callable[[], float] = time.perf_counter,
    sync: Optional[Callable[[], None]] = None,
) -> dict[str, Any]:
    """A fixed number of ABBA blocks of any number of arms (scripts/bench_optimizers.py; a calibration
    measures sequentially, fisherbench/engine/calibrate.py). Restores every RNG afterwards.

    Returns {"blocks", "order", "arms": {name: {period, steps_per_visit, warmup_steps, timed_steps,
    block_step_s, amortised_s, ordinary_s, curvature_s}}}; `block_step_s[b]` is the arm's wall time in block b
    over its steps there.
    """
    if min_period_steps is None:
        min_period_steps = MIN_VISIT_STEPS.get(device.type, 1)
    blocks, per_visit = block_layout([a.period for a in arms], steps, min_blocks, min_period_steps)
    if blocks < 2:
        raise ValueError("a measurement needs at least 2 blocks")
    rng = ckpt.rng_state()
    try:
        meter = BlockMeter(arms, loss_fn, device, visit_steps=per_visit, autocast=autocast, timer=timer, sync=sync)
        warm = meter.warm_up(warmup)
        meter.measure(blocks)
    finally:
        ckpt.set_rng_state(rng)
    result: dict[str, Any] = {"blocks": blocks, "order": meter.order, "arms": {}}
    for arm in arms:
        block_step_s = meter.per_step(arm.name)
        result["arms"][arm.name] = {
            "period": arm.period, "steps_per_visit": meter.visit[arm.name], "warmup_steps": warm[arm.name].steps,
            "timed_steps": 2 * meter.visit[arm.name] * blocks, "block_step_s": block_step_s,
            "amortised_s": sum(meter.walls[arm.name]) / (2 * meter.visit[arm.name] * blocks),
            **split_steps(arm.step_times, arm.period),
        }
    return result


def ratio_of(candidate: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Ratio of mean per-step times and its 95% Fieller interval (one fixed-size measurement)."""
    est = fieller_interval(candidate, reference)
    return {"ratio": est.ratio, "ratio_ci": list[Any](est.ci), "blocks": est.blocks}


def batch_stream(bundle: DataBundle, device: torch.device, channels_last: bool,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training source epoch after epoch, moved like the trainer moves it. Partial last batches are left out
    (a new shape would recompile a compiled model inside a timed visit; the trainer pays that once per run)."""
    epoch, full = 0, None
    while True:
        for x, y in bundle.train.iterate(epoch):
            full = full or int(x.shape[0])
            if int(x.shape[0]) != full:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield (to_channels_last(x) if channels_last else x), y
        epoch += 1


def period_of(options: dict[str, Any]) -> Optional[int]:
    caps = OPTIMIZERS.get(options["name"]).capabilities
    key = getattr(caps, "period_option", None) if caps else None
    value = options.get(key) if key else None
    return int(value) if value else None


def make_arm(name: str, options: dict[str, Any], build_model: Callable[[], nn.Module], bundle: DataBundle,
             device: torch.device, *, channels_last: bool = False, compile: bool = False) -> TimedArm:
    """A fresh arm built the way a run builds its model and optimizer (same seed for every arm)."""
    torch.manual_seed(0)
    model = prepare_model(build_model().to(device), channels_last)
    if compile:
        model = compile_model(model)
    adapter = build_optimizer(options, model, BuildContext(device=device, steps_per_epoch=len(bundle.train)))
    return TimedArm(name, model, adapter, batch_stream(bundle, device, channels_last), period_of(options))
