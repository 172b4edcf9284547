"""Equal wall-clock budgets by calibration (`budget=reference`): "the time optimizer R needs for E epochs on
this machine", estimated with a confidence interval, as a number of steps for the candidate C.

R and C train fresh copies of the same model in one process, under exactly the run's settings, on batches
drawn from the run's own training source (fisherbench/engine/calibration_measure.py); blocks are measured
until the interval of the step-time ratio is narrow enough or a time cap is reached
(fisherbench/core/calibration_stats.py, the sequential rule). Then:

* the reference trains E epochs = round(E x S) steps (S steps per epoch); the candidate gets
  round(round(E x S) / ratio) steps (at least one; any excess of that one step over R's time is recorded);
* the raw record (per-block wall times of both arms, the looks, loads) is cached per key in
  `<results_dir>/_calibration/<key>.json` and written into the run directory as `calibration.json`;
* a cached record is not trusted: it is validated (types, finite positive numbers, lengths), its interval is
  recomputed from the raw block times and must meet today's tolerance, and it must agree with a short fresh
  measurement of both arms within a factor PLAUSIBLE_FACTOR; otherwise the calibration runs again.

docs/wall-clock.md is the user's description; `budget=match` (measured time, no estimate) is
fisherbench/engine/match.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from fisherbench.core import calibration_stats as stats
from fisherbench.core import checkpoint as ckpt
from fisherbench.core.budget import DerivedBudget
from fisherbench.core.config import plain_dict
from fisherbench.core.env import busy_machine_warning, device_info, load_average, machine_key, runtime_settings
from fisherbench.core.errors import UserError
from fisherbench.core.store import atomic_write_json, read_json
from fisherbench.core.tasks import get_task
from fisherbench.data.registry import DataBundle
from fisherbench.engine.build import autocast_factory
from fisherbench.engine.calibration_measure import MIN_VISIT_STEPS, BlockMeter, block_layout, make_arm
from fisherbench.engine.identity import plugin_identity
from fisherbench.engine.match import identity_budget, reference_options

CALIBRATION_SUBDIR = "_calibration"
RUN_FILE = "calibration.json"  # the record, in the run directory
METHOD = "abba-wall-v3"  # part of the cache key: a calibration cached by another method is not reused
DEFAULT_CAP_FRACTION = 0.1  # budget.calibration_max_s=null: 10% of the reference's estimated time for E epochs
PLAUSIBLE_FACTOR = 10.0  # a cached per-step time this far from a fresh measurement is not believed
QUICK_STEPS = 5  # steps per arm of that fresh measurement
ARMS = ("reference", "candidate")


# ------------------------------------------------------------------------------------------------ cache
def calibration_key(cfg: Any, reference_opts: dict[str, Any], device: torch.device) -> str:
    blob = json.dumps(
        {
            "method": METHOD,
            "machine": machine_key(device),
            "model": plain_dict(cfg.model),
            "data": plain_dict(cfg.data),
            "candidate": plain_dict(cfg.optimizer),
            "reference": reference_opts,
            "runtime": runtime_settings(cfg),
            "steps": cfg.budget.calibration_steps,
            "blocks": cfg.budget.calibration_blocks,
            "warmup": cfg.budget.calibration_warmup,
            # plug-ins' source hashes (built-in cells: none, key unchanged): edited code is timed again
            **({"plugins": code} if (code := plugin_identity({
                "model": plain_dict(cfg.model), "data": plain_dict(cfg.data), "optimizer": plain_dict(cfg.optimizer),
                "budget": {"reference_optimizer": reference_opts.get("name")}})) else {}),
        },
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def record_problem(record: Any) -> Optional[str]:
    """What is wrong with a calibration record read back from disk (None: well-formed). Checks types,
    finiteness and ranges of everything the budget is computed from; never trusts derived numbers."""
    if not isinstance(record, dict):
        return f"holds a JSON {type(record).__name__}, not an object"
    if record.get("method") != METHOD:
        return f"was made by method {record.get('method')!r}, not {METHOD!r}"
    spe = record.get("steps_per_epoch")
    if not (isinstance(spe, int) and not isinstance(spe, bool) and spe >= 1):
        return f"has steps_per_epoch {spe!r}"
    arms, walls = record.get("arms"), record.get("block_wall_s")
    if not isinstance(arms, dict) or not isinstance(walls, dict):
        return "has no 'arms' / 'block_wall_s' objects"
    lengths = set()
    for name in ARMS:
        arm, wall = arms.get(name), walls.get(name)
        if not isinstance(arm, dict):
            return f"has no arm '{name}'"
        m = arm.get("steps_per_visit")
        if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
            return f"arm '{name}' has steps_per_visit {m!r}"
        if not (isinstance(wall, list) and len(wall) >= 2 and all(_positive(w) for w in wall)):
            return f"arm '{name}' has no list of finite positive block times"
        lengths.add(len(wall))
    if len(lengths) != 1:
        return "the arms have different numbers of blocks"
    level = record.get("look_level")
    if not (isinstance(level, float) and 0 < level < 1):
        return f"has look_level {level!r}"
    return None


def per_step(record: dict[str, Any], name: str) -> list[float]:
    m = record["arms"][name]["steps_per_visit"]
    return [w / (2 * m) for w in record["block_wall_s"][name]]


def estimate_of(record: dict[str, Any]) -> stats.RatioEstimate:
    """The ratio and interval of a (validated) record, recomputed from its raw block times."""
    return stats.fieller_interval(per_step(record, "candidate"), per_step(record, "reference"), record["look_level"])


def read_cached(path: Path, tolerance: float) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(record, None) for a usable cached calibration; (None, why not) otherwise (None, None: no cache)."""
    if not path.exists():
        return None, None
    record = read_json(path)
    if record is None:
        return None, "is not JSON"
    problem = record_problem(record)
    if problem is not None:
        return None, problem
    estimate = estimate_of(record)
    if estimate.half_width > tolerance:
        return None, (f"has an interval of ±{estimate.half_width:.1%}, wider than budget.calibration_tolerance="
                      f"{tolerance:g}")
    return record, None


