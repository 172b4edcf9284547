"""Rows for `torch.optim`: Adam (coupled L2, as the paper's CNN runs), AdamW and SGD with momentum."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fisherbench.optim.registry import OptimizerOptions, OptimizerRow, accepted_keywords, register


class WithImplementation:
    """A `torch.optim` class whose kernel is the `implementation` option: auto | fused | foreach | for-loop.

    `auto` is fused on CUDA (torch.optim's fused kernels exist there) and foreach elsewhere; the device is the
    parameters' own.
    """

    def __init__(self, cls: type[torch.optim.Optimizer]) -> None:
        self.cls = cls
        self.keywords = [*accepted_keywords(cls), "implementation"]

    def __call__(self, params: list[dict[str, Any]], *, implementation: str = "auto", **kwargs: Any) -> Any:
        device = next((p.device for g in params for p in g["params"]), torch.device("cpu"))
        flags = {
            "fused": {"fused": True},
            "foreach": {"foreach": True},
            "for-loop": {"foreach": False},
            "auto": {"fused": True} if device.type == "cuda" else {"foreach": True},
        }.get(implementation)
        if flags is None:
            raise ValueError(f"implementation must be auto|fused|foreach|for-loop, got {implementation!r}")
        return self.cls(params, **kwargs, **flags)


@dataclass
class AdamOptions(OptimizerOptions):
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4  # coupled L2 (added to the gradient)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False
    implementation: str = "auto"  # auto | fused | foreach | for-loop


@dataclass
class AdamWOptions(AdamOptions):
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2  # decoupled


@dataclass
class SGDOptions(OptimizerOptions):
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4  # coupled L2
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    implementation: str = "auto"  # auto | fused | foreach | for-loop


register(
    OptimizerRow(
        "adam", WithImplementation(torch.optim.Adam), AdamOptions, source="torch.optim",
        summary="torch.optim.Adam; weight decay is coupled L2 (added to the gradient), as the paper's CNN runs",
    ),
    OptimizerRow(
        "adamw", WithImplementation(torch.optim.AdamW), AdamWOptions, source="torch.optim",
        summary="torch.optim.AdamW (decoupled weight decay), the paper's ViT/LM baseline",
    ),
    OptimizerRow(
        "sgd", WithImplementation(torch.optim.SGD), SGDOptions, source="torch.optim",
        summary="torch.optim.SGD with momentum (coupled weight decay)",
    ),
)
