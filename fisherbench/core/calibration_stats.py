"""Pure statistics of an equal-time calibration (no torch): the step-time ratio of two optimizers from paired
ABBA blocks, its confidence interval, the sequential rule that decides when to stop measuring, and the step
budget the ratio gives. docs/wall-clock.md explains every rule here; fisherbench/engine/calibration_measure.py
measures and fisherbench/engine/calibrate.py puts the two together.

Each block b gives one value per arm: the arm's wall time in that block divided by its steps in it (every
step, curvature steps and data waits included: what a run's budget clock pays, nothing trimmed). The ratio
is the ratio of the arms' mean block values, i.e. the candidate's total time per step over the reference's:
the quantity a run pays. A mean of per-block *log* ratios (or any robust centre of them) would estimate a
median-like quantity instead, biased low when an arm's step times have a slow tail. The interval is
Fieller's for a ratio of two paired means (Student t, B - 1 degrees of freedom).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

from scipy.stats import t as student_t

CONFIDENCE = 0.95
LOOKS = 4  # pre-planned looks of the sequential rule, at n1, 2 n1, 4 n1, 8 n1 blocks
LOOK_GROWTH = 2
MIN_BLOCKS = 6  # the first look never has fewer blocks (5 degrees of freedom)


def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 samples")
    return float(student_t.ppf(p, df))


@dataclass(frozen=True)
class RatioEstimate:
    """The candidate/reference step-time ratio from `blocks` paired blocks, with its two-sided interval at
    `level` (the per-look level of the sequential rule: see `look_level`)."""

    ratio: float
    ci: tuple[float, float]  # (lo, hi); hi is math.inf when the blocks cannot bound it
    blocks: int
    level: float
    reference_step_s: float  # each arm's mean per-step time over the blocks
    candidate_step_s: float
    log_ratio_sd: float  # spread of the per-block log ratios (how much blocks disagree; for messages)

    @property
    def half_width(self) -> float:
        """Relative half-width: the larger distance from the ratio to an end of the interval, over the ratio."""
        lo, hi = self.ci
        return max(hi - self.ratio, self.ratio - lo) / self.ratio


def fieller_interval(candidate: Sequence[float], reference: Sequence[float], level: float = CONFIDENCE,
                     ) -> RatioEstimate:
    """Ratio of the mean of `candidate` to the mean of `reference` (paired per-block per-step times) and its
    Fieller interval: every theta with |mean(c - theta r)| <= t * sd(c - theta r) / sqrt(n)."""
    n = len(candidate)
    if n != len(reference) or n < 2:
        raise ValueError("need the same number (>= 2) of blocks for both arms")
    if not all(math.isfinite(v) and v > 0 for v in (*candidate, *reference)):
        raise ValueError("block times must be finite and positive")
    cm, rm = statistics.fmean(candidate), statistics.fmean(reference)
    scc, srr = statistics.variance(candidate), statistics.variance(reference)
    scr = statistics.covariance(candidate, reference)
    q2 = t_quantile(0.5 + level / 2, n - 1) ** 2 / n
    # (cm - theta rm)^2 <= q2 (scc - 2 theta scr + theta^2 srr): a theta^2 - 2 b theta + c <= 0
    a, b, c = rm * rm - q2 * srr, cm * rm - q2 * scr, cm * cm - q2 * scc
    disc = b * b - a * c
    if a <= 0 or disc < 0:  # the reference's mean is not bounded away from 0 at this level: no finite interval
        ci = (0.0, math.inf)
    else:
        root = math.sqrt(disc)
        ci = (max(0.0, (b - root) / a), (b + root) / a)
    spread = statistics.stdev(math.log(x / y) for x, y in zip(candidate, reference))
    return RatioEstimate(cm / rm, ci, n, level, rm, cm, spread)


def look_level(looks: int = LOOKS, confidence: float = CONFIDENCE) -> float:
    """Per-look confidence level: Bonferroni over the pre-planned looks. Whichever look the rule stops at, the
    chance that *any* of the looks' intervals misses the true ratio is at most looks x (1 - level) =
    1 - confidence, so the reported interval covers it with probability >= `confidence`."""
    return 1.0 - (1.0 - confidence) / looks


def look_blocks(first: int, looks: int = LOOKS, growth: int = LOOK_GROWTH) -> list[int]:
    """Block counts at which the interval is looked at, fixed before any block is measured."""
    return [first * growth**k for k in range(looks)]


@dataclass(frozen=True)
class SequentialResult:
    estimate: RatioEstimate
    reference_block_s: tuple[float, ...]  # per-step time of each block, in measuring order
    candidate_block_s: tuple[float, ...]
    planned_looks: tuple[int, ...]
    looks_done: int
    stopped_by: str  # tolerance | cap | looks
    tolerance: float
    cap_s: float
    elapsed_s: float

    @property
    def reached(self) -> bool:
        return self.stopped_by == "tolerance"


def sequential_ratio(
    measure_blocks: Callable[[int], tuple[Sequence[float], Sequence[float]]],
    *,
    first_look: int,
    tolerance: float,
    cap_s: float,
    elapsed: Callable[[], float],
    looks: int = LOOKS,
    confidence: float = CONFIDENCE,
) -> SequentialResult:
    """Measure blocks until, at one of the pre-planned looks (`look_blocks`), the interval's relative
    half-width is <= `tolerance`; stop earlier when the next look would end past `cap_s` seconds (projected
    from the time per block so far) or when the looks are used up. `measure_blocks(n)` measures n more blocks
    and returns their (reference, candidate) per-step times; `elapsed()` is the seconds spent measuring so
    far. The first look (at least MIN_BLOCKS blocks) always runs."""
    level = look_level(looks, confidence)
    planned = look_blocks(max(MIN_BLOCKS, first_look), looks)
    ref: list[float] = []
    cand: list[float] = []
    stopped_by, looks_done = "looks", 0
    estimate = None
    for n in planned:
        if ref and elapsed() * n / len(ref) > cap_s:
            stopped_by = "cap"
            break
        r, c = measure_blocks(n - len(ref))
        ref.extend(r)
        cand.extend(c)
        looks_done += 1
        estimate = fieller_interval(cand, ref, level)
        if estimate.half_width <= tolerance:
            stopped_by = "tolerance"
            break
    assert estimate is not None  # the first look always runs
    return SequentialResult(estimate, tuple(ref), tuple(cand), tuple(planned), looks_done, stopped_by,
                            tolerance, cap_s, elapsed())


def reference_steps(reference_epochs: float, steps_per_epoch: int) -> int:
    """The one rule for E reference epochs: round(E x steps per epoch) steps, at least one."""
    return max(1, round(float(reference_epochs) * steps_per_epoch))


def candidate_steps(ref_steps: int, ratio: float) -> tuple[int, float]:
    """(steps, extra time fraction): the candidate's whole steps nearest to the reference's time, at least one;
    when that one step is more than the reference's whole time the excess fraction is returned."""
    steps = max(1, round(ref_steps / ratio))
    return steps, max(0.0, ratio / ref_steps - 1.0) if steps == 1 else 0.0
