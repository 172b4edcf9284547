"""The AdaFisher and AdaFisherW optimizers (`torch.optim.Optimizer` subclasses); the package docstring
describes the update and the variants.

`AdaFisher.step()` folds pending statistics, gathers each group's tensor lists in `_init_group` (lazy state
set-up lives there) and calls the functional `adafisher()` (`functional.py`). The parameter -> layer map is
built once at construction (`plan.py`); the running factors and their hooks live in `factors.py`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .factors import FactorState, StatisticsHooks, distributed_world_size, layer_ranges
from .functional import Fisher, Kron, adafisher, chunk_elements, fisher_numel
from .plan import ConstantF, ParamSpec, Plan, explicit_plan, listing, official_plan
from .stats import fold_coefficients

VARIANTS = ("default", "official", "paper", "constf")
IMPLEMENTATIONS = ("foreach", "single", "compiled")
STATE_FORMAT = "fisherbench.adafisher/2"
# format 1 (before the paper variant kept raw running averages) has the same layout for the other variants
_COMPATIBLE_FORMATS = {"fisherbench.adafisher/1": ("default", "official", "constf")}


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel (`.module`) and torch.compile (`._orig_mod`)
    wrappers, so that hooks land on, and names come from, the real layers."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class AdaFisher(torch.optim.Optimizer):
    """AdaFisher with coupled L2 weight decay (`g <- g + wd*p`), as the paper's CNN runs.

    Args:
        model: the model (or its DDP / torch.compile wrapper); forward hooks go on its tracked layers.
        lr, beta, weight_decay: per-group hyper-parameters (override them in `params` groups).
        damping: lambda in F = S (outer) H + lambda; must be > 0.
        gamma: factor running-average parameter: `default`/`official` use the official coefficients
            0.1*gamma / 0.01*gamma (0.08/0.008 for 0.8); `paper` the convex average gamma / (1 - gamma) of the
            raw diagonals (its config uses 0.92, see docs/adafisher.md).
        update_interval: statistics every this many steps (steps 0, T, 2T, ... of the optimizer's counter).
        variant: "default" | "official" | "paper" | "constf" (see the module docstring).
        params: optional parameter groups (dicts with "params" and per-group "lr"/"weight_decay"/"beta");
            default: every trainable parameter of the model.
        minmax_eps: relative epsilon of the scale-free min-max normalisation.
        implementation: "foreach" (default: grouped `torch._foreach_*` kernels, chunk by chunk of a reused F
            workspace of 16 MiB, 1 MiB on CPU, or the largest tracked tensor; nothing kept between steps),
            "single" (one tensor at a time, the reference loop) or "compiled" (one fused torch.compile kernel per
            tracked tensor, F never materialised; tens of seconds of compilation on first use).
        sync_statistics: all-reduce the statistics over the process group on statistics steps (one call).
            None (default): when the model passed is a DistributedDataParallel wrapper and the group has more
            than one rank, so that independent per-rank models (e.g. timing copies) never wait on each other.
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        gamma: float = 0.8,
        update_interval: int = 100,
        weight_decay: float = 0.0,
        variant: str = "default",
        params: Optional[Iterable[Any]] = None,
        *,
        minmax_eps: float = 1e-6,
        implementation: str = "foreach",
        sync_statistics: Optional[bool] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"AdaFisher takes the model (an nn.Module) first, got {type(model).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"AdaFisher: variant must be one of {VARIANTS}, got {variant!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"AdaFisher: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if not (isinstance(update_interval, int) and update_interval >= 1):
            raise ValueError(f"AdaFisher: update_interval must be an integer >= 1, got {update_interval!r}")
        if not (damping > 0 and math.isfinite(damping)):
            raise ValueError(
                f"AdaFisher: damping must be a positive finite number (F = S*H + damping is a divisor and "
                f"min-max makes some S*H exactly 0), got {damping!r}"
            )
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"AdaFisher: gamma must be in [0, 1], got {gamma!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdaFisher: beta must be in [0, 1), got {beta!r}")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"AdaFisher: lr and weight_decay must be >= 0, got {lr!r}, {weight_decay!r}")
        if not minmax_eps >= 0:
            raise ValueError(f"AdaFisher: minmax_eps must be >= 0, got {minmax_eps!r}")

        root = _unwrap(model)
        self._names: dict[int, str] = {id(p): n for n, p in root.named_parameters()}
        groups = self._normalise_groups(root, params)
        super().__init__(groups, dict(lr=lr, beta=beta, weight_decay=weight_decay))

        self.variant = variant
        self.damping = float(damping)
        self.gamma = float(gamma)
        self.update_interval = update_interval
        self.minmax_eps = float(minmax_eps)
        self.implementation = implementation
        self.steps = 0
        self._by_name = {n: p for n, p in root.named_parameters()}
        optimised = [p for g in self.param_groups for p in g["params"]]
        if variant == "constf":
            plan = Plan([], {id(p): ConstantF(self.damping) for p in optimised}, [])
        elif variant == "official":
            plan = official_plan(root, optimised, self._names)
        else:
            plan = explicit_plan(root, optimised, self._names, 1.0 if variant == "default" else
                                  1.0 + self.damping, variant)
        self._specs = plan.specs
        self.layer_names = [name for name, _, _ in plan.layers]
        if plan.notes:
            warnings.warn(f"AdaFisher(variant='{variant}'): " + "; ".join(plan.notes), UserWarning, stacklevel=2)
        device = optimised[0].device if optimised else torch.device("cpu")
        mode = "average_then_minmax" if variant == "paper" else "minmax_then_average"
        self._factors: Optional[FactorState] = FactorState(plan.layers, device, mode) if plan.layers else None
        self._hooks = StatisticsHooks(self._factors) if self._factors is not None else None
        self._fold = fold_coefficients(variant, self.gamma)
        self._fishers: dict[int, Optional[Fisher]] = {id(p): self._fisher_of(self._specs[id(p)]) for p in optimised}
        self._workspace: Optional[Tensor] = None
        self._coverage_checked = False
        if sync_statistics is None:
            sync_statistics = isinstance(model, nn.parallel.DistributedDataParallel)
        self.sync_statistics = bool(sync_statistics)
        self._set_collecting(True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_specs"):  # construction has finished
            raise NotImplementedError(
                "AdaFisher builds its parameter->layer map at construction; pass every parameter group to the "
                "constructor (params=[...]) instead of add_param_group()"
            )
        super().add_param_group(param_group)

    # -- construction helpers ---------------------------------------------------------------------------
    def _normalise_groups(self, root: nn.Module, params: Optional[Iterable[Any]]) -> list[dict[str, Any]]:
        if params is None:
            groups = [{"params": [p for p in root.parameters() if p.requires_grad]}]
        else:
            params = list(params)
            if params and isinstance(params[0], dict):
                groups = [dict(g) for g in params]  # never mutate the caller's dicts
            else:
                groups = [{"params": params}]
        for group in groups:
            tensors = group["params"]
            tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
            tensors = [t[1] if isinstance(t, tuple) else t for t in tensors]
            for t in tensors:
                if id(t) not in self._names:
                    raise ValueError(
                        "AdaFisher: every optimised tensor must be a parameter of the model passed first (its "
                        f"layers are hooked); got a tensor of shape {tuple(t.shape)} that is not"
                    )
            group["params"] = tensors
            group["param_names"] = [self._names[id(t)] for t in tensors]  # state is keyed by these names
        return groups

    def _fisher_of(self, spec: ParamSpec) -> Optional[Fisher]:
        """The functional's description of a parameter's F: views of the live factors, a constant, or None
        (never updated)."""
        if spec is None:
            return None
        if isinstance(spec, ConstantF):
            return spec.value
        s = self._factors.S[spec.layer]
        h = self._factors.H[spec.layer][spec.h_start:spec.h_start + spec.h_len]
        return Kron(s, h, spec.f_shape)

    def _set_collecting(self, active: bool) -> None:
        if self._hooks is not None:
            self._hooks.set_active(active)

    @property
    def is_statistics_step(self) -> bool:
        """Whether the next forward/backward collects statistics (the optimizer's step count % T == 0)."""
        return self._hooks is not None and self._hooks.active

    # -- the step ---------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        # pending statistics belong to the gradients: a step skipped by a GradScaler must not leak them
        if self._factors is not None:
            self._factors.clear_pending()
        super().zero_grad(set_to_none=set_to_none)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    momenta: list[Tensor], fishers: list[Fisher], state_steps: list[int]) -> None:
        """Gather the group's tensors that take a step, creating their state on first use and counting the
        step (host integers: the bias correction never reads a device value)."""
        for p in group["params"]:
            fisher = self._fishers[id(p)]
            if p.grad is None or fisher is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaFisher does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            momenta.append(state["exp_avg"])
            fishers.append(fisher)
            state_steps.append(state["step"])

    def _workspace_size(self) -> int:
        sizes = [fisher_numel(f) for f in self._fishers.values() if isinstance(f, Kron)]
        if not sizes or self.implementation == "compiled":
            return 0  # compiled: only a rare fallback tensor needs one, allocated when it happens
        if self.implementation == "single":
            return max(sizes)
        return max(max(sizes), min(sum(sizes), chunk_elements(self._factors.state.device)))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._factors is not None and self._hooks.active:
            old, new = self._fold
            all_reduce = self.sync_statistics and distributed_world_size() > 1
            self._factors.fold(old, new, self.minmax_eps, all_reduce=all_reduce)
            if not self._coverage_checked:
                self._check_coverage()
        if self._workspace is None and self._factors is not None:
            size = self._workspace_size()
            if size:
                self._workspace = torch.empty(size, dtype=torch.float32, device=self._factors.state.device)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momenta: list[Tensor] = []
            fishers: list[Fisher] = []
            state_steps: list[int] = []
            self._init_group(group, params, grads, momenta, fishers, state_steps)
            adafisher(
                params, grads, momenta, fishers, state_steps,
                foreach=self.implementation == "foreach", compiled=self.implementation == "compiled",
                workspace=self._workspace, lr=group["lr"], beta=group["beta"], weight_decay=group["weight_decay"],
                damping=self.damping, decoupled_weight_decay=self.decoupled_weight_decay,
            )
        self.steps += 1
        self._set_collecting(self.steps % self.update_interval == 0)
        return loss

    def _check_coverage(self) -> None:
        """Once: warn about tracked layers whose parameters got gradients but whose hooks never fired."""
        self._coverage_checked = True
        silent = []
        for index, (name, module) in enumerate(zip(self._factors.names, self._factors.modules)):
            if index in self._hooks.fired:
                continue
            if any(p.grad is not None for p in module.parameters(recurse=False)):
                silent.append(name or "<root>")
        self._hooks.fired.clear()
        if silent:
            initial = "identity factors (F = 1 + damping)" if self.variant == "paper" else "their initial value"
            warnings.warn(
                f"AdaFisher(variant='{self.variant}'): the tracked layer(s) {listing(silent)} received gradients "
                "but their forward hook never ran (parameters used functionally, or called outside forward); "
                f"their factors stay at {initial}.",
                UserWarning,
                stacklevel=3,
            )

    # -- inspection ---------------------------------------------------------------------------------------
    def fisher_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer name: (H, S)}: copies of the diagonal factors F uses (fp32): the running states for
        `default`/`official`, min-max of the raw running averages for `paper`. Empty for `constf`."""
        if self._factors is None:
            return {}
        return {n: (h.clone(), s.clone()) for n, h, s in zip(self._factors.names, self._factors.H, self._factors.S)}

    def preconditioner_stats(self) -> dict[str, Any]:
        """Global and per-layer min/max of F/damping over the tracked layers (one host sync).

        `untracked` reports the F/damping of parameters of unsupported layers (1/damping for F = 1).
        """
        untracked = [p for p, s in ((p, self._specs[id(p)]) for g in self.param_groups for p in g["params"])
                     if isinstance(s, ConstantF)]
        values = {s.value for s in self._specs.values() if isinstance(s, ConstantF)}
        lo, hi = layer_ranges(self._factors, self.damping)
        out: dict[str, Any] = {
            "untracked": {"tensors": len(untracked),
                          "F_over_lambda": (next(iter(values)) / self.damping) if len(values) == 1 else None},
        }
        if lo is None:  # constf: F = damping everywhere
            out["global"] = {"min": 1.0, "max": 1.0}
            out["layers"] = {}
            return out
        both = torch.stack([lo, hi]).tolist()
        out["global"] = {"min": min(both[0]), "max": max(both[1])}
        out["layers"] = {n: {"min": a, "max": b} for n, a, b in zip(self._factors.names, both[0], both[1])}
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state: momentum buffers plus the flat factor buffers (not the F workspace,
        which holds nothing between steps)."""
        total = sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                    if isinstance(t, Tensor))
        return total + (self._factors.nbytes() if self._factors is not None else 0)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise, keyed by parameter and layer names (not positions)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        state = {self._names[id(p)]: {"step": st["step"], "exp_avg": st["exp_avg"]}
                 for p, st in self.state.items() if st}
        return {
            "format": STATE_FORMAT,
            "variant": self.variant,
            "decoupled_weight_decay": self.decoupled_weight_decay,
            "steps": self.steps,
            "update_interval": self.update_interval,
            "param_groups": groups,
            "state": state,
            "factors": self._factors.state_dict() if self._factors is not None else {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()`; the given dict is only read, never modified."""
        fmt = state_dict.get("format")
        if fmt != STATE_FORMAT and self.variant not in _COMPATIBLE_FORMATS.get(fmt, ()):
            if fmt in _COMPATIBLE_FORMATS:
                raise ValueError(
                    f"AdaFisher checkpoint format {fmt!r} predates the paper variant's raw running averages (it "
                    "averaged min-max normalised statistics); it cannot resume variant='paper'. Start the run anew."
                )
            raise ValueError(f"not an AdaFisher state dict (format {fmt!r}, expected {STATE_FORMAT!r})")
        for key, mine in (("variant", self.variant), ("decoupled_weight_decay", self.decoupled_weight_decay)):
            if state_dict[key] != mine:
                raise ValueError(f"AdaFisher checkpoint has {key}={state_dict[key]!r}, this optimizer {mine!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"AdaFisher checkpoint has {len(saved_groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for saved, group in zip(saved_groups, self.param_groups):
            if sorted(saved["param_names"]) != sorted(group["param_names"]):
                missing = sorted(set(group["param_names"]) - set(saved["param_names"]))
                extra = sorted(set(saved["param_names"]) - set(group["param_names"]))
                raise ValueError(
                    "AdaFisher checkpoint parameter names differ from this model's: "
                    f"missing {missing[:10]}, unexpected {extra[:10]}"
                )
        unknown = sorted(set(state_dict["state"]) - set(self._by_name))
        if unknown:
            raise ValueError(f"AdaFisher checkpoint has state for unknown parameters {unknown[:10]}")
        if self._factors is not None:
            self._factors.load_state_dict(state_dict["factors"], self.minmax_eps)
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key not in ("params", "param_names"):
                    group[key] = value
        self.state.clear()
        for name, saved in state_dict["state"].items():
            p = self._by_name[name]
            self.state[p] = {
                "step": int(saved["step"]),
                "exp_avg": saved["exp_avg"].to(device=p.device, dtype=p.dtype, copy=True),
            }
        self.steps = int(state_dict["steps"])
        self._coverage_checked = self.steps > 0
        self._set_collecting(self.steps % self.update_interval == 0)


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay: `p <- p - lr*(m_hat/F + wd*p)` (decay multiplied by lr)."""

    decoupled_weight_decay = True
