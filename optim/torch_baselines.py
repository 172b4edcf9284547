"""Adam (coupled L2, as the paper's CNN runs), AdamW and SGD-momentum from `torch.optim`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optim.registry import (
    OPTIMIZERS,
    BuildContext,
    Capabilities,
    OptimizerAdapter,
    OptimizerOptions,
    param_groups,
    strip_names,
)


def _impl_flags(device: torch.device, implementation: str) -> dict:
    """torch.optim's fused kernels exist for CUDA; foreach works everywhere."""
    if implementation == "fused":
        return {"fused": True}
    if implementation == "foreach":
        return {"foreach": True}
    if implementation == "auto":
        return {"fused": True} if device.type == "cuda" else {"foreach": True}
    if implementation == "for-loop":
        return {"foreach": False}
    raise ValueError(f"implementation must be auto|fused|foreach|for-loop, got {implementation!r}")


@dataclass
class AdamOptions(OptimizerOptions):
    name: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False
    implementation: str = "auto"  # auto | fused | foreach | for-loop


@dataclass
class AdamWOptions(AdamOptions):
    name: str = "adamw"
    weight_decay: float = 0.01


@dataclass
class SGDOptions(OptimizerOptions):
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    implementation: str = "auto"


def _groups(model: nn.Module, opts: OptimizerOptions) -> list[dict]:
    return strip_names(param_groups(model, opts.weight_decay, opts.no_decay_bias_norm))


@OPTIMIZERS.register(
    "adam",
    schema=AdamOptions,
    capabilities=Capabilities(),
    summary="torch.optim.Adam; weight decay is coupled L2 (added to the gradient), as the paper's CNN runs",
    source="torch.optim",
)
def build_adam(model: nn.Module, opts: AdamOptions, ctx: BuildContext) -> OptimizerAdapter:
    opt = torch.optim.Adam(
        _groups(model, opts), lr=opts.lr, betas=tuple(opts.betas), eps=opts.eps, amsgrad=opts.amsgrad,
        **_impl_flags(ctx.device, opts.implementation),
    )
    return OptimizerAdapter(opt, grad_clip=opts.grad_clip)


@OPTIMIZERS.register(
    "adamw",
    schema=AdamWOptions,
    capabilities=Capabilities(),
    summary="torch.optim.AdamW (decoupled weight decay), the paper's ViT/LM baseline",
    source="torch.optim",
)
def build_adamw(model: nn.Module, opts: AdamWOptions, ctx: BuildContext) -> OptimizerAdapter:
    opt = torch.optim.AdamW(
        _groups(model, opts), lr=opts.lr, betas=tuple(opts.betas), eps=opts.eps, amsgrad=opts.amsgrad,
        **_impl_flags(ctx.device, opts.implementation),
    )
    return OptimizerAdapter(opt, grad_clip=opts.grad_clip)


@OPTIMIZERS.register(
    "sgd",
    schema=SGDOptions,
    capabilities=Capabilities(),
    summary="torch.optim.SGD with momentum (coupled weight decay)",
    source="torch.optim",
)
def build_sgd(model: nn.Module, opts: SGDOptions, ctx: BuildContext) -> OptimizerAdapter:
    flags = _impl_flags(ctx.device, opts.implementation)
    opt = torch.optim.SGD(
        _groups(model, opts), lr=opts.lr, momentum=opts.momentum, dampening=opts.dampening,
        nesterov=opts.nesterov, **flags,
    )
    return OptimizerAdapter(opt, grad_clip=opts.grad_clip)
