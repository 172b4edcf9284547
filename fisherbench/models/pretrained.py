"""ImageNet weights for the transfer-learning table: fetching (torchvision) and loading into our models.

One function fetches (`fetch_torchvision_state_dict`; tests replace it), one loads by name
(`load_by_name`) and reports what was copied. The official trainer built a torchvision model with
ImageNet weights, replaced its stem conv / classifier, and called
`cifar_model.load_state_dict(torchvision_model.state_dict(), strict=False)`: every tensor whose
*name and shape* match is copied, the rest of the CIFAR model keeps its own initialisation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torchvision.models import get_weight

from fisherbench.core.errors import UserError

log = logging.getLogger(__name__)


class PretrainedWeightsUnavailable(UserError):
    """The weights could not be downloaded (offline) or read."""


def fetch_torchvision_state_dict(weights_name: str) -> dict[str, torch.Tensor]:
    """State dict of a torchvision weights enum entry, e.g. "ResNet50_Weights.IMAGENET1K_V2".

    Downloads once into torch's hub cache (`$TORCH_HOME/hub/checkpoints`); later calls read the cache.
    """
    weights = get_weight(weights_name)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, socket errors, a truncated file, ...
        raise PretrainedWeightsUnavailable(
            f"could not load the ImageNet weights {weights_name} ({type(exc).__name__}: {exc}). They are "
            f"downloaded from {weights.url} into torch's hub cache ($TORCH_HOME/hub/checkpoints, default "
            f"~/.cache/torch/hub/checkpoints) on first use: run once with network access, or copy that file "
            f"into the cache by hand. To train from scratch instead, set `model.pretrained=false`."
        ) from exc


@dataclass
class LoadReport:
    """What a pretrained load did, by parameter/buffer name of the target model."""

    copied: list[str] = field(default_factory=list)
    kept_init: list[str] = field(default_factory=list)  # target tensors no source tensor matched
    unused: list[str] = field(default_factory=list)  # source tensors that went nowhere

    def summary(self) -> str:
        return (f"{len(self.copied)} tensors copied, {len(self.kept_init)} kept their initialisation, "
                f"{len(self.unused)} source tensors unused")


def load_by_name(
    model: nn.Module,
    source: Mapping[str, torch.Tensor],
    rename: Optional[Callable[[str], Optional[str]]] = None,
) -> LoadReport:
    """Copy every source tensor whose (renamed) key and shape match a tensor of `model`.

    With `rename=None` this is exactly `model.load_state_dict(source, strict=False)` (which raises on a
    shape mismatch; here a mismatch raises too, because the official code could not have run with one).
    `rename` maps a source key to a target key (or None to drop it).
    """
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    report = LoadReport()
    for key, tensor in source.items():
        new_key = rename(key) if rename else key
        if new_key is None or new_key not in target:
            report.unused.append(key)
            continue
        if tuple(target[new_key].shape) != tuple(tensor.shape):
            raise UserError(
                f"pretrained tensor {key} has shape {tuple(tensor.shape)} but the model's {new_key} has "
                f"{tuple(target[new_key].shape)}"
            )
        mapped[new_key] = tensor
    model.load_state_dict(mapped, strict=False)
    report.copied = [k for k in target if k in mapped]
    report.kept_init = [k for k in target if k not in mapped]
    return report


def log_report(model_name: str, weights_name: str, report: LoadReport) -> None:
    log.info("%s: loaded %s: %s", model_name, weights_name, report.summary())
    trainable_copied = [k for k in report.copied if not k.endswith(("running_mean", "running_var",
                                                                     "num_batches_tracked"))]
    if not trainable_copied:
        log.warning(
            "%s: no parameter of %s matched this model by name, so `pretrained=true` leaves it randomly "
            "initialised. This is what the official code did for this architecture (the published "
            "transfer-learning numbers for it come from random weights); set `model.pretrained_keys=remap` "
            "for a real ImageNet initialisation where that is supported.", model_name, weights_name,
        )
