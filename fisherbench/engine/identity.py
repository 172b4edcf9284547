"""A run's identity: the hash of the resolved config without the fields marked `not_identity`.

Two commands that compute the same thing get the same run id, so the second resumes or skips the first;
the fields that only say where or how to record a run (results_dir, logger, device, ...) are excluded by
their schema metadata (`fisherbench.core.config.not_identity`), the one place that decides it.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from fisherbench import data, models, optim
from fisherbench.core.config import not_identity_fields, strip_non_identity
from fisherbench.core.store import run_id

_COMPONENTS = {"model": models.MODELS, "data": data.DATASETS, "optimizer": optim.OPTIMIZERS}


def resolved_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, without the `_choices` bookkeeping."""
    d = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(d, dict)
    d.pop("_choices", None)
    return d


def identity_of(cfg: DictConfig) -> dict[str, Any]:
    """The part of the resolved config that determines what a run computes (hashed into the run id).

    The top-level fields are decided by `TrainConfig`'s metadata, a component's fields (model/data/optimizer
    options) by the metadata of the schema of the entry the config names.
    """
    return identity_of_resolved(resolved_dict(cfg))


def identity_of_resolved(resolved: dict[str, Any]) -> dict[str, Any]:
    """`identity_of` for a resolved config given as plain data (e.g. a reference run's, built by
    fisherbench/engine/calibrate.py to find it in the store)."""
    identity = strip_non_identity(resolved)
    for group, registry in _COMPONENTS.items():
        node = identity.get(group)
        if isinstance(node, dict) and node.get("name") in registry:
            drop = set(not_identity_fields(registry.get(node["name"]).schema))
            identity[group] = {k: v for k, v in node.items() if k not in drop}
    budget = identity.get("budget")
    if isinstance(budget, dict) and budget.get("mode") in BUDGET_FIELDS:
        # a budget's identity is the fields its mode reads: a 200-epoch run is the same run whatever the
        # (unused) calibration or reference settings say, so an equal-time run can find its reference run
        keep = ("mode", "warmup_steps", *BUDGET_FIELDS[budget["mode"]])
        identity["budget"] = {k: v for k, v in budget.items() if k in keep}
    return identity


# the budget fields each mode reads (besides `mode` and `warmup_steps`)
BUDGET_FIELDS = {
    "epochs": ("epochs",),
    "steps": ("steps",),
    "seconds": ("seconds",),
    "reference": ("reference_optimizer", "reference_epochs", "reference_method", "calibration_steps",
                  "calibration_blocks", "calibration_warmup"),
    "match": ("match_run", "reference_optimizer", "reference_epochs"),
}


def run_id_of(cfg: DictConfig, world_size: int = 1) -> str:
    """The run's identity hash. Data-parallel runs (world_size > 1) are other runs than single-process ones."""
    identity = identity_of(cfg)
    if world_size > 1:
        identity["world_size"] = world_size
    return run_id(identity)
