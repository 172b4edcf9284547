"""Reference-equivalent budgets: "the time optimizer R needs for E epochs on this machine".

Both optimizers train fresh copies of the same model on the same batches, their steps interleaved in one
process so that machine noise hits both alike. Periodic optimizers (K-FAC, AdaFisher, ... whose
capabilities name a `period_option`) are timed from step 0, so curvature steps and ordinary steps are
measured separately and amortised over one period. The candidate then gets
`floor(E * t_R / t_C)` epochs (the paper's Table 6 rule), and that count, the schedule length and the
measured times are stored with the run. Results are cached per (machine, model, data, optimizers).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data.registry import DataBundle
from engine.build import autocast_factory
from engine.compose import load_group_option
from fisherbench import checkpoint as ckpt
from fisherbench.env import machine_key
from fisherbench.errors import UserError
from fisherbench.store import atomic_write_json, read_json
from fisherbench.tasks import get_task
from optim.registry import OPTIMIZERS, BuildContext, build_optimizer

CALIBRATION_SUBDIR = "_calibration"


def _as_dict(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def calibration_key(cfg: Any, reference_opts: dict[str, Any], device: torch.device) -> str:
    blob = json.dumps(
        {
            "machine": machine_key(device),
            "model": _as_dict(cfg.model),
            "data": _as_dict(cfg.data),
            "candidate": _as_dict(cfg.optimizer),
            "reference": reference_opts,
            "precision": cfg.precision,
            "steps": cfg.budget.calibration_steps,
        },
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _period(options: dict[str, Any]) -> Optional[int]:
    caps = OPTIMIZERS.get(options["name"]).capabilities
    key = getattr(caps, "period_option", None) if caps else None
    value = options.get(key) if key else None
    return int(value) if value else None


def _amortised(times: list[float], period: Optional[int]) -> dict[str, float]:
    """Per-step time amortised over one curvature period (times[k] is the step with counter k)."""
    if not period or period <= 1:
        return {"amortised_s": statistics.median(times), "ordinary_s": statistics.median(times)}
    curv = [t for k, t in enumerate(times) if k % period == 0]
    ordinary = [t for k, t in enumerate(times) if k % period != 0] or curv
    t_curv, t_ord = statistics.mean(curv), statistics.median(ordinary)
    return {"amortised_s": (t_curv + (period - 1) * t_ord) / period, "ordinary_s": t_ord, "curvature_s": t_curv}


def measure(
    build_model: Callable[[], nn.Module],
    option_sets: dict[str, dict[str, Any]],
    bundle: DataBundle,
    loss_fn: Callable,
    device: torch.device,
    steps: int,
    warmup: int,
    autocast: Callable = lambda: torch.autocast("cpu", enabled=False),
) -> dict[str, Any]:
    """Interleaved step times for each option set (arm). Restores every RNG afterwards."""
    rng = ckpt.rng_state()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    import time

    try:
        needed = warmup + steps
        batches = []
        source = bundle.train
        t0 = time.perf_counter()
        epoch = 0
        while len(batches) < needed:
            for x, y in source.iterate(epoch):
                batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
                if len(batches) >= needed:
                    break
            epoch += 1
        sync()
        data_s = (time.perf_counter() - t0) / max(1, len(batches))

        ctx = BuildContext(device=device, steps_per_epoch=len(source))

        def fresh(opts: dict[str, Any]):
            torch.manual_seed(0)
            model = build_model().to(device)
            return model, build_optimizer(opts, model, ctx)

        # warm-up on throw-away copies (kernels, allocator, lazy init)
        for opts in option_sets.values():
            model, adapter = fresh(opts)
            for x, y in batches[:warmup]:
                adapter.train_step(model, x, y, loss_fn, autocast)
            del model, adapter
        arms = {name: fresh(opts) for name, opts in option_sets.items()}
        times: dict[str, list[float]] = {name: [] for name in arms}
        for x, y in batches[warmup:]:
            for name, (model, adapter) in arms.items():
                sync()
                t = time.perf_counter()
                out = adapter.train_step(model, x, y, loss_fn, autocast)
                float(out.loss)  # the trainer syncs on the loss every step too
                sync()
                times[name].append(time.perf_counter() - t)
        result: dict[str, Any] = {"data_s_per_step": data_s, "steps": steps, "arms": {}}
        for name, opts in option_sets.items():
            period = _period(opts)
            result["arms"][name] = {"period": period, **_amortised(times[name], period)}
        return result
    finally:
        ckpt.set_rng_state(rng)


def derive_reference_budget(
    cfg: Any,
    reference_opts: dict[str, Any],
    build_model: Callable[[], nn.Module],
    bundle: DataBundle,
    loss_fn: Callable,
    device: torch.device,
    autocast: Callable,
) -> dict[str, Any]:
    """The epoch count that matches R's time for E epochs, with the measurements behind it."""
    b = cfg.budget
    candidate_opts = _as_dict(cfg.optimizer)
    epochs_ref = float(b.reference_epochs)
    steps_per_epoch = len(bundle.train)
    base = {
        "reference_optimizer": b.reference_optimizer,
        "reference_epochs": epochs_ref,
        "steps_per_epoch": steps_per_epoch,
    }
    if candidate_opts == reference_opts:
        epochs = max(1, math.floor(epochs_ref))
        return {**base, "derived_epochs": epochs, "ratio": 1.0, "note": "candidate is the reference"}

    cache_dir = Path(cfg.results_dir) / CALIBRATION_SUBDIR
    key = calibration_key(cfg, reference_opts, device)
    cache_file = cache_dir / f"{key}.json"
    cached = None if b.recalibrate else read_json(cache_file)
    if cached is None:
        measured = measure(
            build_model, {"reference": reference_opts, "candidate": candidate_opts}, bundle, loss_fn, device,
            steps=int(b.calibration_steps), warmup=int(b.calibration_warmup), autocast=autocast,
        )
        measured["machine"] = machine_key(device)
        measured["steps_per_epoch"] = steps_per_epoch  # lets `python -m sweep --dry-run` estimate run times
        cached = measured
        try:
            atomic_write_json(cache_file, measured)
        except OSError:
            pass  # the cache is an optimisation; the run records its calibration anyway
        from_cache = False
    else:
        from_cache = True
    data_s = cached["data_s_per_step"]
    t_ref = cached["arms"]["reference"]["amortised_s"] + data_s
    t_cand = cached["arms"]["candidate"]["amortised_s"] + data_s
    derived = max(1, math.floor(epochs_ref * t_ref / t_cand + 1e-9))
    return {
        **base,
        "derived_epochs": derived,
        "ratio": t_cand / t_ref,
        "reference_step_s": t_ref,
        "candidate_step_s": t_cand,
        "reference_seconds": epochs_ref * steps_per_epoch * t_ref,
        "calibration": cached,
        "calibration_key": key,
        "from_cache": from_cache,
    }


def reference_budget(cfg: DictConfig, bundle: DataBundle, build_model: Callable[[], nn.Module],
                     device: torch.device, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Derive (or read from the calibration cache) the epoch count of a `budget=reference` run."""
    try:
        reference_opts = load_group_option("optimizer", cfg.budget.reference_optimizer)
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types for a missing option
        raise UserError(f"budget.reference_optimizer={cfg.budget.reference_optimizer!r}: {exc}") from None
    loss = get_task(bundle.task).loss
    derived = derive_reference_budget(cfg, reference_opts, build_model, bundle, loss, device,
                                      autocast_factory(cfg, device))
    how = ("read from the calibration cache" if derived.get("from_cache") else
           derived.get("note") or f"measured with {cfg.budget.calibration_steps} interleaved steps each")
    log(f"reference budget: {cfg.budget.reference_optimizer} x {derived['reference_epochs']:g} epochs "
        f"-> {derived['derived_epochs']} epochs of {cfg.optimizer.name} (step-time ratio "
        f"{derived['ratio']:.3f}, {how})")
    return derived
