"""Rows for `pytorch_optimizer` (≥ 4.1): AdaHessian, Sophia-H, SOAP, Muon, schedule-free AdamW.

* AdaHessian / Sophia-H estimate the Hessian diagonal with Hutchinson probes inside `step()`, from gradients
  that carry their graph: the adapter's `backward` uses `create_graph=True` only on the steps where the
  library refreshes the estimate (every `update_period` steps), a plain `backward()` otherwise. No loss
  scaler is ever involved (the official AdaHessian trainer ran under a GradScaler, which multiplies |Hv| by
  the loss scale). Both refuse DDP: the Hessian-vector products are not all-reduced, so ranks would drift.
* Muon orthogonalises the momentum of hidden weight matrices; embeddings, the output head and every
  tensor with fewer than 2 dimensions go to its built-in AdamW groups (the usual Muon recipe).
* Schedule-free AdamW trains on an interpolated iterate y and evaluates on the average x:
  `eval_weights()` switches the model to x (`optimizer.eval()`) and back to exactly the saved y.
  It is meant for a constant learning rate (plus warm-up): run it with `schedule.name=constant`. BatchNorm
  running statistics are those accumulated at y (the schedule-free authors recompute them at x; we do not).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.core.modules import unwrap
from fisherbench.optim.registry import (
    Capabilities,
    OptimizerAdapter,
    OptimizerOptions,
    OptimizerRow,
    drop_graph_carrying_grads,
    register,
)


# --------------------------------------------------------------------------------------------------------
# Hutchinson-based: AdaHessian, Sophia-H
# --------------------------------------------------------------------------------------------------------
@dataclass
class HutchinsonOptions(OptimizerOptions):
    update_period: int = 1  # Hessian-diagonal refresh every this many steps
    num_samples: int = 1  # probes per refresh
    hessian_distribution: str = "rademacher"  # rademacher | gaussian

    def __post_init__(self) -> None:
        if self.update_period < 1:
            raise UserError(f"optimizer.update_period must be >= 1, got {self.update_period}")
        if self.num_samples < 1:
            raise UserError(f"optimizer.num_samples must be >= 1, got {self.num_samples}")
        if self.hessian_distribution not in ("rademacher", "gaussian"):
            raise UserError(
                f"optimizer.hessian_distribution must be rademacher|gaussian, got {self.hessian_distribution!r}"
            )


@dataclass
class AdaHessianOptions(HutchinsonOptions):
    name: str = "adahessian"
    lr: float = 0.15
    weight_decay: float = 5e-4  # decoupled (p ← p·(1 − lr·wd)), as the official AdaHessian
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-4
    hessian_power: float = 1.0


@dataclass
class SophiaOptions(HutchinsonOptions):
    name: str = "sophia"
    lr: float = 6e-2
    weight_decay: float = 0.0  # decoupled
    betas: list[float] = field(default_factory=lambda: [0.96, 0.99])
    p: float = 1e-2  # clip of the preconditioned update (per element)
    update_period: int = 10
    hessian_distribution: str = "gaussian"
    eps: float = 1e-12


class HutchinsonAdapter(OptimizerAdapter):
    """`backward(create_graph=True)` on the steps where the optimizer draws Hutchinson probes.

    Hessian-vector products run in fp32 (`supports_amp=False`: the run layer never passes an autocast here).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: nn.Module, options: OptimizerOptions) -> None:
        super().__init__(optimizer, model=model, options=options)
        optimizer.register_step_post_hook(drop_graph_carrying_grads)

    def backward(self, loss: torch.Tensor) -> None:
        # pytorch_optimizer refreshes the Hessian when the group step count is a multiple of update_period
        hessian_step = self.optimizer.param_groups[0].get("step", 0) % self.optimizer.update_period == 0
        with warnings.catch_warnings():
            # torch warns that create_graph makes .grad reference the graph; the post-step hook drops it
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=hessian_step)


HUTCHINSON = dict(needs_create_graph=True, supports_ddp=False, supports_amp=False, period_option="update_period",
                  supports_compile=False)  # double backward


# --------------------------------------------------------------------------------------------------------
# SOAP
# --------------------------------------------------------------------------------------------------------
@dataclass
class SoapOptions(OptimizerOptions):
    name: str = "soap"
    lr: float = 3e-3
    weight_decay: float = 0.01  # decoupled
    betas: list[float] = field(default_factory=lambda: [0.95, 0.95])
    shampoo_beta: Optional[float] = None  # None: betas[1]
    precondition_frequency: int = 10
    max_precondition_dim: int = 10000  # larger dimensions use the identity
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_gradient: bool = False
    correct_bias: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.precondition_frequency < 1:
            raise UserError(f"optimizer.precondition_frequency must be >= 1, got {self.precondition_frequency}")


# --------------------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------------------
@dataclass
class MuonOptions(OptimizerOptions):
    name: str = "muon"
    lr: float = 0.02  # Muon groups (hidden weight matrices)
    weight_decay: float = 0.0  # Muon groups, decoupled
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    use_adjusted_lr: bool = False
    adamw_lr: float = 3e-4  # AdamW fallback: embeddings, output head, tensors with < 2 dims
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_wd: float = 0.0
    adamw_eps: float = 1e-10
    # module names (and their children) that go to AdamW besides embeddings and 1-D tensors; empty: the last
    # nn.Linear, i.e. the output head
    adamw_modules: list[str] = field(default_factory=list)