# ------------------------------------------------------------------------------------------- the budget
def derive_from_calibration(record: dict[str, Any], reference_epochs: float, steps_per_epoch: int, *,
                            key: Optional[str] = None, shared: bool = False,
                            reference_optimizer: Optional[str] = None) -> DerivedBudget:
    """The candidate's budget (in steps) from a calibration record: the one formula runs, sweeps' dry runs and
    reports share."""
    est = estimate_of(record)
    ref_steps = stats.reference_steps(reference_epochs, steps_per_epoch)
    steps, extra = stats.candidate_steps(ref_steps, est.ratio)
    lo, hi = est.ci
    return DerivedBudget(
        method="calibration",
        reference_optimizer=reference_optimizer,
        reference_epochs=float(reference_epochs),
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        derived_epochs=steps / steps_per_epoch,
        derived_epochs_ci=(ref_steps / hi / steps_per_epoch if math.isfinite(hi) else 0.0,
                           ref_steps / lo / steps_per_epoch if lo > 0 else math.inf),
        ratio=est.ratio,
        ratio_ci=est.ci,
        ratio_half_width=est.half_width,
        ci_level=stats.CONFIDENCE,
        ci_method=(f"Fieller interval for the ratio of mean block times, Student t with {est.blocks - 1} df at "
                   f"level {est.level:.4f} per look (Bonferroni over {len(record.get('looks') or [0])} "
                   f"pre-planned looks): >= {stats.CONFIDENCE:.0%} coverage"),
        blocks=est.blocks,
        tolerance=record.get("tolerance") if _positive(record.get("tolerance")) else None,
        calibration_key=key,
        calibration_shared=shared,
        reference_step_s=est.reference_step_s,
        candidate_step_s=est.candidate_step_s,
        reference_seconds=ref_steps * est.reference_step_s,
        extra_time_fraction=extra,
        busy_warning=record.get("busy_warning") if isinstance(record.get("busy_warning"), str) else None,
        load_avg=_mean_load(record.get("load_avg")),
        record=record,
    )


