"""AdaFisher and AdaFisherW (Gomes et al., ICLR 2025) as one implementation with named variants.

Update per parameter (all variants), with `t` the parameter's own step count:

    m <- beta*m + (1-beta)*(g + wd*p)          # AdaFisher: coupled L2 (AdaFisherW: on the raw g)
    p <- p - lr/(1-beta**t) * m / F            # AdaFisherW also: p <- p - lr*wd*p (decay times lr)
    F  = S (outer) H + damping                 # tracked layers; running diagonal factors

Variants (`shared/spec/optimizers.md` §1):

* ``default``: the official numerics (factor states start at ones, `H <- 0.08 H + 0.008 minmax(H_hat)` for
  gamma 0.8, statistics every `update_interval` steps, BN/LN 2-entry H, F = 1 for parameters of
  unsupported layers) with an explicit parameter->layer map built once from `named_modules()`.
* ``official``: ``default`` plus the official index-loop parameter assignment (never-updated and shuffled
  parameters included), replayed once at construction (`optim.adafisher_official_map`).
* ``paper``: the paper's Eq. (3) convex EMA `H <- gamma H + (1-gamma) minmax(H_hat)`, every parameter
  updated; parameters of unsupported layers get identity factors, `F = 1*1 + damping`.
* ``constf``: F = damping everywhere (no statistics, no hooks): EMA-momentum SGD at step lr/damping.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from optim.adafisher_factors import FactorState, StatisticsHooks, distributed_world_size, layer_ranges
from optim.adafisher_official_map import ModuleF, NeverUpdated, OnesF, official_assignment
from optim.adafisher_stats import fold_coefficients, kind_of, official_kind_of
from optim.registry import unwrap

VARIANTS = ("default", "official", "paper", "constf")
IMPLEMENTATIONS = ("foreach", "compiled")
STATE_FORMAT = "fisherbench.adafisher/1"
_MAX_NAMES = 12  # names listed in one warning


@dataclass(frozen=True)
class Preconditioned:
    """F = S[layer] (outer) H[layer][h_start:h_start+h_len] + damping, viewed as `f_shape`."""

    layer: int
    h_start: int
    h_len: int
    f_shape: tuple[int, ...]


@dataclass(frozen=True)
class ConstantF:
    """F is the constant `value` (untracked parameters, and everything under `constf`)."""

    value: float


ParamSpec = Optional[Union[Preconditioned, ConstantF]]  # None: never updated (official variant only)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f", ... ({len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


# ---------------------------------------------------------------------------------------------------------
# parameter -> layer maps (built once)


@dataclass
class _Plan:
    layers: list[tuple[str, nn.Module, Any]]  # (module name, module, LayerKind), tracked order
    specs: dict[int, ParamSpec]  # id(param) -> spec
    notes: list[str]  # what the user should know (one warning)


def _explicit_plan(root: nn.Module, params: list[Tensor], names: dict[int, str], untracked_f: float,
                   variant: str) -> _Plan:
    """Map each optimised parameter to (layer, role) by module ownership; never by shape."""
    wanted = {id(p) for p in params}
    inside_mha: set[int] = set()
    for module in root.modules():
        if isinstance(module, nn.MultiheadAttention):
            # its projections' parameters are used functionally, the submodules' forward never runs
            inside_mha.update(id(m) for m in module.modules() if m is not module)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in root.named_modules(remove_duplicate=True):
        for role, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                owners.setdefault(id(p), []).append((mod_name, module, role))

    owner_of: dict[int, tuple[str, nn.Module, str, Any]] = {}
    untracked: list[str] = []
    shared: list[str] = []
    for p in params:
        candidates = []
        for mod_name, module, role in owners.get(id(p), []):
            kind = None if id(module) in inside_mha else kind_of(module)
            if kind is not None and role in kind.roles(module):
                candidates.append((mod_name, module, role, kind))
        tracked_names = sorted({c[0] for c in candidates})
        if len(tracked_names) > 1:
            raise ValueError(
                f"AdaFisher: parameter '{names[id(p)]}' is shared by the tracked layers {tracked_names}; one "
                "parameter cannot take two layers' curvature. Untie the weights, or use variant='constf'."
            )
        if not candidates:
            untracked.append(names[id(p)])
            continue
        owner_of[id(p)] = candidates[0]
        if len(owners[id(p)]) > 1:
            others = sorted({o[0] for o in owners[id(p)] if o[0] != candidates[0][0]})
            shared.append(f"'{names[id(p)]}' (F from '{candidates[0][0]}', also used by {others})")

    # layers in model order, whatever the order of the parameter groups
    used = {id(o[1]) for o in owner_of.values()}
    kinds = {id(o[1]): o[3] for o in owner_of.values()}
    layers = [(n, m, kinds[id(m)]) for n, m in root.named_modules() if id(m) in used]
    layer_index = {id(m): i for i, (_, m, _) in enumerate(layers)}
    specs: dict[int, ParamSpec] = {}
    for p in params:
        if id(p) not in owner_of:
            specs[id(p)] = ConstantF(untracked_f)
            continue
        _, module, role, kind = owner_of[id(p)]
        start, length = kind.roles(module)[role]
        specs[id(p)] = Preconditioned(layer_index[id(module)], start, length, tuple(p.shape))

    notes = []
    if untracked:
        what = "a plain momentum step at the raw lr, as the official code" if untracked_f == 1.0 else (
            "identity factors, a step lr*m/(1+damping)")
        notes.append(
            f"{len(untracked)} parameter tensor(s) are not weights/biases of a tracked layer (Linear, Conv2d, "
            f"BatchNorm2d, LayerNorm, called through its forward) and get F = {untracked_f:g} ({what}): "
            f"{_listing(untracked)}"
        )
    if shared:
        notes.append(f"parameters shared between a tracked and an untracked module: {_listing(shared)}")
    if not layers:
        raise ValueError(
            f"AdaFisher(variant='{variant}'): the model has no supported layer (Linear, Conv2d, BatchNorm2d, "
            "LayerNorm) with trainable parameters, so there is no curvature to estimate. Use "
            "variant='constf' (momentum SGD at lr/damping) or another optimizer."
        )
    return _Plan(layers, specs, notes)


def _official_plan(root: nn.Module, params: list[Tensor], names: dict[int, str]) -> _Plan:
    """The official assignment, replayed on `model.parameters()` and the exact-class-name module list."""
    all_params = list(root.parameters())
    tracked = [(n, m) for n, m in root.named_modules() if official_kind_of(m) is not None]
    if not tracked:
        raise ValueError(
            "AdaFisher(variant='official'): the model has no Linear/Conv2d/BatchNorm2d/LayerNorm module (the "
            "official code matches exact class names). Use variant='constf' or another optimizer."
        )
    outcome = official_assignment(all_params, [m for _, m in tracked])
    by_id = {id(p): a for p, a in zip(all_params, outcome)}
    owner = {id(p): n.rsplit(".", 1)[0] if "." in n else "" for n, p in root.named_parameters()}

    referenced = sorted({a.module for a in (by_id[id(p)] for p in params) if isinstance(a, ModuleF)})
    layers = [(tracked[k][0], tracked[k][1], official_kind_of(tracked[k][1])) for k in referenced]
    layer_index = {k: i for i, k in enumerate(referenced)}  # model order
    specs: dict[int, ParamSpec] = {}
    never, ones, foreign = [], [], []
    for p in params:
        assignment = by_id[id(p)]
        if isinstance(assignment, NeverUpdated):
            specs[id(p)] = None
            if p.requires_grad:
                never.append(names[id(p)])
        elif isinstance(assignment, OnesF):
            specs[id(p)] = ConstantF(1.0)
            ones.append(names[id(p)])
        else:
            assert isinstance(assignment, ModuleF)
            mod_name, module = tracked[assignment.module]
            start, length = official_kind_of(module).roles(module)[assignment.slot]
            specs[id(p)] = Preconditioned(layer_index[assignment.module], start, length, assignment.f_shape)
            if owner[id(p)] != mod_name or getattr(module, assignment.slot) is not p:
                foreign.append(f"{names[id(p)]} <- {mod_name or '<root>'}.{assignment.slot}")
    notes = []
    if never:
        count = sum(p.numel() for p in params if specs[id(p)] is None and p.requires_grad)
        notes.append(f"{len(never)} trainable tensor(s) ({count:,} values) are never updated, as in the "
                     f"official code: {_listing(never)}")
    if ones:
        notes.append(f"{len(ones)} tensor(s) get F = 1: {_listing(ones)}")
    if foreign:
        notes.append(f"{len(foreign)} tensor(s) use another layer's F: {_listing(foreign)}")
    return _Plan(layers, specs, notes)


# ---------------------------------------------------------------------------------------------------------
# the optimizer


def _compiled_update():
    """p -= c * m / (S (outer) H + damping) in one fused kernel: F is never materialised."""

    def update(p: Tensor, m: Tensor, s: Tensor, h: Tensor, c: Tensor, damping: Tensor) -> None:
        p.sub_(c * m / (s[:, None] * h[None, :] + damping))

    return torch.compile(update, dynamic=True, fullgraph=True)


class AdaFisher(torch.optim.Optimizer):
    """AdaFisher with coupled L2 weight decay (`g <- g + wd*p`), as the paper's CNN runs.

    Args:
        model: the model (or its DDP wrapper); forward hooks go on its tracked layers.
        lr, beta, weight_decay: per-group hyper-parameters (override them in `params` groups).
        damping: lambda in F = S (outer) H + lambda; must be > 0.
        gamma: factor running-average parameter (0.8: coefficients 0.08/0.008, or 0.8/0.2 for `paper`).
        update_interval: statistics every this many steps (steps 0, T, 2T, ... of the optimizer's counter).
        variant: "default" | "official" | "paper" | "constf" (see the module docstring).
        params: optional parameter groups (dicts with "params" and per-group "lr"/"weight_decay"/"beta");
            default: every trainable parameter of the model.
        minmax_eps: relative epsilon of the scale-free min-max normalisation.
        implementation: "foreach" (eager: foreach momentum/decay, then F for one tensor at a time in a reused
            workspace) or "compiled" (a torch.compile kernel computes m / (S (outer) H + damping) inline, F never
            materialised; tens of seconds of compilation on first use).
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

        root = unwrap(model)
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
            plan = _Plan([], {id(p): ConstantF(self.damping) for p in optimised}, [])
        elif variant == "official":
            plan = _official_plan(root, optimised, self._names)
        else:
            plan = _explicit_plan(root, optimised, self._names, 1.0 if variant == "default" else
                                  1.0 + self.damping, variant)
        self._specs = plan.specs
        self.layer_names = [name for name, _, _ in plan.layers]
        if plan.notes:
            warnings.warn(f"AdaFisher(variant='{variant}'): " + "; ".join(plan.notes), UserWarning, stacklevel=2)
        device = optimised[0].device if optimised else torch.device("cpu")
        self._factors: Optional[FactorState] = FactorState(plan.layers, device) if plan.layers else None
        self._hooks = StatisticsHooks(self._factors) if self._factors is not None else None
        self._fold = fold_coefficients(variant, self.gamma)
        self._coverage_checked = False
        self._damping_tensors: dict[torch.device, Tensor] = {}
        self._workspace: dict[torch.device, Tensor] = {}
        self._compiled: Optional[Callable] = None
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

    def _set_collecting(self, active: bool) -> None:
        if self._hooks is not None:
            self._hooks.set_active(active)

    @property
    def is_statistics_step(self) -> bool:
        """Whether the next forward/backward collects statistics (the optimizer's step count % T == 0)."""
        return self._hooks is not None and self._hooks.active

    def _damping_on(self, device: torch.device) -> Tensor:
        t = self._damping_tensors.get(device)
        if t is None:
            t = self._damping_tensors[device] = torch.tensor(self.damping, dtype=torch.float32, device=device)
        return t

    # -- the step ---------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        # pending statistics belong to the gradients: a step skipped by a GradScaler must not leak them
        if self._factors is not None:
            self._factors.clear_pending()
        super().zero_grad(set_to_none=set_to_none)

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
        for group in self.param_groups:
            self._update_group(group)
        self.steps += 1
        self._set_collecting(self.steps % self.update_interval == 0)
        return loss

    def _update_group(self, group: dict[str, Any]) -> None:
        lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
        params, grads, avgs, corrections = [], [], [], []
        for p in group["params"]:
            spec = self._specs[id(p)]
            if p.grad is None or spec is None:
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
            avgs.append(state["exp_avg"])
            corrections.append(lr / (1.0 - beta ** state["step"]))
        if not params:
            return
        torch._foreach_lerp_(avgs, grads, 1.0 - beta)
        if wd != 0:
            if self.decoupled_weight_decay:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            else:
                torch._foreach_add_(avgs, params, alpha=(1.0 - beta) * wd)

        constant: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for p, m, c in zip(params, avgs, corrections):
            spec = self._specs[id(p)]
            if isinstance(spec, ConstantF):
                ps, ms = constant.setdefault(-c / spec.value, ([], []))
                ps.append(p)
                ms.append(m)
            elif self.implementation == "compiled" and spec.f_shape == tuple(p.shape):
                self._compiled_step(p, m, spec, c)
            else:
                p.addcdiv_(m, self._preconditioner(spec), value=-c)
        for alpha, (ps, ms) in constant.items():
            torch._foreach_add_(ps, ms, alpha=alpha)

    def _factor_views(self, spec: Preconditioned) -> tuple[Tensor, Tensor]:
        s = self._factors.S[spec.layer]
        h = self._factors.H[spec.layer][spec.h_start:spec.h_start + spec.h_len]
        return s, h

    def _preconditioner(self, spec: Preconditioned) -> Tensor:
        """F = S (outer) H + damping for one tensor, written into a reused workspace (never kept as state).

        One workspace the size of the largest tracked tensor is reused by every tensor of the step: a
        fresh F per tensor costs a page-faulting allocation of the whole model's size every step on CPU.
        """
        s, h = self._factor_views(spec)
        workspace = self._workspace.get(s.device)
        if workspace is None:
            size = max(math.prod(sp.f_shape) for sp in self._specs.values() if isinstance(sp, Preconditioned))
            workspace = self._workspace[s.device] = torch.empty(size, dtype=torch.float32, device=s.device)
        out = workspace[: s.numel() * h.numel()].view(s.numel(), h.numel())
        return torch.addr(self._damping_on(s.device), s, h, out=out).view(spec.f_shape)

    def _compiled_step(self, p: Tensor, m: Tensor, spec: Preconditioned, c: float) -> None:
        if self._compiled is None:
            self._compiled = _compiled_update()
        s, h = self._factor_views(spec)
        rows = s.numel()
        c_t = torch.full((), c, dtype=torch.float32, device=p.device)
        self._compiled(p.view(rows, -1), m.view(rows, -1), s, h, c_t, self._damping_on(p.device))

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
            warnings.warn(
                f"AdaFisher(variant='{self.variant}'): the tracked layer(s) {_listing(silent)} received gradients "
                "but their forward hook never ran (parameters used functionally, or called outside forward); "
                "their factors stay at their initial value.",
                UserWarning,
                stacklevel=3,
            )

    # -- inspection ---------------------------------------------------------------------------------------
    def fisher_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer name: (H, S)}: copies of the running diagonal factors (fp32). Empty for `constf`."""
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
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not an AdaFisher state dict (format {state_dict.get('format')!r}, expected {STATE_FORMAT!r})"
            )
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
            self._factors.load_state_dict(state_dict["factors"])
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
