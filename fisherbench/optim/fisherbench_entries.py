"""Rows for the optimizers implemented in this project: FAdam, SGD with bias-corrected momentum, AdaFisher(W).

The implementations (`fisherbench/optim/fadam.py`, `fisherbench/optim/sgd_biascorrected.py`,
`fisherbench/optim/adafisher/`) import only torch; their options schemas and adapters live here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fisherbench.optim.adafisher import AdaFisher, AdaFisherW
from fisherbench.optim.fadam import FAdam
from fisherbench.optim.registry import (
    Capabilities,
    OptimizerAdapter,
    OptimizerOptions,
    OptimizerRow,
    named_decay_groups,
    register,
)
from fisherbench.optim.sgd_biascorrected import SGDBiasCorrected


@dataclass
class FAdamOptions(OptimizerOptions):
    name: str = "fadam"
    lr: float = 1e-3
    weight_decay: float = 0.1  # λ on the clipped natural gradient of θ (FAdam's own decay, not AdamW's)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip: float = 1.0
    p: float = 0.5


@dataclass
class SGDBiasCorrectedOptions(OptimizerOptions):
    name: str = "sgd_biascorrected"
    # AdaFisher's CNN recipe without curvature: lr_AdaFisher / λ = 1e-3 / 1e-3
    lr: float = 1.0
    weight_decay: float = 5e-4  # coupled L2, as AdaFisher's
    momentum: float = 0.9  # β of the EMA momentum (AdaFisher's `beta`)
    # θ ← θ·(1 − lr·wd) instead of L2 in the momentum: AdaFisherW's constf at wd = λ·wd_AdaFisherW
    decoupled_weight_decay: bool = False


@dataclass
class AdaFisherOptions(OptimizerOptions):
    name: str = "adafisher"
    lr: float = 1e-3
    # the paper's CNN recipe: coupled L2 for adafisher, decoupled and multiplied by lr for adafisherw
    weight_decay: float = 5e-4
    beta: float = 0.9  # momentum of the bias-corrected first moment
    damping: float = 1e-3  # lambda in F = S (outer) H + lambda
    gamma: float = 0.8  # factor running average: 0.08/0.008 (default, official) or convex γ/(1−γ) (paper)
    update_interval: int = 100  # statistics every T steps ("TCov")
    variant: str = "default"  # default | official | paper | constf
    minmax_eps: float = 1e-6  # relative epsilon of the scale-free min-max
    implementation: str = "foreach"  # the update's kernels (AdaFisher's docstring lists the choices)


@dataclass
class AdaFisherWOptions(AdaFisherOptions):
    name: str = "adafisherw"


class AdaFisherAdapter(OptimizerAdapter):
    """Adds the F/λ range to the diagnostics and counts the factor buffers as state."""

    def diagnostics(self) -> dict[str, float]:
        stats = self.optimizer.preconditioner_stats()["global"]
        return {"F_over_lambda_min": float(stats["min"]), "F_over_lambda_max": float(stats["max"])}

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()


ADAFISHER = Capabilities(period_option="update_interval", supports_compile=False)  # module hooks
ADAFISHER_SOURCE = "fisherbench (after Gomes et al., ICLR 2025)"

register(
    OptimizerRow(
        "fadam", FAdam, FAdamOptions, family="diagonal-fisher", source="fisherbench",
        summary="FAdam: Adam as natural gradient (bias-corrected β2, adaptive ε, RMS clipping, Fisher weight "
                "decay); ours, foreach",
    ),
    OptimizerRow(
        "sgd_biascorrected", SGDBiasCorrected, SGDBiasCorrectedOptions, source="fisherbench",
        summary="SGD with EMA momentum divided by 1−β^t: AdaFisher's constf update at lr/λ, from step 1; ours",
    ),
    OptimizerRow(
        "adafisher", AdaFisher, AdaFisherOptions, family="diagonal-fisher", source=ADAFISHER_SOURCE,
        adapter=AdaFisherAdapter, groups=named_decay_groups, takes_model=True, capabilities=ADAFISHER,
        summary="AdaFisher (coupled L2): diagonal Kronecker Fisher, variants default/official/paper/constf; ours",
    ),
    OptimizerRow(
        "adafisherw", AdaFisherW, AdaFisherWOptions, family="diagonal-fisher", source=ADAFISHER_SOURCE,
        adapter=AdaFisherAdapter, groups=named_decay_groups, takes_model=True, capabilities=ADAFISHER,
        summary="AdaFisherW (decoupled weight decay, times lr): same variants as adafisher; ours",
    ),
)
