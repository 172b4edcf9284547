"""K-FAC and Shampoo through ASDL (`asdfghjkl` 0.1a5, import `asdl`), run the way the AdaFisher paper ran them.

The official AdaFisher repository's K-FAC/Shampoo trainers build `PreconditioningConfig(data_size=batch,
damping, preconditioner_upd_interval = curvature_upd_interval = interval, ema_decay=-1,
ignore_modules=[BatchNorm*, LayerNorm])`, a `KfacGradientMaker` (MC Fisher, 1 sample) or
`ShampooGradientMaker`, then per step `setup_model_call -> setup_loss_call -> forward_and_backward()`,
`clip_grad_norm_` and torch SGD (momentum 0.9). The row's optimizer is that SGD; the adapter builds the
gradient maker and overrides `forward_backward` with the ASDL calls, so the trainer's one loop times every
curvature step.

Library limits handled here (all found in the asdl 0.1a5 source):

* ASDL's gradient makers call the loss with `reduction="sum"` on curvature steps and divide the gradients
  by `data_size`. We hand ASDL a wrapper of the trainer's mean loss whose "sum" is `mean · N`, with
  `N = targets.numel()` as `data_size` (the batch size for classification, the token count for language
  models), so curvature and plain steps get the same mean-loss gradient. The loss we return is the plain
  mean the wrapper computed, not ASDL's value.
* `KfacGradientMaker` raises `TypeError` for a DDP-wrapped model: the row declares `supports_ddp=False`
  so `build_optimizer` refuses at configuration time. `ShampooGradientMaker` partitions preconditioners
  across ranks with NCCL-only collectives when `torch.distributed` is initialised: also `supports_ddp=False`.
* `ShampooGradientMaker` ignores `ignore_modules` and `block_size` and builds a full dim×dim factor for
  every matrix in `model.parameters()`. We give it a view module that holds only the matrices it should
  precondition (every dimension ≤ `max_factor_dim`, owner not excluded by name); the other parameters
  still get the SGD step with their plain gradients. One warning names what was excluded.
* K-FAC and `nn.Embedding`: with `ema_decay=-1` ASDL 0.1a5 has no inverse for embeddings (the first step
  raises "Matrix of shape kron ... has not been calculated"); with accumulation it multiplies the factors
  into a reshaped, not transposed, gradient. Embeddings are therefore always excluded, as are modules in
  `exclude_modules` or with a factor above `max_factor_dim` (default: no limit). Excluded parameters get
  the SGD step with plain gradients; one warning names them.
* `state_dict()` of ASDL gradient makers holds only the step counter. K-FAC's factors live as `fisher`
  attributes on the modules and Shampoo's in its `Preconditioner` objects: the adapter saves and restores
  them itself, keyed by module/parameter names.
* No autocast: the paper ran ASDL in fp32 without a loss scaler (`supports_amp=False`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from fisherbench.core.errors import UserError
from fisherbench.core.modules import unwrap
from fisherbench.optim.registry import (
    AutocastFactory,
    Capabilities,
    LossFn,
    OptimizerAdapter,
    OptimizerOptions,
    OptimizerRow,
    register,
    tensor_bytes,
)

# The paper's runs exclude normalisation layers from preconditioning (the official trainer passes
# `ignore_modules=[BatchNorm1d/2d/3d, LayerNorm]` to ASDL's PreconditioningConfig).
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
# SymMatrix constructor keyword -> (attribute, sub-attribute): everything K-FAC can store per module.
_SYMMATRIX_FIELDS = {
    "data": ("data", None), "inv": ("inv", None),
    "kron_A": ("kron", "A"), "kron_B": ("kron", "B"), "kron_A_inv": ("kron", "A_inv"), "kron_B_inv": ("kron", "B_inv"),
    "unit_data": ("unit", "data"), "unit_inv": ("unit", "inv"),
    "diag_weight": ("diag", "weight"), "diag_bias": ("diag", "bias"),
    "diag_weight_inv": ("diag", "weight_inv"), "diag_bias_inv": ("diag", "bias_inv"),
}


@dataclass
class AsdlOptions(OptimizerOptions):
    """Shared by `kfac` and `shampoo`: SGD-momentum on ASDL-preconditioned gradients."""

    momentum: float = 0.9
    damping: float = 1e-3
    curvature_interval: int = 10  # preconditioner_upd_interval = curvature_upd_interval (official)
    ema_decay: float = -1.0  # -1: K-FAC uses fresh curvature, Shampoo sums its statistics (official)
    grad_clip: Optional[float] = 1.0  # clip_grad_norm_ of the preconditioned gradient (official)
    # modules/matrices with a larger Kronecker factor get plain gradients (None: no limit)
    max_factor_dim: Optional[int] = None
    exclude_modules: list[str] = field(default_factory=list)  # module-name substrings never preconditioned

    def __post_init__(self) -> None:
        if self.curvature_interval < 1:
            raise UserError(f"optimizer.curvature_interval must be >= 1, got {self.curvature_interval}")
        if self.damping < 0:
            raise UserError(f"optimizer.damping must be >= 0, got {self.damping}")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if self.max_factor_dim is not None and self.max_factor_dim < 1:
            raise UserError(f"optimizer.max_factor_dim must be >= 1 or null, got {self.max_factor_dim}")


@dataclass
class KfacOptions(AsdlOptions):
    name: str = "kfac"
    lr: float = 0.3
    weight_decay: float = 5e-4
    fisher_type: str = "fisher_mc"  # fisher_mc (paper) | fisher_emp | fisher_exact
    n_mc_samples: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fisher_type not in ("fisher_mc", "fisher_emp", "fisher_exact"):
            raise UserError(
                f"optimizer.fisher_type must be fisher_mc|fisher_emp|fisher_exact, got {self.fisher_type!r}"
            )


@dataclass
class ShampooOptions(AsdlOptions):
    name: str = "shampoo"
    lr: float = 0.3
    weight_decay: float = 5e-4
    damping: float = 1e-12
    curvature_interval: int = 1
    max_factor_dim: Optional[int] = 4096  # ASDL Shampoo would factor a 40k-token embedding: keep it out


class AsdlAdapter(OptimizerAdapter):
    """torch SGD on gradients an ASDL gradient maker preconditions; the gradient maker owns forward+backward.

    Subclasses build `self.grad_maker` from the model and options and add their curvature state.
    """

    reads = (*OptimizerAdapter.reads, "damping", "curvature_interval", "ema_decay", "max_factor_dim",
             "exclude_modules")
    grad_maker: Any

    def forward_backward(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
        autocast: AutocastFactory,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # autocast is deliberately not used: the paper ran ASDL in fp32 (capabilities.supports_amp=False)
        num_terms = targets.numel()
        mean_loss: list[torch.Tensor] = []

        def loss_with_reduction(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            mean = loss_fn(outputs, targets)
            mean_loss.append(mean.detach())
            if reduction == "mean":
                return mean
            if reduction == "sum":
                return mean * num_terms
            raise ValueError(f"ASDL asked for reduction={reduction!r}; only mean/sum are defined here")

        gm = self.grad_maker
        gm.config.data_size = num_terms  # ASDL divides the summed loss's gradient by this
        dummy_outputs = gm.setup_model_call(model, inputs)
        gm.setup_loss_call(loss_with_reduction, dummy_outputs, targets)
        with warnings.catch_warnings():
            # ASDL registers legacy module backward hooks; it reads only grad_output, which they deliver
            # correctly, so torch's warning about multi-node forwards does not apply
            warnings.filterwarnings("ignore", message="Using a non-full backward hook")
            outputs, _ = gm.forward_and_backward()
        return mean_loss[0], outputs

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "grad_maker": self.grad_maker_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_grad_maker_state(state["grad_maker"])

    def state_bytes(self) -> int:
        return tensor_bytes(self.optimizer.state) + tensor_bytes(self.grad_maker_state())

    # subclasses add their curvature state
    def grad_maker_state(self) -> dict[str, Any]:
        return {"step": int(self.grad_maker.state["step"])}

    def load_grad_maker_state(self, state: dict[str, Any]) -> None:
        self.grad_maker.state["step"] = int(state["step"])


def _preconditioning_config(opts: AsdlOptions, ignore_modules: list[Any]) -> Any:
    from asdl import PreconditioningConfig  # lazy: asdl warns on import; only the ASDL rows use it

    return PreconditioningConfig(
        data_size=1,  # set per step to the number of loss terms (see AsdlAdapter.forward_backward)
        damping=opts.damping,
        preconditioner_upd_interval=opts.curvature_interval,
        curvature_upd_interval=opts.curvature_interval,
        ema_decay=opts.ema_decay,
        ignore_modules=ignore_modules,
    )


def _excluded_by_name(name: str, patterns: list[str]) -> bool:
    return any(pattern in name for pattern in patterns)


def _kfac_factor_dims(module: nn.Module) -> tuple[int, ...]:
    """Side lengths of the two K-FAC factors ASDL builds for a module (activations, output gradients)."""
    if isinstance(module, nn.Embedding):
        return (module.num_embeddings, module.embedding_dim)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
        return (math.prod(weight.shape[1:]), weight.shape[0])
    return ()


class KfacAdapter(AsdlAdapter):
    """K-FAC: factors are attributes `fisher` (an ASDL `SymMatrix`) on each preconditioned module."""

    reads = (*AsdlAdapter.reads, "fisher_type", "n_mc_samples")

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: nn.Module, options: KfacOptions) -> None:
        from asdl import KfacGradientMaker  # lazy: asdl warns on import; only the ASDL rows use it

        super().__init__(optimizer, model=model, options=options)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise UserError("ASDL K-FAC does not support DistributedDataParallel models; run kfac on one process.")
        inner = unwrap(model)
        skipped: dict[str, list[str]] = {}  # reason -> module names, for one warning
        excluded: dict[str, nn.Module] = {}
        for name, m in inner.named_modules():
            if not any(p.requires_grad for p in m.parameters(recurse=False)) or isinstance(m, NORM_LAYERS):
                continue
            if isinstance(m, nn.Embedding):
                reason = ("nn.Embedding (ASDL 0.1a5 has no K-FAC inverse for it with ema_decay=-1, and otherwise "
                          "applies its factors to a reshaped, not transposed, gradient)")
            elif options.max_factor_dim is not None and any(d > options.max_factor_dim for d in _kfac_factor_dims(m)):
                reason = f"a Kronecker factor larger than max_factor_dim={options.max_factor_dim}"
            elif _excluded_by_name(name, options.exclude_modules):
                reason = "listed in exclude_modules"
            else:
                continue
            excluded[name] = m
            skipped.setdefault(reason, []).append(name)
        with warnings.catch_warnings():
            # ASDL warns per unsupported leaf module; those are reported below in the one warning
            warnings.filterwarnings("ignore", message="This model contains")
            self.grad_maker = KfacGradientMaker(
                inner, _preconditioning_config(options, [*NORM_LAYERS, *excluded.values()]),
                fisher_type=options.fisher_type, n_mc_samples=options.n_mc_samples,
            )
        # preconditioned modules by their name in the model
        self.named_modules = {name.replace("/", "."): m for name, m in self.grad_maker.module_dict.items()}
        accounted = {id(p) for m in [*self.named_modules.values(), *excluded.values()] for p in m.parameters()}
        accounted |= {id(p) for m in inner.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
        unsupported = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in accounted]
        if unsupported:
            skipped["no ASDL K-FAC rule for the layer type (parameters)"] = unsupported
        if skipped:
            warnings.warn(
                "kfac: not preconditioning " + "; ".join(f"{', '.join(names)}: {why}" for why, names in skipped.items())
                + ". Their parameters get the SGD step with plain gradients.",
                stacklevel=2,
            )

    def grad_maker_state(self) -> dict[str, Any]:
        attr = self.grad_maker.fisher_maker.config.fisher_attr
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name, module in self.named_modules.items():
            fisher = getattr(module, attr, None)
            if fisher is None:
                continue
            tensors = {}
            for key, (part, sub) in _SYMMATRIX_FIELDS.items():
                value = getattr(fisher, part, None)
                if sub is not None and value is not None:
                    value = getattr(value, sub, None)
                if isinstance(value, torch.Tensor):
                    tensors[key] = value
            factors[name] = tensors
        return {**super().grad_maker_state(), "factors": factors}

    def load_grad_maker_state(self, state: dict[str, Any]) -> None:
        from asdl.symmatrix import SymMatrix  # lazy: asdl warns on import; only the ASDL rows use it

        super().load_grad_maker_state(state)
        attr = self.grad_maker.fisher_maker.config.fisher_attr
        unknown = sorted(set(state["factors"]) - set(self.named_modules))
        if unknown:
            raise KeyError(f"K-FAC checkpoint has factors for modules this model does not precondition: {unknown}")
        for name, module in self.named_modules.items():
            tensors = state["factors"].get(name)
            if tensors is None:
                if hasattr(module, attr):
                    delattr(module, attr)
                continue
            device = next(module.parameters()).device
            setattr(module, attr, SymMatrix(**{k: v.detach().clone().to(device) for k, v in tensors.items()}))


class _ParameterView(nn.Module):
    """The matrices ASDL Shampoo may precondition. It builds factors for every matrix in `model.parameters()`,
    so it is handed this view; forward/backward still run through the real model."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class ShampooAdapter(AsdlAdapter):
    """Shampoo: statistics and inverse roots live in ASDL `Preconditioner` objects, one per matrix."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: nn.Module, options: ShampooOptions) -> None:
        from asdl import ShampooGradientMaker  # lazy: asdl warns on import; only the ASDL rows use it

        super().__init__(optimizer, model=model, options=options)
        inner = unwrap(model)
        owners = {}
        for mname, module in inner.named_modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), mname)
        selected: list[tuple[str, nn.Parameter]] = []
        excluded: list[str] = []
        seen: set[int] = set()
        for name, p in inner.named_parameters():
            if not p.requires_grad or p.ndim < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            too_large = options.max_factor_dim is not None and max(p.shape) > options.max_factor_dim
            if too_large or _excluded_by_name(owners[id(p)], options.exclude_modules):
                excluded.append(f"{name} {tuple(p.shape)}")
            else:
                selected.append((name, p))
        if excluded:
            warnings.warn(
                f"shampoo: not preconditioning {', '.join(excluded)} (a dimension > max_factor_dim="
                f"{options.max_factor_dim} or in exclude_modules: ASDL Shampoo would build a full dim x dim "
                "factor); they get the SGD step with plain gradients.",
                stacklevel=2,
            )
        if not selected:
            raise UserError(
                "shampoo: no parameter matrix to precondition (all excluded or none trainable); "
                "raise optimizer.max_factor_dim, shorten optimizer.exclude_modules, or use sgd."
            )
        view = _ParameterView([p for _, p in selected])
        self.grad_maker = ShampooGradientMaker(view, _preconditioning_config(options, list(NORM_LAYERS)))
        self.param_names = [n for n, _ in selected]  # names of the preconditioned matrices, in the view's order

    def grad_maker_state(self) -> dict[str, Any]:
        factors = {
            name: {"statistics": list(pre.statistics), "preconditioners": list(pre.preconditioners)}
            for name, pre in zip(self.param_names, self.grad_maker.preconditioners)
        }
        return {**super().grad_maker_state(), "factors": factors}

    def load_grad_maker_state(self, state: dict[str, Any]) -> None:
        super().load_grad_maker_state(state)
        if set(state["factors"]) != set(self.param_names):
            raise KeyError(
                "Shampoo checkpoint preconditions other parameters than this run: "
                f"saved {sorted(state['factors'])}, now {sorted(self.param_names)}"
            )
        for name, pre in zip(self.param_names, self.grad_maker.preconditioners):
            saved = state["factors"][name]
            device = pre.param.device
            pre.statistics = [t.detach().clone().to(device) for t in saved["statistics"]]
            pre.preconditioners = [t.detach().clone().to(device) for t in saved["preconditioners"]]


ASDL = Capabilities(supports_ddp=False, supports_amp=False, period_option="curvature_interval",
                    supports_compile=False)  # ASDL runs forward/backward itself, with module hooks

register(
    OptimizerRow(
        "kfac", torch.optim.SGD, KfacOptions, family="kronecker", source="asdfghjkl", adapter=KfacAdapter,
        capabilities=ASDL,
        summary="K-FAC (ASDL KfacGradientMaker, MC Fisher) + SGD momentum 0.9 + grad-norm clipping, as the paper "
                "ran it",
    ),
    OptimizerRow(
        "shampoo", torch.optim.SGD, ShampooOptions, family="kronecker", source="asdfghjkl", adapter=ShampooAdapter,
        capabilities=ASDL,
        summary="Shampoo (ASDL ShampooGradientMaker, restricted to matrices it can factor) + SGD momentum 0.9 + "
                "clipping",
    ),
)
