"""Baselines from `pytorch_optimizer` (≥ 4.1): AdaHessian, Sophia-H, SOAP, Muon, schedule-free AdamW.

* AdaHessian / Sophia-H estimate the Hessian diagonal with Hutchinson probes inside `step()`, from gradients
  that carry their graph: the adapter calls `backward(create_graph=True)` only on the steps where the
  library refreshes the estimate (every `update_period` steps), plain `backward()` otherwise. No loss
  scaler is ever involved (the official AdaHessian trainer scaled the loss, inflating |Hv| by the scale,
  spec `adafisher_official.md` §2 item 10). Both refuse DDP: the Hessian-vector products are not
  all-reduced, so ranks would drift apart.
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

from optim.registry import (
    OPTIMIZERS,
    AutocastFactory,
    BuildContext,
    Capabilities,
    LossFn,
    OptimizerAdapter,
    OptimizerOptions,
    StepOutput,
    param_groups,
    strip_names,
    unwrap,
)


def _groups(model: nn.Module, opts: OptimizerOptions) -> list[dict]:
    return strip_names(param_groups(model, opts.weight_decay, opts.no_decay_bias_norm))


# --------------------------------------------------------------------------------------------------------
# Hutchinson-based: AdaHessian, Sophia-H
# --------------------------------------------------------------------------------------------------------
class HutchinsonAdapter(OptimizerAdapter):
    """Backward with `create_graph=True` on the steps where the optimizer draws Hutchinson probes."""

    def train_step(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        autocast: AutocastFactory = contextlib.nullcontext,
    ) -> StepOutput:
        # pytorch_optimizer refreshes the Hessian when the group step count is a multiple of update_period
        hessian_step = self.optimizer.param_groups[0].get("step", 0) % self.optimizer.update_period == 0
        self.optimizer.zero_grad(set_to_none=True)
        # autocast is deliberately not used (supports_amp=False): Hessian-vector products in fp32
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        with warnings.catch_warnings():
            # torch warns that create_graph makes .grad reference the graph; we drop .grad right after step()
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=hessian_step)
        self.clip_gradients()
        self.optimizer.step()
        if hessian_step:
            # .grad holds the double-backward graph; drop it now instead of at the next zero_grad
            self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss.detach(), outputs.detach())


@dataclass
class AdaHessianOptions(OptimizerOptions):
    name: str = "adahessian"
    lr: float = 0.15
    weight_decay: float = 5e-4  # decoupled (p ← p·(1 − lr·wd)), as the official AdaHessian
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-4
    hessian_power: float = 1.0
    update_period: int = 1
    num_samples: int = 1
    hessian_distribution: str = "rademacher"


@OPTIMIZERS.register(
    "adahessian",
    schema=AdaHessianOptions,
    capabilities=Capabilities(
        needs_create_graph=True, supports_ddp=False, supports_amp=False, family="hessian",
        period_option="update_period",
    ),
    summary="AdaHessian (Hutchinson Hessian diagonal, Rademacher probes); backward(create_graph=True), no loss scaler",
    source="pytorch-optimizer",
)
def build_adahessian(model: nn.Module, opts: AdaHessianOptions, ctx: BuildContext) -> OptimizerAdapter:
    from pytorch_optimizer import AdaHessian

    _check_hutchinson(opts.update_period, opts.num_samples, opts.hessian_distribution)
    opt = AdaHessian(
        _groups(model, opts), lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay,
        weight_decouple=True, hessian_power=opts.hessian_power, update_period=opts.update_period,
        num_samples=opts.num_samples, hessian_distribution=opts.hessian_distribution, eps=opts.eps,
    )
    return HutchinsonAdapter(opt, grad_clip=opts.grad_clip)


@dataclass
class SophiaOptions(OptimizerOptions):
    name: str = "sophia"
    lr: float = 6e-2
    weight_decay: float = 0.0  # decoupled
    betas: list[float] = field(default_factory=lambda: [0.96, 0.99])
    p: float = 1e-2  # clip of the preconditioned update (per element)
    update_period: int = 10
    num_samples: int = 1
    hessian_distribution: str = "gaussian"
    eps: float = 1e-12


@OPTIMIZERS.register(
    "sophia",
    schema=SophiaOptions,
    capabilities=Capabilities(
        needs_create_graph=True, supports_ddp=False, supports_amp=False, family="hessian",
        period_option="update_period",
    ),
    summary="Sophia-H (pytorch_optimizer SophiaH): clipped updates with a Hutchinson Hessian every update_period steps",
    source="pytorch-optimizer",
)
def build_sophia(model: nn.Module, opts: SophiaOptions, ctx: BuildContext) -> OptimizerAdapter:
    from pytorch_optimizer import SophiaH

    _check_hutchinson(opts.update_period, opts.num_samples, opts.hessian_distribution)
    opt = SophiaH(
        _groups(model, opts), lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay,
        weight_decouple=True, p=opts.p, update_period=opts.update_period, num_samples=opts.num_samples,
        hessian_distribution=opts.hessian_distribution, eps=opts.eps,
    )
    return HutchinsonAdapter(opt, grad_clip=opts.grad_clip)


def _check_hutchinson(update_period: int, num_samples: int, distribution: str) -> None:
    if update_period < 1:
        raise ValueError(f"optimizer.update_period must be >= 1, got {update_period}")
    if num_samples < 1:
        raise ValueError(f"optimizer.num_samples must be >= 1, got {num_samples}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"optimizer.hessian_distribution must be rademacher|gaussian, got {distribution!r}")


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


@OPTIMIZERS.register(
    "soap",
    schema=SoapOptions,
    capabilities=Capabilities(family="kronecker", period_option="precondition_frequency"),
    summary="SOAP: Adam in the eigenbasis of Shampoo's factors, eigenbasis refreshed every precondition_frequency steps",
    source="pytorch-optimizer",
)
def build_soap(model: nn.Module, opts: SoapOptions, ctx: BuildContext) -> OptimizerAdapter:
    from pytorch_optimizer import SOAP

    if opts.precondition_frequency < 1:
        raise ValueError(f"optimizer.precondition_frequency must be >= 1, got {opts.precondition_frequency}")
    opt = SOAP(
        _groups(model, opts), lr=opts.lr, betas=tuple(opts.betas), shampoo_beta=opts.shampoo_beta,
        weight_decay=opts.weight_decay, precondition_frequency=opts.precondition_frequency,
        max_precondition_dim=opts.max_precondition_dim, merge_dims=opts.merge_dims,
        precondition_1d=opts.precondition_1d, normalize_gradient=opts.normalize_gradient,
        correct_bias=opts.correct_bias, eps=opts.eps,
    )
    return OptimizerAdapter(opt, grad_clip=opts.grad_clip)


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


def muon_split(model: nn.Module, adamw_modules: list[str]) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon parameters, AdamW parameters) by name: AdamW gets every tensor with < 2 dims, every nn.Embedding,
    and the modules named in `adamw_modules` (default: the last nn.Linear, i.e. the output head)."""
    inner = unwrap(model)
    prefixes = list(adamw_modules) or [name for name, m in inner.named_modules() if isinstance(m, nn.Linear)][-1:]
    prefixes += [name for name, m in inner.named_modules() if isinstance(m, nn.Embedding)]
    fallback_ids = {
        id(p) for name, m in inner.named_modules() if name in prefixes or any(name.startswith(f + ".") for f in prefixes)
        for p in m.parameters()
    }
    muon, adamw, seen = [], [], set()
    for name, p in inner.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (adamw if p.ndim < 2 or id(p) in fallback_ids else muon).append((name, p))
    return muon, adamw


