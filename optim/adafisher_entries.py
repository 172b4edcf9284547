"""Registry entries `adafisher` (coupled L2) and `adafisherw` (decoupled decay); the variant is an option."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from optim.adafisher import AdaFisher, AdaFisherW
from optim.registry import OPTIMIZERS, BuildContext, Capabilities, OptimizerAdapter, OptimizerOptions, param_groups


@dataclass
class AdaFisherOptions(OptimizerOptions):
    name: str = "adafisher"
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta: float = 0.9  # momentum of the bias-corrected first moment
    damping: float = 1e-3  # lambda in F = S (outer) H + lambda
    gamma: float = 0.8  # factor running average: 0.08/0.008 (default, official) or convex 0.8/0.2 (paper)
    update_interval: int = 100  # statistics every T steps ("TCov")
    variant: str = "default"  # default | official | paper | constf
    minmax_eps: float = 1e-6  # relative epsilon of the scale-free min-max
    implementation: str = "foreach"  # foreach (eager, F per tensor in a workspace) | compiled (F never materialised)


@dataclass
class AdaFisherWOptions(AdaFisherOptions):
    name: str = "adafisherw"


class AdaFisherAdapter(OptimizerAdapter):
    """Standard step; adds the F/lambda range to the diagnostics and counts the factor buffers as state."""

    def diagnostics(self) -> dict[str, float]:
        stats = self.optimizer.preconditioner_stats()["global"]
        return {"F_over_lambda_min": float(stats["min"]), "F_over_lambda_max": float(stats["max"])}

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()


CAPABILITIES = Capabilities(
    needs_model=True,
    family="diagonal-fisher",
    period_option="update_interval",
    supports_ddp=True,
    supports_amp=True,
)


def _build(cls: type, model: nn.Module, opts: AdaFisherOptions) -> AdaFisherAdapter:
    groups: list[dict[str, Any]] = param_groups(model, opts.weight_decay, opts.no_decay_bias_norm)
    opt = cls(
        model, lr=opts.lr, beta=opts.beta, damping=opts.damping, gamma=opts.gamma,
        update_interval=opts.update_interval, weight_decay=opts.weight_decay, variant=opts.variant,
        params=groups, minmax_eps=opts.minmax_eps, implementation=opts.implementation,
    )
    return AdaFisherAdapter(opt, grad_clip=opts.grad_clip)


@OPTIMIZERS.register(
    "adafisher",
    schema=AdaFisherOptions,
    capabilities=CAPABILITIES,
    summary="AdaFisher (coupled L2): diagonal Kronecker Fisher, variants default/official/paper/constf; ours",
    source="fisherbench (after Gomes et al., ICLR 2025)",
)
def build_adafisher(model: nn.Module, opts: AdaFisherOptions, ctx: BuildContext) -> AdaFisherAdapter:
    return _build(AdaFisher, model, opts)


@OPTIMIZERS.register(
    "adafisherw",
    schema=AdaFisherWOptions,
    capabilities=CAPABILITIES,
    summary="AdaFisherW (decoupled weight decay, times lr): same variants as adafisher; ours",
    source="fisherbench (after Gomes et al., ICLR 2025)",
)
def build_adafisherw(model: nn.Module, opts: AdaFisherWOptions, ctx: BuildContext) -> AdaFisherAdapter:
    return _build(AdaFisherW, model, opts)