def epochs_from_calibration(record: dict[str, Any], reference_epochs: float, steps_per_epoch: int) -> Optional[float]:
    """Derived epochs (fractional) of a cached calibration, for sweeps' cost estimates; None for a record
    that is not well-formed."""
    if record_problem(record) is not None:
        return None
    return derive_from_calibration(record, reference_epochs, steps_per_epoch).derived_epochs


def _mean_load(value: Any) -> Optional[float]:
    loads = [v for v in value if isinstance(v, (int, float)) and math.isfinite(v)] if isinstance(value, list) else []
    return sum(loads) / len(loads) if loads else None


# ------------------------------------------------------------------------------------------ measuring
def _arms(cfg: Any, reference_opts: dict[str, Any], build_model: Callable[[], nn.Module], bundle: DataBundle,
          device: torch.device) -> list[Any]:
    settings = runtime_settings(cfg)
    return [make_arm(name, opts, build_model, bundle, device, channels_last=settings["channels_last"],
                     compile=settings["compile"])
            for name, opts in zip(ARMS, (reference_opts, plain_dict(cfg.optimizer)))]


def _implausible(record: dict[str, Any], fresh: dict[str, float]) -> Optional[str]:
    """Why a cached record disagrees with a fresh measurement of the arms' step times (None: plausible). Both
    sides are medians, so a burst of other work on a shared machine on either side does not decide it."""
    for name in ARMS:
        cached = statistics.median(per_step(record, name))
        if not fresh[name] / PLAUSIBLE_FACTOR <= cached <= fresh[name] * PLAUSIBLE_FACTOR:
            return (f"says a {name} step takes {cached:.3g} s, a fresh measurement {fresh[name]:.3g} s "
                    f"(more than {PLAUSIBLE_FACTOR:g}x apart)")
    return None


def _not_reached_message(result: stats.SequentialResult, busy: Optional[str], cfg: Any) -> str:
    est = result.estimate
    lo, hi = est.ci
    why = []
    if result.stopped_by == "cap":
        why.append(f"the time cap ({result.cap_s:.0f} s, budget.calibration_max_s) allowed only {est.blocks} blocks")
    else:
        why.append(f"{est.blocks} blocks, the most the sequential rule plans ({len(result.planned_looks)} looks), "
                   "were not enough")
    if busy:
        why.append(busy)
    else:
        why.append(f"blocks disagree by {est.log_ratio_sd:.1%} (sd of per-block ratios): other work on this "
                   "machine or an uneven step time")
    suggest = math.ceil(est.half_width * 100) / 100
    b = cfg.budget
    return (f"calibration stopped short of its tolerance: step-time ratio {est.ratio:.3f}, "
            f"{stats.CONFIDENCE:.0%} CI {lo:.3f}-{hi:.3f} (±{est.half_width:.1%} > budget.calibration_tolerance="
            f"{result.tolerance:g}) from {est.blocks} ABBA blocks in {result.elapsed_s:.0f} s. Why: "
            + "; ".join(why) + ". Ways out: accept the wider interval with budget.calibration_tolerance="
            f"{suggest:g} (or give it more time with budget.calibration_max_s=SECONDS, best on an idle machine), "
            f"or train the reference ({b.reference_optimizer}, {b.reference_epochs:g} epochs) and use budget=match "
            "(budget.reference_method=match), which replays its measured time instead of estimating it.")


