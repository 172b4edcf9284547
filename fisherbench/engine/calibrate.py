"""Equal wall-clock budgets: "the time optimizer R needs for E epochs on this machine", two ways.

**Calibration** (`budget=reference`): R and the candidate C train fresh copies of the same model, in one
process, under exactly the run's settings (determinism, cuDNN autotuning, precision, channels_last, compile,
threads), on batches drawn from the run's own training source the way the trainer draws them (so data time
is the overlapped wait the trainer really sees, inside each arm's steps, never a serial load added to both).

* Warm-up: each arm first takes max(`calibration_warmup`, P + 1) untimed steps (P: its curvature period, the
  option its capabilities name in `period_option`; 1 otherwise), so the timed curvature steps are steady-state
  ones, not the first step of a fresh optimizer; compilation and cuDNN autotuning happen here too.
* Periods: an arm runs m consecutive steps at a time, m whole curvature periods (so every period holds
  exactly m / P curvature steps whatever its phase) and at least 32 steps on a GPU (the host runs ahead of
  the device as in the trainer; no synchronisation inside a period, one at each end) or 1 on a CPU.
* Blocks: as many as `calibration_steps` timed steps per arm allow for the arm with the longest period, at
  least `calibration_blocks` (>= 3); block b runs the arms in the order o_b + reversed(o_b) (ABBA for two
  arms), o_b rotated by b, so a linear drift of the machine's speed cancels within every block. Each arm gets
  at least `calibration_steps` timed steps and at least 6P (>= 2 full periods + 1). On a CPU, Adam against
  Adam with the default 320 steps is 160 blocks of A B B A single steps: the finest pairing of the arms.
* Estimate: per block, t_arm = the arm's amortised step time in that block: the 10%-trimmed mean of its
  ordinary steps and the mean of its curvature steps, weighted (P - 1) : 1 (step times come from marks at
  every step boundary: CUDA events or the host clock; trimming keeps a burst of other work on a shared
  machine from deciding a block). The ratio C/R is the geometric mean of the per-block ratios, with a 95% interval from Student's t on the per-block log ratios (B - 1 degrees of
  freedom). With 3-8 blocks a percentile bootstrap over blocks cannot reach its nominal coverage (its
  interval is bounded by the most extreme observed blocks), the t interval can.
* Budget: the candidate gets `floor(E * S * t_R / t_C)` *steps* (S steps per epoch), i.e. fractional epochs,
  so small budgets stay equal in time; never less than one step, and when that one step is more time than
  R's whole budget the excess is recorded (`extra_time_fraction`) and printed.
* Everything (settings, raw per-block times, ratio, interval) is stored in summary.json under
  `reference_budget` and cached per key in `<results_dir>/_calibration/<key>.json`; the key holds the machine,
  model, data, both optimizers, the runtime settings and the calibration effort.

**Matching** (`budget=match`): no estimate at all. The candidate trains for exactly the measured `train_s`
of a finished reference run in the store (`budget.match_run`, or the reference run of the same cell), on the
same kind of device; it is a `seconds` budget, so its LR schedule follows the fraction of that time used, and
its epochs done are the Table 6 entry. `find_reference_run` is what sweeps use to decide between the two.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fisherbench.core import checkpoint as ckpt
from fisherbench.core.env import (
    busy_machine_warning,
    compile_model,
    device_info,
    load_average,
    machine_key,
    prepare_model,
    runtime_settings,
    to_channels_last,
)
from fisherbench.core.errors import UserError
from fisherbench.core.store import RunDir, atomic_write_json, read_json, run_id
from fisherbench.core.tasks import get_task
from fisherbench.data.registry import DataBundle
from fisherbench.engine.build import autocast_factory
from fisherbench.engine.compose import load_group_option
from fisherbench.engine.identity import identity_of_resolved, plugin_identity, resolved_dict
from fisherbench.optim.registry import OPTIMIZERS, BuildContext, OptimizerAdapter, build_optimizer

CALIBRATION_SUBDIR = "_calibration"
METHOD = "abba-blocks-v2"  # part of the cache key: a calibration cached by another method is not reused

# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (beyond 30: Cornish-Fisher expansion,
    two terms, within 1e-4)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 samples")
    return _T975[df - 1] if df <= len(_T975) else 1.959964 + 2.37227 / df + 2.82264 / df**2


def _as_dict(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


# ------------------------------------------------------------------------------------------ statistics
def ratio_interval(candidate: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Paired per-block ratio candidate/reference: geometric mean and 95% t interval on the log ratios."""
    if len(candidate) != len(reference) or len(candidate) < 2:
        raise ValueError("need the same number (>= 2) of blocks for both arms")
    logs = [math.log(c / r) for c, r in zip(candidate, reference)]
    mean = statistics.fmean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "ratio_ci": [math.exp(mean - half), math.exp(mean + half)],
            "block_ratios": [math.exp(x) for x in logs],
            "ci_method": f"95% Student t on per-block log ratios ({len(logs)} blocks, {len(logs) - 1} df)"}


