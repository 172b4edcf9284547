"""A run's identity: the hash of the resolved config without the fields marked `not_identity`.

Two commands that compute the same thing get the same run id, so the second resumes or skips the first;
the fields that only say where or how to record a run (results_dir, logger, device, ...) are excluded by
their schema metadata (`fisherbench.core.config.not_identity`), the one place that decides it.

The identity also holds the *content* of the data (`data_content`: a SHA-256 over the files a dataset reads,
named relative to its root; see `fisherbench.data.content`): other files under the same options are another
run, never skipped as already completed nor resumed from the other data's checkpoint, and the same files in
another folder are the same run (`data.root` stays out). Datasets with fixed content (bundled, synthetic) add
nothing, so their run ids are those of the config alone.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from fisherbench import data, models, optim
from fisherbench.core import plugins
from fisherbench.core.config import not_identity_fields, strip_non_identity
from fisherbench.core.store import run_id
from fisherbench.engine.compose import load_plugins

_COMPONENTS = {"model": models.MODELS, "data": data.DATASETS, "optimizer": optim.OPTIMIZERS}


def resolved_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, without the `_choices` bookkeeping."""
    d = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(d, dict)
    return {str(k): v for k, v in d.items() if k != "_choices"}


def identity_of(cfg: DictConfig, *, data_required: bool = False) -> dict[str, Any]:
    """The part of the resolved config that determines what a run computes (hashed into the run id), plus the
    content fingerprint of its data.

    The top-level fields are decided by `TrainConfig`'s metadata, a component's fields (model/data/optimizer
    options) by the metadata of the schema of the entry the config names. `data_required`: see `run_id_of`.
    """
    return identity_of_resolved(resolved_dict(cfg), data_required=data_required)


def identity_of_resolved(resolved: dict[str, Any], *, data_required: bool = False) -> dict[str, Any]:
    """`identity_of` for a resolved config given as plain data (e.g. a reference run's, built by
    fisherbench/engine/calibrate.py to find it in the store)."""
    load_plugins()  # a plug-in's name is only known (and its code only hashed) once it is registered
    identity = strip_non_identity(resolved)
    node = resolved.get("data")
    if isinstance(node, dict) and node.get("name") in data.DATASETS:
        content = data.data_content(node, required=data_required)  # all options: data.root says where to look
        if content is not None:
            identity["data_content"] = content
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
    code = plugin_identity(identity)
    if code:  # only plug-in runs carry the key: the ids of built-in runs are unchanged
        identity["plugins"] = code
    return identity


def plugin_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """Import path and source-file SHA-256 of every plug-in a run uses (its model, data, optimizer and a
    plug-in reference optimizer), so that editing a plug-in's code makes a new run instead of skipping it.

    Only the file that defines the class or factory is hashed: helpers it imports from other files are not
    (docs/own-optimizer.md says so).
    """
    used = {group: (identity.get(group) or {}).get("name") for group in _COMPONENTS}
    used["reference_optimizer"] = (identity.get("budget") or {}).get("reference_optimizer")
    code = {}
    for key, name in used.items():
        group = "optimizer" if key == "reference_optimizer" else key
        prov = plugins.provenance(group, name) if isinstance(name, str) else None
        if prov is not None:
            code[key] = prov.identity()
    return code


# the budget fields each mode reads (besides `mode` and `warmup_steps`)
BUDGET_FIELDS = {
    "epochs": ("epochs",),
    "steps": ("steps",),
    "seconds": ("seconds",),
    "reference": ("reference_optimizer", "reference_epochs", "reference_method", "calibration_steps",
                  "calibration_blocks", "calibration_warmup"),
    "match": ("match_run", "reference_optimizer", "reference_epochs"),
}


def run_identity(cfg: DictConfig, world_size: int = 1, *, data_required: bool = False) -> tuple[str, dict[str, Any]]:
    """(run id, identity): see `run_id_of`. The identity's `data_content` is what meta.json records as the
    dataset's `content`."""
    identity = identity_of(cfg, data_required=data_required)
    if world_size > 1:
        identity["world_size"] = world_size
    return run_id(identity), identity


def run_id_of(cfg: DictConfig, world_size: int = 1, *, data_required: bool = False) -> str:
    """The run's identity hash. Data-parallel runs (world_size > 1) are other runs than single-process ones.

    `data_required=True` (a run about to be skipped, resumed or started) raises the dataset's error when its
    files are missing; False (planning or listing a sweep) gives such runs the id of absent data instead.
    """
    return run_identity(cfg, world_size, data_required=data_required)[0]
