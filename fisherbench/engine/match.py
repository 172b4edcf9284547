"""Equal time without an estimate (`budget=match`): the candidate trains for exactly the measured `train_s` of
a finished reference run in the store (`budget.match_run`, or the reference run of the same cell), on the
same kind of device; it is a `seconds` budget, so its LR schedule follows the fraction of that time used,
and its epochs done are the Table 6 entry. `find_reference_run` is what sweeps and `budget=reference`
(`reference_method=auto`) use to choose this over a calibration. docs/wall-clock.md says how time is
defined the same way here and in a calibration.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fisherbench.core.budget import DerivedBudget, loads_differ
from fisherbench.core.calibration_stats import reference_steps
from fisherbench.core.config import plain_dict
from fisherbench.core.env import device_info, load_average, runtime_settings
from fisherbench.core.errors import UserError
from fisherbench.core.store import RunDir, run_id
from fisherbench.engine.compose import load_group_option
from fisherbench.engine.identity import identity_of_resolved, resolved_dict


def reference_options(name: str) -> dict[str, Any]:
    """The resolved config of the reference optimizer option `name`; UserError when there is no such option."""
    try:
        return load_group_option("optimizer", name)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"budget.reference_optimizer={name!r}: {str(exc).splitlines()[0]}") from None


def identity_budget(cfg: DictConfig, steps_per_epoch: int) -> DerivedBudget:
    """The candidate is the reference: it trains E epochs, round(E x steps per epoch) steps (the one rule)."""
    b = cfg.budget
    steps = reference_steps(b.reference_epochs, steps_per_epoch)
    return DerivedBudget(method="identity", reference_optimizer=b.reference_optimizer,
                         reference_epochs=float(b.reference_epochs), steps_per_epoch=steps_per_epoch, steps=steps,
                         derived_epochs=steps / steps_per_epoch, load_avg=load_average(),
                         note="candidate is the reference")


def reference_identities(cfg: DictConfig, reference_opts: dict[str, Any]) -> list[dict[str, Any]]:
    """The identities the reference run of `cfg`'s cell may have: `cfg` with the reference optimizer, trained
    for E = `reference_epochs` epochs as a `budget=epochs` run (whole E only: that mode counts whole epochs)
    or as its own `budget=reference` run (any E; it trains round(E x steps per epoch) steps)."""
    b = cfg.budget
    base = resolved_dict(cfg)
    base["optimizer"] = reference_opts
    budget = {**base["budget"], "match_run": None}
    budgets = [{**budget, "mode": "reference", "epochs": None}]
    epochs = float(b.reference_epochs)
    if epochs.is_integer():
        budgets.insert(0, {**budget, "mode": "epochs", "epochs": int(epochs), "reference_optimizer": None,
                           "reference_epochs": None})
    return [identity_of_resolved({**base, "budget": bud}) for bud in budgets]


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


def _finite(value: Any, low: float = 0.0) -> Optional[float]:
    """`value` as a float when it is a finite number > `low` (numbers read from a store are not trusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > low else None


def match_budget(cfg: DictConfig, root: Path | str, device: torch.device, steps_per_epoch: int,
                 log: Callable[[str], None] = lambda msg: None) -> DerivedBudget:
    """The `budget=match` derivation: the measured train_s of the reference run, checked for comparability."""
    b = cfg.budget
    if not b.get("match_run") and b.reference_optimizer:
        if plain_dict(cfg.optimizer) == reference_options(b.reference_optimizer):
            return identity_budget(cfg, steps_per_epoch)
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
    seconds = _finite((summary.get("ledger") or {}).get("train_s"))
    if seconds is None:
        raise UserError(f"budget=match: reference run {rd.run_id} records no usable train_s "
                        f"({(summary.get('ledger') or {}).get('train_s')!r}); its summary.json is damaged: train it "
                        "again (overwrite=true) or use budget=reference")
    ours = runtime_settings(cfg)
    theirs = meta.get("runtime") or {}
    differ = {k: [theirs.get(k), v] for k, v in ours.items() if k in theirs and theirs[k] != v}
    if differ:
        log(f"warning: budget=match: reference run {rd.run_id} ran with other throughput settings "
            + ", ".join(f"{k} {a} (here {c})" for k, (a, c) in differ.items()))
    steps_done = _finite(summary.get("steps"))
    ref_steps = int(steps_done) if steps_done is not None else None
    ref_load = _load_of(summary.get("load_avg"))
    load = load_average()
    return DerivedBudget(
        method="match",
        reference_optimizer=summary.get("optimizer") if isinstance(summary.get("optimizer"), str) else None,
        reference_epochs=float(b.reference_epochs) if b.reference_epochs is not None else None,
        steps_per_epoch=steps_per_epoch,
        seconds=seconds,
        reference_run=rd.run_id,
        reference_step_s=seconds / ref_steps if ref_steps else None,
        reference_epochs_done=_finite(summary.get("epochs_done"), -1.0),
        reference_steps=ref_steps,
        reference_status=str(summary.get("status")),
        reference_device=there,
        settings_differ=differ,
        load_avg=load,
        reference_load_avg=ref_load,
        loads_differ=loads_differ(load, ref_load) if ref_load is not None and load is not None else None,
    )


def _load_of(value: Any) -> Optional[float]:
    """The load average a run recorded (`summary.json` → `load_avg`: [at start, at end]): their mean."""
    if isinstance(value, list) and value:
        loads = [_finite(v, -1.0) for v in value]
        known = [v for v in loads if v is not None]
        return sum(known) / len(known) if known else None
    return _finite(value, -1.0)
