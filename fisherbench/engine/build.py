"""Build a run's objects from its composed config: data bundle, model, optimizer adapter, autocast.

What a user can fix (an unknown name, an option out of range, a data/model mismatch, missing files) is
raised by the components as `UserError` and passes through unchanged; anything else a builder raises is a
bug and propagates as itself, so that the run records it as `failed` with its traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fisherbench import data as data_pkg
from fisherbench import models as models_pkg
from fisherbench import optim as optim_pkg
from fisherbench.core import plugins
from fisherbench.core.config import plain_dict
from fisherbench.core.distributed import DistInfo
from fisherbench.core.env import compile_model, device_info, git_state, prepare_model, runtime_settings, versions
from fisherbench.core.errors import UserError
from fisherbench.core.registry import Entry

# the entries of a bundle's `extras` that meta.json records (plain data describing the data actually used)
DATASET_FACTS = ("split", "splits", "normalization", "image_size", "num_workers", "tokenizer", "tokenizer_sha256")


@dataclass
class Components:
    bundle: Any  # data.DataBundle
    model: nn.Module  # on the device, DDP-wrapped when distributed
    build_model: Callable[[], nn.Module]  # a fresh, unwrapped copy (calibration)
    optimizer_entry: Entry


def build_components(cfg: DictConfig, device: torch.device, info: DistInfo) -> Components:
    """Data, model (on `device`) and the optimizer's registry entry."""
    data_entry = data_pkg.DATASETS.get(cfg.data.name)
    model_entry = models_pkg.MODELS.get(cfg.model.name)
    opt_entry = optim_pkg.OPTIMIZERS.get(cfg.optimizer.name)
    data_kind = getattr(data_entry.capabilities, "input_kind", None)
    model_kind = getattr(model_entry.capabilities, "input_kind", None)
    if data_kind and model_kind and data_kind != model_kind:
        raise UserError(
            f"model '{cfg.model.name}' takes {model_kind} inputs but data '{cfg.data.name}' provides {data_kind}; "
            f"choose a matching pair (e.g. data=synthetic_tokens for language models)."
        )
    bundle = data_pkg.build_data(
        plain_dict(cfg.data),
        data_pkg.BuildContext(seed=cfg.seed, device=device, rank=info.rank, world_size=info.world_size),
    )
    double_backward = bool(getattr(opt_entry.capabilities, "needs_create_graph", False))
    model_opts = plain_dict(cfg.model)

    def build_model() -> nn.Module:
        return models_pkg.create_model(
            num_classes=bundle.num_classes, input_shape=bundle.input_shape, double_backward=double_backward,
            vocabulary=bundle.extras.get("vocabulary"), **model_opts,
        )

    check_compile(cfg, opt_entry)
    model = prepare_model(build_model().to(device), bool(cfg.get("channels_last", False)))
    if info.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.get("compile", False):
        model = compile_model(model)
    return Components(bundle, model, build_model, opt_entry)


def check_compile(cfg: DictConfig, opt_entry: Entry) -> None:
    """compile=true only for optimizers that work with a compiled model (capability `supports_compile`)."""
    caps = opt_entry.capabilities
    if cfg.get("compile", False) and caps is not None and not caps.supports_compile:
        raise UserError(
            f"optimizer '{cfg.optimizer.name}' cannot train a torch.compile'd model (it hooks the model's modules, "
            "runs its own forward/backward or differentiates twice, which torch.compile does not trace): "
            "use compile=false"
        )


def make_adapter(cfg: DictConfig, model: nn.Module, device: torch.device, info: DistInfo, steps_per_epoch: int,
                 total_steps: int | None) -> optim_pkg.OptimizerAdapter:
    """The optimizer adapter the trainer drives."""
    caps = optim_pkg.OPTIMIZERS.get(cfg.optimizer.name).capabilities
    if cfg.precision != "fp32" and caps is not None and not caps.supports_amp:
        raise UserError(
            f"optimizer '{cfg.optimizer.name}' runs in fp32 only (mixed precision would change its curvature "
            f"estimates; the paper ran it in fp32): use precision=fp32"
        )
    ctx = optim_pkg.BuildContext(device=device, distributed=info.enabled, steps_per_epoch=steps_per_epoch,
                                 total_steps=total_steps)
    return optim_pkg.build_optimizer(plain_dict(cfg.optimizer), model, ctx)


def autocast_factory(cfg: DictConfig, device: torch.device) -> Callable[[], Any]:
    """A zero-argument factory of the precision context every forward pass runs in."""
    if cfg.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def plugin_facts(cfg: DictConfig) -> dict[str, Any]:
    used = {group: cfg[group].name for group in ("model", "data", "optimizer")}
    return {group: dataclasses.asdict(prov) for group, name in used.items()
            if (prov := plugins.provenance(group, name)) is not None}


def run_meta(cfg: DictConfig, device: torch.device, bundle: Any, info: DistInfo, param_count: int,
             started_at: str) -> dict[str, Any]:
    """What `meta.json` records about the environment of a run."""
    return {
        "git": git_state(),
        "versions": versions(),
        "device": device_info(device),
        "world_size": info.world_size,
        "deterministic": bool(cfg.deterministic),
        "runtime": runtime_settings(cfg),  # throughput settings in effect (also in the calibration key)
        "dataset": {
            "name": cfg.data.name, "description": bundle.description, "fingerprint": bundle.fingerprint,
            "num_train": bundle.num_train, "input_shape": list(bundle.input_shape),
            "num_classes": bundle.num_classes, "evals": list(bundle.evals),
            # how the splits were made, normalisation, tokenizer, ... as the dataset reports them
            **{k: v for k, v in bundle.extras.items() if k in DATASET_FACTS},
        },
        "param_count": param_count,
        # the plug-ins this run used: import path, source file and its SHA-256 (the latter is in the run id)
        "plugins": plugin_facts(cfg),
        "choices": dict(cfg.get("_choices", {}) or {}),
        "argv": list(sys.argv),
        "started_at": started_at,
    }