# ----------------------------------------------------------------------------------------- measurement
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

    def step(self, loss_fn: Callable, autocast: Callable, loss_buffer: torch.Tensor) -> None:
        x, y = next(self.batches)
        out = self.adapter.train_step(self.model, x, y, loss_fn, autocast)
        loss_buffer[self.steps % loss_buffer.numel()] = out.loss  # the trainer's per-step bookkeeping
        self.steps += 1


def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# Shortest period of consecutive steps per device. On a GPU the host must run ahead of the device as in the
# trainer, and each period ends with a synchronisation whose pipeline bubble costs up to min(host, device)
# time of one step: 32 steps keep that under ~3% of a period. A CPU has no queue: single steps are exact, and
# the finest interleaving pairs the arms' steps most closely under a shared machine's changing load.
MIN_PERIOD_STEPS = {"cuda": 32, "cpu": 1}


def schedule(periods: Sequence[Optional[int]], steps: int, min_blocks: int, min_period_steps: int) -> tuple[int, list[int]]:
    """(blocks, steps per period of each arm): whole curvature periods of at least `min_period_steps` steps;
    as many blocks as `steps` timed steps per arm allow for the arm with the longest period (at least
    `min_blocks`); every arm then gets at least `steps` / (2 blocks) steps per period."""
    base = [max(1, p or 1) * math.ceil(min_period_steps / max(1, p or 1)) for p in periods]
    blocks = max(min_blocks, steps // (2 * max(base)))
    share = math.ceil(steps / (2 * blocks))
    return blocks, [max(1, p or 1) * math.ceil(max(b, share) / max(1, p or 1)) for p, b in zip(periods, base)]


def measure(
    arms: Sequence[TimedArm],
    loss_fn: Callable,
    device: torch.device,
    *,
    steps: int,
    min_blocks: int,
    warmup: int,
    min_period_steps: Optional[int] = None,
    autocast: Callable = lambda: torch.autocast("cpu", enabled=False),
    timer: Callable[[], float] = time.perf_counter,
    sync: Optional[Callable[[], None]] = None,
) -> dict[str, Any]:
    """Interleaved ABBA-block step times of `arms` (see the module docstring). Restores every RNG afterwards.

    Returns {"arms": {name: {period, steps_per_period, warmup_steps, block_step_s, amortised_s,
    ordinary_s, curvature_s, block_wall_step_s}}, "blocks", "order", "load_avg"}; `block_step_s[b]` is the
    arm's amortised step time in block b (`_block_estimate`), `block_wall_step_s[b]` its two periods' wall
    time / their steps (kept for comparison).
    """
    if min_period_steps is None:
        min_period_steps = MIN_PERIOD_STEPS.get(device.type, 1)
    blocks, per_period = schedule([a.period for a in arms], steps, min_blocks, min_period_steps)
    if blocks < 2:
        raise ValueError("calibration needs at least 2 blocks (3 for budgets)")
    sync = sync or _sync_for(device)
    cuda = device.type == "cuda"
    rng = ckpt.rng_state()
    load_before = load_average()
    loss_buffer = torch.zeros(16, device=device)
    try:
        for arm in arms:
            for _ in range(max(warmup, (arm.period or 1) + 1)):
                arm.step(loss_fn, autocast, loss_buffer)
        sync()
        per_block: dict[str, list[float]] = {arm.name: [0.0] * blocks for arm in arms}
        m = {arm.name: n for arm, n in zip(arms, per_period)}
        order_log: list[list[str]] = []
        for b in range(blocks):
            rotated = list(arms[b % len(arms):]) + list(arms[: b % len(arms)])
            sequence = rotated + rotated[::-1]
            order_log.append([a.name for a in sequence])
            for arm in sequence:
                marks: list[Any] = []
                first = arm.steps
                t0 = timer()
                if cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record()
                for _ in range(m[arm.name]):
                    arm.step(loss_fn, autocast, loss_buffer)
                    if cuda:
                        event = torch.cuda.Event(enable_timing=True)
                        event.record()
                        marks.append(event)
                    else:
                        marks.append(timer())
                sync()
                t1 = timer()
                per_block[arm.name][b] += t1 - t0
                ends = [start.elapsed_time(e) / 1e3 for e in marks] if cuda else [t - t0 for t in marks]
                previous = 0.0
                for j, end in enumerate(ends):
                    arm.step_times.append((b, first + j, end - previous))
                    previous = end
        result: dict[str, Any] = {"method": METHOD, "blocks": blocks, "order": order_log, "arms": {}}
        for arm in arms:
            steps = 2 * m[arm.name]
            phase = _curvature_phase(arm.step_times, arm.period)
            block_step_s = [_block_estimate([(k, t) for bb, k, t in arm.step_times if bb == b], arm.period, phase)
                            for b in range(blocks)]
            result["arms"][arm.name] = {
                "period": arm.period, "steps_per_period": m[arm.name],
                "warmup_steps": max(warmup, (arm.period or 1) + 1), "timed_steps": steps * blocks,
                "block_step_s": block_step_s, "amortised_s": statistics.fmean(block_step_s),
                "block_wall_step_s": [t / steps for t in per_block[arm.name]],
                **_split(arm.step_times, arm.period, phase),
            }
        result["load_avg"] = [load_before, load_average()]
        return result
    finally:
        ckpt.set_rng_state(rng)


TRIM = 0.1  # each tail of a block's step times left out of its estimate


def trimmed_mean(values: Sequence[float], trim: float = TRIM) -> float:
    """Mean without the `trim` fraction of smallest and of largest values (at least one value kept)."""
    v = sorted(values)
    cut = int(trim * len(v))
    return statistics.fmean(v[cut: len(v) - cut] or v)


def _curvature_phase(step_times: list[tuple[int, int, float]], period: Optional[int]) -> Optional[int]:
    """The phase (optimizer step index mod P) of the curvature steps, found empirically as the phase with the
    largest median time, so no optimizer's counting convention is assumed."""
    if not period or period <= 1:
        return None
    by_phase: dict[int, list[float]] = {}
    for _, k, t in step_times:
        by_phase.setdefault(k % period, []).append(t)
    return max(by_phase, key=lambda p: statistics.median(by_phase[p]))


def _block_estimate(step_times: list[tuple[int, float]], period: Optional[int], phase: Optional[int]) -> float:
    """An arm's amortised step time in one block: the trimmed mean of its ordinary steps, and its curvature
    steps (exactly one per P steps, since periods are whole curvature periods) at their plain mean, weighted
    (P - 1) : 1. Trimming keeps a burst of other work on a shared machine (a few steps many times too long)
    from deciding a block; it leaves out no regular part of a step, which every step has."""
    if phase is None:
        return trimmed_mean([t for _, t in step_times])
    ordinary = [t for k, t in step_times if k % period != phase]
    curvature = [t for k, t in step_times if k % period == phase]
    return (trimmed_mean(ordinary) * (period - 1) + statistics.fmean(curvature)) / period


def _split(step_times: list[tuple[int, int, float]], period: Optional[int], phase: Optional[int]) -> dict[str, Optional[float]]:
    """Ordinary and curvature step times over all blocks (reported; budgets use the block estimates)."""
    times = [t for _, _, t in step_times]
    if phase is None:
        return {"ordinary_s": statistics.median(times) if times else None, "curvature_s": None}
    ordinary = [t for _, k, t in step_times if k % period != phase]
    curvature = [t for _, k, t in step_times if k % period == phase]
    return {"ordinary_s": statistics.median(ordinary), "curvature_s": statistics.fmean(curvature)}


def batch_stream(bundle: DataBundle, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training source epoch after epoch, moved like the trainer moves it. Partial last batches are left out
    (a new shape would recompile a compiled model inside a timed period; the trainer pays that once per run)."""
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


# ------------------------------------------------------------------------------------------- calibration
def calibration_key(cfg: Any, reference_opts: dict[str, Any], device: torch.device) -> str:
    blob = json.dumps(
        {
            "method": METHOD,
            "machine": machine_key(device),
            "model": _as_dict(cfg.model),
            "data": _as_dict(cfg.data),
            "candidate": _as_dict(cfg.optimizer),
            "reference": reference_opts,
            "runtime": runtime_settings(cfg),
            "steps": cfg.budget.calibration_steps,
            "blocks": cfg.budget.calibration_blocks,
            "warmup": cfg.budget.calibration_warmup,
            # plug-ins' source hashes (built-in cells: none, key unchanged): edited code is timed again
            **({"plugins": code} if (code := plugin_identity({
                "model": _as_dict(cfg.model), "data": _as_dict(cfg.data), "optimizer": _as_dict(cfg.optimizer),
                "budget": {"reference_optimizer": reference_opts.get("name")}})) else {}),
        },
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def derive_from_calibration(calib: dict[str, Any], reference_epochs: float, steps_per_epoch: int) -> dict[str, Any]:
    """The candidate's budget (in steps) from a calibration record: the one formula runs, sweeps' dry runs and
    reports share. `calib["arms"]` holds "reference" and "candidate" with their `block_step_s`."""
    ref, cand = calib["arms"]["reference"], calib["arms"]["candidate"]
    stats = ratio_interval(cand["block_step_s"], ref["block_step_s"])
    ratio, (lo, hi) = stats["ratio"], stats["ratio_ci"]
    ref_steps = float(reference_epochs) * steps_per_epoch
    steps = math.floor(ref_steps / ratio + 1e-9)
    extra = 0.0
    if steps < 1:  # one step is the least a run can train: more time than the reference, said out loud
        steps, extra = 1, ratio / ref_steps - 1.0
    return {
        "derived_steps": steps,
        "derived_epochs": steps / steps_per_epoch,
        "derived_epochs_ci": [ref_steps / hi / steps_per_epoch, ref_steps / lo / steps_per_epoch],
        **stats,
        "reference_step_s": statistics.fmean(ref["block_step_s"]),
        "candidate_step_s": statistics.fmean(cand["block_step_s"]),
        "reference_seconds": ref_steps * statistics.fmean(ref["block_step_s"]),
        "extra_time_fraction": extra,
    }


def epochs_from_calibration(calib: dict[str, Any], reference_epochs: float, steps_per_epoch: int) -> float:
    """Derived epochs (fractional) of a cached calibration; for sweeps' cost estimates."""
    return derive_from_calibration(calib, reference_epochs, steps_per_epoch)["derived_epochs"]


def derive_reference_budget(
    cfg: Any,
    reference_opts: dict[str, Any],
    build_model: Callable[[], nn.Module],
    bundle: DataBundle,
    loss_fn: Callable,
    device: torch.device,
    autocast: Callable,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """The step budget that matches R's time for E epochs, with the measurements behind it."""
    b = cfg.budget
    candidate_opts = _as_dict(cfg.optimizer)
    epochs_ref = float(b.reference_epochs)
    steps_per_epoch = len(bundle.train)
    base = {
        "method": "calibration",
        "reference_optimizer": b.reference_optimizer,
        "reference_epochs": epochs_ref,
        "steps_per_epoch": steps_per_epoch,
    }
    if candidate_opts == reference_opts:
        epochs = max(1, math.floor(epochs_ref))
        return {**base, "method": "identity", "derived_epochs": epochs, "derived_steps": None, "ratio": 1.0,
                "note": "candidate is the reference"}

    cache_dir = Path(cfg.results_dir) / CALIBRATION_SUBDIR
    key = calibration_key(cfg, reference_opts, device)
    cache_file = cache_dir / f"{key}.json"
    cached = None if b.recalibrate else read_json(cache_file)
    warning = None
    if cached is None or cached.get("method") != METHOD:
        settings = runtime_settings(cfg)
        warning = busy_machine_warning(settings["threads"])
        if warning:
            log(f"warning: {warning}")
        compile_, channels_last = settings["compile"], settings["channels_last"]
        arms = [make_arm(name, opts, build_model, bundle, device, channels_last=channels_last, compile=compile_)
                for name, opts in (("reference", reference_opts), ("candidate", candidate_opts))]
        measured = measure(arms, loss_fn, device, steps=int(b.calibration_steps),
                           min_blocks=int(b.calibration_blocks), warmup=int(b.calibration_warmup), autocast=autocast)
        del arms
        measured.update(machine=machine_key(device), device=device_info(device)["name"], runtime=settings,
                        steps_per_epoch=steps_per_epoch,  # lets `python -m fisherbench sweep --dry-run` estimate run times
                        data_s_per_step=0.0,  # data waits are inside each arm's step times (overlapped, as trained)
                        busy_warning=warning)
        cached = measured
        try:
            atomic_write_json(cache_file, measured)
        except OSError:
            pass  # the cache is an optimisation; the run records its calibration anyway
        from_cache = False
    else:
        from_cache = True
    return {
        **base,
        **derive_from_calibration(cached, epochs_ref, steps_per_epoch),
        "blocks": {name: arm["block_step_s"] for name, arm in cached["arms"].items()},
        "calibration": cached,
        "calibration_key": key,
        "calibration_file": str(cache_file),
        "from_cache": from_cache,
        "busy_warning": cached.get("busy_warning"),
    }


def describe(derived: dict[str, Any], candidate: str) -> str:
    """The line a run prints about its derived budget."""
    if derived["method"] == "identity":
        return (f"reference budget: {derived['reference_optimizer']} x {derived['reference_epochs']:g} epochs "
                f"-> {derived['derived_epochs']} epochs of {candidate} (candidate is the reference)")
    if derived["method"] == "match":
        return (f"match budget: {derived['seconds']:.1f} s of training, the measured train_s of run "
                f"{derived['match_run']} ({derived['reference_optimizer']}, {derived['reference_epochs_done']:g} "
                f"epochs on {derived['reference_device']})")
    lo, hi = derived["derived_epochs_ci"]
    rlo, rhi = derived["ratio_ci"]
    cal = derived["calibration"]
    how = (f"read from the calibration cache {derived['calibration_file']} (budget.recalibrate=true measures again)"
           if derived["from_cache"] else
           f"measured: {cal['blocks']} ABBA blocks, "
           + ", ".join(f"{n} {a['timed_steps']} steps in periods of {a['steps_per_period']}"
                       for n, a in cal["arms"].items()))
    line = (f"reference budget: {derived['reference_optimizer']} x {derived['reference_epochs']:g} epochs -> "
            f"{derived['derived_epochs']:.2f} epochs of {candidate} ({derived['derived_steps']} steps), 95% CI "
            f"{lo:.2f}-{hi:.2f}; step-time ratio {derived['ratio']:.3f}, 95% CI {rlo:.3f}-{rhi:.3f} ({how})")
    if derived["extra_time_fraction"] > 0:
        line += (f"; NOTE: one step of {candidate} is {derived['extra_time_fraction']:.0%} more time than the "
                 "reference's whole budget")
    return line


def reference_options(name: str) -> dict[str, Any]:
    """The resolved config of the reference optimizer option `name`; UserError when there is no such option."""
    try:
        return load_group_option("optimizer", name)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"budget.reference_optimizer={name!r}: {str(exc).splitlines()[0]}") from None


def reference_budget(cfg: DictConfig, bundle: DataBundle, build_model: Callable[[], nn.Module],
                     device: torch.device, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Derive (or read from the calibration cache) the step budget of a `budget=reference` run."""
    reference_opts = reference_options(cfg.budget.reference_optimizer)
    loss = get_task(bundle.task).loss
    derived = derive_reference_budget(cfg, reference_opts, build_model, bundle, loss, device,
                                      autocast_factory(cfg, device), log=log)
    log(describe(derived, cfg.optimizer.name))
    return derived


# ---------------------------------------------------------------------------------------------- matching
def reference_identities(cfg: DictConfig, reference_opts: dict[str, Any]) -> list[dict[str, Any]]:
    """The identities the reference run of `cfg`'s cell may have: `cfg` with the reference optimizer, trained
    for `reference_epochs` epochs (`budget=epochs`), or as its own `budget=reference` run."""
    b = cfg.budget
    base = resolved_dict(cfg)
    base["optimizer"] = reference_opts
    budget = {**base["budget"], "match_run": None}
    as_epochs = {**budget, "mode": "epochs", "epochs": int(b.reference_epochs), "reference_optimizer": None,
                 "reference_epochs": None}
    as_reference = {**budget, "mode": "reference", "epochs": None}
    return [identity_of_resolved({**base, "budget": bud}) for bud in (as_epochs, as_reference)]


def find_reference_run(cfg: DictConfig, root: Path | str) -> Optional[RunDir]:
    """The finished reference run for `cfg` in the store at `root`, or None.

    With `budget.match_run` set, that run; otherwise the reference run of the same cell and seed (see
    `reference_identities`). Sweeps call this to choose `budget=match` over a calibration.
    """
    root = Path(root)
    b = cfg.budget
    if b.get("match_run"):
        candidates = [str(b.match_run)]
    else:
        if not b.reference_optimizer or b.reference_epochs is None:
            return None
        reference_opts = reference_options(b.reference_optimizer)
        candidates = [run_id(identity) for identity in reference_identities(cfg, reference_opts)]
    for rid in candidates:
        rd = RunDir(root / rid)
        if rd.exists() and rd.status().is_final and rd.status().is_success:
            return rd
    return None


def match_budget(cfg: DictConfig, root: Path | str, device: torch.device,
                 log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """The `budget=match` plan source: the measured train_s of the reference run, checked for comparability."""
    b = cfg.budget
    if not b.get("match_run") and b.reference_optimizer:
        reference_opts = reference_options(b.reference_optimizer)
        if _as_dict(cfg.optimizer) == reference_opts:
            return {"method": "identity", "reference_optimizer": b.reference_optimizer,
                    "reference_epochs": float(b.reference_epochs), "derived_epochs": max(1, int(b.reference_epochs)),
                    "seconds": None, "note": "candidate is the reference"}
    rd = find_reference_run(cfg, root)
    if rd is None:
        what = (f"run {b.match_run}" if b.get("match_run") else
                f"the reference run of this cell ({b.reference_optimizer} for {b.reference_epochs:g} epochs, "
                f"seed {cfg.seed})")
        raise UserError(f"budget=match: {what} is not a finished run in {root}. Train it first, pass "
                        "budget.match_run=<run id> of a finished run, or use budget=reference (calibration).")
    summary, meta = rd.summary() or {}, rd.meta() or {}
    here = device_info(device)["name"]
    there = (meta.get("device") or {}).get("name")
    if there != here:
        raise UserError(f"budget=match: reference run {rd.run_id} trained on '{there}', this run is on '{here}'; "
                        "equal time needs the same kind of device (run it there, or use budget=reference)")
    ours = runtime_settings(cfg)
    theirs = meta.get("runtime") or {}
    differ = {k: [theirs.get(k), v] for k, v in ours.items() if k in theirs and theirs[k] != v}
    if differ:
        log(f"warning: budget=match: reference run {rd.run_id} ran with other throughput settings "
            + ", ".join(f"{k} {a} (here {c})" for k, (a, c) in differ.items()))
    seconds = float(summary["ledger"]["train_s"])
    return {
        "method": "match",
        "match_run": rd.run_id,
        "reference_optimizer": summary.get("optimizer"),
        "reference_epochs": float(b.reference_epochs) if b.reference_epochs is not None else None,
        "reference_epochs_done": float(summary.get("epochs_done") or 0.0),
        "reference_steps": int(summary.get("steps") or 0),
        "reference_status": summary.get("status"),
        "reference_device": there,
        "seconds": seconds,
        "settings_differ": differ,
    }