@OPTIMIZERS.register(
    "muon",
    schema=MuonOptions,
    capabilities=Capabilities(family="orthogonalized"),
    summary="Muon (Newton-Schulz orthogonalised momentum) on hidden matrices; AdamW for embeddings, head, 1-D params",
    source="pytorch-optimizer",
)
def build_muon(model: nn.Module, opts: MuonOptions, ctx: BuildContext) -> OptimizerAdapter:
    from pytorch_optimizer import Muon

    muon, adamw = muon_split(model, opts.adamw_modules)
    if not muon:
        warnings.warn("muon: the model has no hidden weight matrix; every parameter uses the AdamW fallback.", stacklevel=2)
    groups: list[dict[str, Any]] = []
    if muon:
        groups.append({"params": [p for _, p in muon], "use_muon": True, "lr": opts.lr, "weight_decay": opts.weight_decay})
    if adamw:
        decay = [p for _, p in adamw if not (opts.no_decay_bias_norm and p.ndim <= 1)]
        no_decay = [p for _, p in adamw if opts.no_decay_bias_norm and p.ndim <= 1]
        for params, wd in ((decay, opts.adamw_wd), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "use_muon": False, "lr": opts.adamw_lr, "weight_decay": wd})
    opt = Muon(
        groups, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay, nesterov=opts.nesterov,
        ns_steps=opts.ns_steps, use_adjusted_lr=opts.use_adjusted_lr, adamw_lr=opts.adamw_lr,
        adamw_betas=tuple(opts.adamw_betas), adamw_wd=opts.adamw_wd, adamw_eps=opts.adamw_eps,
    )
    return OptimizerAdapter(opt, grad_clip=opts.grad_clip)


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


@OPTIMIZERS.register(
    "schedulefree_adamw",
    schema=ScheduleFreeAdamWOptions,
    capabilities=Capabilities(eval_weights=True, family="first-order"),
    summary="Schedule-free AdamW: no LR schedule needed; evaluates with its averaged weights (eval_weights)",
    source="pytorch-optimizer",
)
def build_schedulefree_adamw(model: nn.Module, opts: ScheduleFreeAdamWOptions, ctx: BuildContext) -> OptimizerAdapter:
    from pytorch_optimizer import ScheduleFreeAdamW

    opt = ScheduleFreeAdamW(
        _groups(model, opts), lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay,
        r=opts.r, weight_lr_power=opts.weight_lr_power, warmup_steps=opts.warmup_steps, eps=opts.eps,
    )
    return ScheduleFreeAdapter(opt, grad_clip=opts.grad_clip)