Named = list[tuple[str, nn.Parameter]]


def muon_split(model: nn.Module, adamw_modules: list[str]) -> tuple[Named, Named]:
    """(Muon parameters, AdamW parameters) by name: AdamW gets every tensor with < 2 dims, every nn.Embedding,
    and the modules named in `adamw_modules` (default: the last nn.Linear, i.e. the output head)."""
    inner = unwrap(model)
    prefixes = list(adamw_modules) or [name for name, m in inner.named_modules() if isinstance(m, nn.Linear)][-1:]
    prefixes += [name for name, m in inner.named_modules() if isinstance(m, nn.Embedding)]
    fallback_ids = {
        id(p) for name, m in inner.named_modules()
        if name in prefixes or any(name.startswith(f + ".") for f in prefixes) for p in m.parameters()
    }
    muon, adamw, seen = [], [], set()
    for name, p in inner.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (adamw if p.ndim < 2 or id(p) in fallback_ids else muon).append((name, p))
    return muon, adamw


def muon_groups(model: nn.Module, opts: MuonOptions) -> list[dict[str, Any]]:
    """Muon's policy: a `use_muon` group for hidden matrices, AdamW groups (own lr/decay) for the rest."""
    muon, adamw = muon_split(model, opts.adamw_modules)
    if not muon:
        warnings.warn("muon: the model has no hidden weight matrix; every parameter uses the AdamW fallback.",
                      stacklevel=2)
    groups: list[dict[str, Any]] = []
    if muon:
        groups.append({"params": [p for _, p in muon], "use_muon": True, "lr": opts.lr,
                       "weight_decay": opts.weight_decay})
    decay = [p for _, p in adamw if not (opts.no_decay_bias_norm and p.ndim <= 1)]
    no_decay = [p for _, p in adamw if opts.no_decay_bias_norm and p.ndim <= 1]
    for params, wd in ((decay, opts.adamw_wd), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "use_muon": False, "lr": opts.adamw_lr, "weight_decay": wd})
    return groups


muon_groups.reads = ("no_decay_bias_norm", "adamw_modules")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------
# Schedule-free AdamW
# --------------------------------------------------------------------------------------------------------
@dataclass
class ScheduleFreeAdamWOptions(OptimizerOptions):
    name: str = "schedulefree_adamw"
    lr: float = 2.5e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    r: float = 0.0
    weight_lr_power: float = 2.0
    eps: float = 1e-8


class ScheduleFreeAdapter(OptimizerAdapter):
    """Trains on y; evaluation must see the averaged weights x (schedule-free's output)."""

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[None]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # optimizer.train() would rebuild y from x by interpolation (off by rounding); keep y exactly so
        # that training does not depend on when or how often it is evaluated
        training_weights = [p.detach().clone() for p in params]
        self.optimizer.eval()  # p ← x
        try:
            yield
        finally:
            self.optimizer.train()  # train_mode flags
            with torch.no_grad():
                torch._foreach_copy_(params, training_weights)

    def eval_weights(self) -> ContextManager[Any]:
        return self._averaged()


register(
    OptimizerRow(
        "adahessian", "pytorch_optimizer:AdaHessian", AdaHessianOptions, family="hessian",
        source="pytorch-optimizer", adapter=HutchinsonAdapter, fixed={"weight_decouple": True},
        capabilities=Capabilities(**HUTCHINSON),
        summary="AdaHessian (Hutchinson Hessian diagonal, Rademacher probes); backward(create_graph=True), no "
                "loss scaler",
    ),
    OptimizerRow(
        "sophia", "pytorch_optimizer:SophiaH", SophiaOptions, family="hessian", source="pytorch-optimizer",
        adapter=HutchinsonAdapter, fixed={"weight_decouple": True}, capabilities=Capabilities(**HUTCHINSON),
        summary="Sophia-H (pytorch_optimizer SophiaH): clipped updates with a Hutchinson Hessian every "
                "update_period steps",
    ),
    OptimizerRow(
        "soap", "pytorch_optimizer:SOAP", SoapOptions, family="kronecker", source="pytorch-optimizer",
        capabilities=Capabilities(period_option="precondition_frequency"),
        summary="SOAP: Adam in the eigenbasis of Shampoo's factors, eigenbasis refreshed every "
                "precondition_frequency steps",
    ),
    OptimizerRow(
        "muon", "pytorch_optimizer:Muon", MuonOptions, family="orthogonalized", source="pytorch-optimizer",
        groups=muon_groups,
        summary="Muon (Newton-Schulz orthogonalised momentum) on hidden matrices; AdamW for embeddings, head, "
                "1-D params",
    ),
    OptimizerRow(
        "schedulefree_adamw", "pytorch_optimizer:ScheduleFreeAdamW", ScheduleFreeAdamWOptions,
        source="pytorch-optimizer", adapter=ScheduleFreeAdapter,
        summary="Schedule-free AdamW: no LR schedule needed; evaluates with its averaged weights (eval_weights)",
    ),
)