def measure_calibration(cfg: Any, reference_opts: dict[str, Any], arms: list[Any], loss_fn: Callable[..., Any],
                        device: torch.device, autocast: Callable[..., Any], steps_per_epoch: int,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """Warm up, then measure ABBA blocks by the sequential rule; the record, or UserError (exit 2) when the
    interval did not reach `budget.calibration_tolerance` within the cap."""
    b = cfg.budget
    settings = runtime_settings(cfg)
    busy_before = busy_machine_warning(settings["threads"])
    if busy_before:
        log(f"warning: {busy_before}")
    min_visit = MIN_VISIT_STEPS.get(device.type, 1)
    first_look, visits = block_layout([a.period for a in arms], int(b.calibration_steps),
                                      max(stats.MIN_BLOCKS, int(b.calibration_blocks)), min_visit)
    load_before = load_average()
    meter = BlockMeter(arms, loss_fn, device, visit_steps=visits, autocast=autocast, mark_steps=False)
    warm = meter.warm_up(int(b.calibration_warmup))
    ref_steps = stats.reference_steps(b.reference_epochs, steps_per_epoch)
    estimated_budget_s = ref_steps * warm["reference"].step_s
    cap = (float(b.calibration_max_s) if b.calibration_max_s is not None
           else DEFAULT_CAP_FRACTION * estimated_budget_s)
    block_s = sum(2 * m * warm[a.name].step_s for a, m in zip(arms, visits))
    if first_look * block_s > cap:
        cap_src = ("budget.calibration_max_s" if b.calibration_max_s is not None else
                   f"{DEFAULT_CAP_FRACTION:.0%} of the ~{estimated_budget_s:.0f} s the reference needs for "
                   f"{b.reference_epochs:g} epochs")
        raise UserError(
            f"calibration would need about {first_look * block_s:.0f} s for its first {first_look} ABBA blocks "
            f"(visits of {visits[0]} and {visits[1]} steps), more than its cap of {cap:.1f} s ({cap_src}): for a "
            "budget this small it costs more than it decides. Use budget=match against a measured run of the "
            f"reference (train {b.reference_optimizer} for {b.reference_epochs:g} epochs first; "
            "budget.reference_method=match), or allow the time with budget.calibration_max_s="
            f"{math.ceil(first_look * block_s * 4):d}.")
    log(f"calibrating: {first_look}+ ABBA blocks of {visits[0]} reference and {visits[1]} candidate steps per "
        f"visit, until the ratio's {stats.CONFIDENCE:.0%} CI is within ±{float(b.calibration_tolerance):.1%} "
        f"(cap {cap:.0f} s)")
    result = stats.sequential_ratio(
        lambda n: (lambda new: (new["reference"], new["candidate"]))(meter.measure(n)),
        first_look=first_look, tolerance=float(b.calibration_tolerance), cap_s=cap, elapsed=lambda: meter.elapsed)
    busy = busy_before or busy_machine_warning(settings["threads"])
    record = {
        "method": METHOD,
        "machine": machine_key(device),
        "device": device_info(device)["name"],
        "runtime": settings,
        "steps_per_epoch": steps_per_epoch,
        "arms": {a.name: {"optimizer": opts.get("name"), "period": a.period, "steps_per_visit": meter.visit[a.name],
                          "warmup_steps": warm[a.name].steps, "first_step_s": warm[a.name].first_step_s,
                          "warmup_step_s": warm[a.name].step_s}
                 for a, opts in zip(arms, (reference_opts, plain_dict(cfg.optimizer)))},
        "block_wall_s": {name: meter.walls[name] for name in ARMS},
        "first_arm": [order[0] for order in meter.order],  # block b visits first, second, second, first
        "looks": list[Any](result.planned_looks),
        "looks_done": result.looks_done,
        "look_level": result.estimate.level,
        "stopped_by": result.stopped_by,
        "tolerance": result.tolerance,
        "cap_s": cap,
        "elapsed_s": result.elapsed_s,
        "load_avg": [load_before, load_average()],
        "busy_warning": busy,
    }
    if not result.reached:
        raise UserError(_not_reached_message(result, busy, cfg))
    return record


def derive_reference_budget(
    cfg: Any,
    reference_opts: dict[str, Any],
    build_model: Callable[[], nn.Module],
    bundle: DataBundle,
    loss_fn: Callable[..., Any],
    device: torch.device,
    autocast: Callable[..., Any],
    log: Callable[[str], None] = lambda msg: None,
) -> DerivedBudget:
    """The step budget that matches R's time for E epochs, with the measurements behind it."""
    b = cfg.budget
    steps_per_epoch = len(bundle.train)
    if plain_dict(cfg.optimizer) == reference_opts:
        return identity_budget(cfg, steps_per_epoch)
    key = calibration_key(cfg, reference_opts, device)
    cache_file = Path(cfg.results_dir) / CALIBRATION_SUBDIR / f"{key}.json"
    record, why = (None, None) if b.recalibrate else read_cached(cache_file, float(b.calibration_tolerance))
    if why:
        log(f"calibration cache {cache_file} {why}: calibrating again")
    rng = ckpt.rng_state()  # building and stepping the arms must not change what the run then draws
    arms = _arms(cfg, reference_opts, build_model, bundle, device)
    try:
        if record is not None:
            fresh = BlockMeter(arms, loss_fn, device, visit_steps=[1, 1], autocast=autocast).quick_step_s(QUICK_STEPS)
            why = _implausible(record, fresh)
            if why:
                log(f"calibration cache {cache_file} {why}: calibrating again")
                record = None
                arms = _arms(cfg, reference_opts, build_model, bundle, device)  # fresh arms: new warm-up
        shared = record is not None
        if record is None:
            record = measure_calibration(cfg, reference_opts, arms, loss_fn, device, autocast, steps_per_epoch, log)
            try:
                atomic_write_json(cache_file, record)
            except OSError:
                pass  # the cache is an optimisation; the run records its calibration anyway (calibration.json)
    finally:
        del arms
        ckpt.set_rng_state(rng)
    return derive_from_calibration(record, float(b.reference_epochs), steps_per_epoch, key=key, shared=shared,
                                   reference_optimizer=b.reference_optimizer)


def describe(derived: DerivedBudget, candidate: str) -> str:
    """The line a run prints about its derived budget."""
    if derived.method == "identity":
        return (f"reference budget: {derived.reference_optimizer} x {derived.reference_epochs:g} epochs -> "
                f"{derived.steps} steps ({derived.derived_epochs:g} epochs) of {candidate} (candidate is the "
                "reference)")
    if derived.method == "match":
        return (f"match budget: {derived.seconds:.1f} s of training, the measured train_s of run "
                f"{derived.reference_run} ({derived.reference_optimizer}, {derived.reference_epochs_done or 0:g} "
                f"epochs on {derived.reference_device}; load average {_fmt(derived.reference_load_avg)} then, "
                f"{_fmt(derived.load_avg)} now"
                + (", DIFFERENT" if derived.loads_differ else "") + ")")
    assert derived.derived_epochs_ci and derived.ratio_ci and derived.record is not None
    lo, hi = derived.derived_epochs_ci
    rlo, rhi = derived.ratio_ci
    how = ("read from the calibration cache (budget.recalibrate=true measures again)" if derived.calibration_shared
           else f"measured: {derived.blocks} ABBA blocks, "
           + ", ".join(f"{n} {a['steps_per_visit']} steps per visit" for n, a in derived.record["arms"].items()))
    line = (f"reference budget: {derived.reference_optimizer} x {derived.reference_epochs:g} epochs -> "
            f"{derived.derived_epochs:.2f} epochs of {candidate} ({derived.steps} steps), "
            f"{stats.CONFIDENCE:.0%} CI {lo:.2f}-{hi:.2f}; step-time ratio {derived.ratio:.3f}, "
            f"{stats.CONFIDENCE:.0%} CI {rlo:.3f}-{rhi:.3f} (±{derived.ratio_half_width:.1%}; {how}; key "
            f"{derived.calibration_key})")
    if derived.extra_time_fraction > 0:
        line += (f"; NOTE: one step of {candidate} is {derived.extra_time_fraction:.0%} more time than the "
                 "reference's whole budget")
    return line


def _fmt(load: Optional[float]) -> str:
    return "unknown" if load is None else f"{load:.2f}"


def reference_budget(cfg: DictConfig, bundle: DataBundle, build_model: Callable[[], nn.Module],
                     device: torch.device, log: Callable[[str], None] = lambda msg: None) -> DerivedBudget:
    """Derive (or read from the calibration cache) the step budget of a `budget=reference` run."""
    reference_opts = reference_options(cfg.budget.reference_optimizer)
    loss = get_task(bundle.task).loss
    derived = derive_reference_budget(cfg, reference_opts, build_model, bundle, loss, device,
                                      autocast_factory(cfg, device), log=log)
    log(describe(derived, cfg.optimizer.name))
    return derived
