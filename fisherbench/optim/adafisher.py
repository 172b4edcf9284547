"""AdaFisher and AdaFisherW (Gomes et al., ICLR 2025) as one implementation with named variants.

Update per parameter (all variants), with `t` the parameter's own step count:

    m <- beta*m + (1-beta)*(g + wd*p)          # AdaFisher: coupled L2 (AdaFisherW: on the raw g)
    p <- p - lr/(1-beta**t) * m / F            # AdaFisherW also: p <- p - lr*wd*p (decay times lr)
    F  = S (outer) H + damping                 # tracked layers; running diagonal factors

Variants (docs/adafisher.md has the equations, with the paper's equation numbers):

* ``default``: the official numerics (factor states start at ones, `H <- 0.08 H + 0.008 minmax(H_hat)` for
  gamma 0.8, statistics every `update_interval` steps, BN/LN 2-entry H, F = 1 for parameters of
  unsupported layers) with an explicit parameter->layer map built once from `named_modules()`.
* ``official``: ``default`` plus the official index-loop parameter assignment (never-updated and shuffled
  parameters included), replayed once at construction (`optim.adafisher_official_map`).
* ``paper``: the paper's order: Eq. (3) convex running average of the raw diagonals
  `H <- gamma H + (1-gamma) H_hat` (from the first statistic), Eq. (4) min-max of the averaged diagonals
  when F is formed, every parameter updated; identity factors (`F = 1*1 + damping`) for parameters of
  unsupported layers and for a layer before its first statistics.
* ``constf``: F = damping everywhere (no statistics, no hooks): EMA-momentum SGD at step lr/damping.

Structure (as `torch.optim.Adam`): `AdaFisher.step()` folds pending statistics, gathers each group's tensor
lists in `_init_group` (lazy state set-up lives there) and calls the functional `adafisher()`, which
dispatches to `_single_tensor_adafisher` (a loop over tensors), `_multi_tensor_adafisher` (grouped
`torch._foreach_*` kernels, F formed for many tensors at once in a reused workspace) or
`_compiled_adafisher` (one fused `torch.compile` kernel per tracked tensor, F never materialised).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from fisherbench.optim.adafisher_factors import FactorState, StatisticsHooks, distributed_world_size, layer_ranges
from fisherbench.optim.adafisher_official_map import ModuleF, NeverUpdated, OnesF, official_assignment
from fisherbench.optim.adafisher_stats import fold_coefficients, kind_of, official_kind_of

VARIANTS = ("default", "official", "paper", "constf")
IMPLEMENTATIONS = ("foreach", "single", "compiled")
STATE_FORMAT = "fisherbench.adafisher/2"
# format 1 (before the paper variant kept raw running averages) has the same layout for the other variants
_COMPATIBLE_FORMATS = {"fisherbench.adafisher/1": ("default", "official", "constf")}
_MAX_NAMES = 12  # names listed in one warning
# F workspace of the foreach implementation, in fp32 elements, never smaller than the largest tracked tensor.
# On accelerators (16 MiB) a chunk holds many tensors, so the per-call overhead of the grouped kernels is
# amortised, and it stays small next to any model's state. On CPU (1 MiB) a chunk's F stays in cache between
# the fill, the addcmul and the addcdiv that read it back (measured on ResNet-18, one thread: the ordinary
# step takes ~20% less time than with 16 MiB chunks)
_CHUNK_ELEMENTS = 1 << 22
_CHUNK_ELEMENTS_CPU = 1 << 18


def _chunk_elements(device: torch.device) -> int:
    return _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS


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
# the functional form: one update rule, three implementations


class Kron(NamedTuple):
    """F = outer(s, h) + damping, viewed as `shape` (the parameter's shape, or one that broadcasts to it).

    `s` and `h` are views of the running factors (fp32), so a `Kron` built once always sees current values.
    """

    s: Tensor
    h: Tensor
    shape: tuple[int, ...]


Fisher = Union[Kron, float]  # a float: a constant F (untracked parameters, variant constf)


def adafisher(
    params: list[Tensor],
    grads: list[Tensor],
    momenta: list[Tensor],
    fishers: list[Fisher],
    state_steps: list[int],
    *,
    foreach: Optional[bool] = None,
    compiled: bool = False,
    workspace: Optional[Tensor] = None,
    lr: float,
    beta: float,
    weight_decay: float,
    damping: float,
    decoupled_weight_decay: bool = False,
) -> None:
    """Functional AdaFisher/AdaFisherW update (see `AdaFisher`), in place on `params` and `momenta`.

    For each tensor, with `t = state_steps[i]` its step count *including* this step (host integers, so the
    step never reads a device value):

        m <- beta*m + (1-beta)*(g + wd*p)                  (decoupled: m <- beta*m + (1-beta)*g; p <- (1-lr*wd)*p)
        p <- p - lr/(1-beta**t) * m / F,   F = outer(s, h) + damping   (or the constant `fishers[i]`)

    `foreach` (default True) picks `_multi_tensor_adafisher` over `_single_tensor_adafisher`; `compiled`
    picks `_compiled_adafisher`. `workspace`: a reusable fp32 buffer on the factors' device for F (the eager
    implementations form F there; foreach processes tensors in chunks that fit it); allocated per call if None.
    """
    if compiled and foreach:
        raise ValueError("adafisher: choose foreach or compiled, not both")
    if compiled:
        func = _compiled_adafisher
    elif foreach is None or foreach:
        func = _multi_tensor_adafisher
    else:
        func = _single_tensor_adafisher
    func(params, grads, momenta, fishers, state_steps, workspace=workspace, lr=lr, beta=beta,
         weight_decay=weight_decay, damping=damping, decoupled_weight_decay=decoupled_weight_decay)


def _fisher_numel(f: Kron) -> int:
    return f.s.numel() * f.h.numel()


def _workspace_for(workspace: Optional[Tensor], fishers: list[Fisher], need: int) -> Tensor:
    if workspace is not None and workspace.numel() >= need:
        return workspace
    device = next(f.s.device for f in fishers if isinstance(f, Kron))
    return torch.empty(need, dtype=torch.float32, device=device)


def _single_tensor_adafisher(
    params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], fishers: list[Fisher],
    state_steps: list[int], *, workspace: Optional[Tensor], lr: float, beta: float, weight_decay: float,
    damping: float, decoupled_weight_decay: bool,
) -> None:
    """One tensor at a time; F of a tracked tensor is formed in the workspace just before its update."""
    largest = max((_fisher_numel(f) for f in fishers if isinstance(f, Kron)), default=0)
    if largest:
        workspace = _workspace_for(workspace, fishers, largest)
    for p, g, m, f, t in zip(params, grads, momenta, fishers, state_steps):
        m.lerp_(g, 1.0 - beta)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            else:
                m.add_(p, alpha=(1.0 - beta) * weight_decay)
        c = lr / (1.0 - beta**t)
        if isinstance(f, Kron):
            rows, cols = f.s.numel(), f.h.numel()
            fisher = workspace[: rows * cols].view(rows, cols).fill_(damping)
            fisher.addcmul_(f.s[:, None], f.h[None, :])  # the same kernels as the grouped form below
            p.addcdiv_(m, fisher.view(f.shape), value=-c)
        else:
            p.add_(m, alpha=-c / f)


def _group_by_device_and_dtype(params: list[Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by (device, dtype): a grouped kernel's tensors must agree on both."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())


def _multi_tensor_adafisher(
    params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], fishers: list[Fisher],
    state_steps: list[int], *, workspace: Optional[Tensor], lr: float, beta: float, weight_decay: float,
    damping: float, decoupled_weight_decay: bool,
) -> None:
    """Grouped kernels. Tracked tensors go chunk by chunk of the workspace: for all tensors of a chunk, the
    momentum and decay (`_foreach_lerp_`, `_foreach_add_`/`_foreach_mul_`), F (one fill, one
    `_foreach_addcmul_`) and the update (one `_foreach_addcdiv_` with per-tensor step sizes), so that a chunk's
    tensors are still in cache from one kernel to the next. Constant-F tensors: momentum and decay at once,
    then one `_foreach_add_` per step size."""
    if not params:
        return
    kron = [i for i, f in enumerate(fishers) if isinstance(f, Kron)]
    chunk_elements = 0
    if kron:
        sizes = [_fisher_numel(fishers[i]) for i in kron]
        chunk_elements = _chunk_elements(fishers[kron[0]].s.device)
        workspace = _workspace_for(workspace, fishers, max(max(sizes), min(sum(sizes), chunk_elements)))
    hyper = (lr, beta, weight_decay, decoupled_weight_decay)
    for indices in _group_by_device_and_dtype(params):
        constant = [i for i in indices if not isinstance(fishers[i], Kron)]
        if constant:
            _momentum_and_decay(constant, params, grads, momenta, *hyper)
            by_alpha: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
            for i in constant:
                c = lr / (1.0 - beta ** state_steps[i])
                ps_c, ms_c = by_alpha.setdefault(-c / fishers[i], ([], []))
                ps_c.append(params[i])
                ms_c.append(momenta[i])
            for alpha, (ps_c, ms_c) in by_alpha.items():
                torch._foreach_add_(ps_c, ms_c, alpha=alpha)

        chunk: list[tuple[int, int]] = []  # (index, offset in the workspace)
        used = 0
        for i in indices:
            f = fishers[i]
            if not isinstance(f, Kron):
                continue
            size = _fisher_numel(f)
            if chunk and used + size > min(workspace.numel(), max(chunk_elements, size)):
                _kron_chunk(chunk, used, workspace, params, grads, momenta, fishers, state_steps, hyper, damping)
                chunk, used = [], 0
            chunk.append((i, used))
            used += size
        if chunk:
            _kron_chunk(chunk, used, workspace, params, grads, momenta, fishers, state_steps, hyper, damping)


def _momentum_and_decay(indices: list[int], params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                        lr: float, beta: float, weight_decay: float, decoupled_weight_decay: bool) -> None:
    ps = [params[i] for i in indices]
    ms = [momenta[i] for i in indices]
    torch._foreach_lerp_(ms, [grads[i] for i in indices], 1.0 - beta)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        else:
            torch._foreach_add_(ms, ps, alpha=(1.0 - beta) * weight_decay)


def _kron_chunk(chunk: list[tuple[int, int]], used: int, workspace: Tensor, params: list[Tensor],
                grads: list[Tensor], momenta: list[Tensor], fishers: list[Fisher], state_steps: list[int],
                hyper: tuple[float, float, float, bool], damping: float) -> None:
    lr, beta = hyper[0], hyper[1]
    _momentum_and_decay([i for i, _ in chunk], params, grads, momenta, *hyper)
    workspace[:used].fill_(damping)
    views = [workspace[o:o + _fisher_numel(fishers[i])].view(fishers[i].s.numel(), -1) for i, o in chunk]
    torch._foreach_addcmul_(views, [fishers[i].s[:, None] for i, _ in chunk],
                            [fishers[i].h[None, :] for i, _ in chunk])
    # F shaped like its parameter keeps the grouped fast path; a broadcasting F (variant official only) goes
    # in its own call
    same: tuple[list[Tensor], list[Tensor], list[Tensor], list[float]] = ([], [], [], [])
    broadcast: tuple[list[Tensor], list[Tensor], list[Tensor], list[float]] = ([], [], [], [])
    for (i, _), view in zip(chunk, views):
        p, f = params[i], fishers[i]
        target = same if tuple(p.shape) == tuple(f.shape) else broadcast
        target[0].append(p)
        target[1].append(momenta[i])
        target[2].append(view.view(f.shape))
        target[3].append(-lr / (1.0 - beta ** state_steps[i]))
    for ps, ms, fs, scalars in (same, broadcast):
        if ps:
            torch._foreach_addcdiv_(ps, ms, fs, scalars)


def _fused_kron_update(p: Tensor, g: Tensor, m: Tensor, s: Tensor, h: Tensor, c: Tensor, damping: Tensor,
                       one_minus_beta: Tensor, coupled: Tensor, decay: Tensor) -> None:
    """The whole update of one (rows, cols) tensor in one pass; F = s h^T + damping is never stored.
    `coupled` = (1-beta)*wd (0 for decoupled decay), `decay` = 1 - lr*wd (1 for coupled): always tensors, so
    that one graph serves every configuration and a learning-rate schedule never recompiles."""
    m.lerp_(g, one_minus_beta)
    m.add_(p * coupled)
    p.mul_(decay)
    p.sub_(c * m / (s[:, None] * h[None, :] + damping))


_COMPILED_KERNEL: Optional[Callable[..., None]] = None


def _compiled_kernel() -> Callable[..., None]:
    global _COMPILED_KERNEL
    if _COMPILED_KERNEL is None:  # one compiled function per process, shared by every optimizer
        _COMPILED_KERNEL = torch.compile(_fused_kron_update, dynamic=True, fullgraph=True)
    return _COMPILED_KERNEL


def _compiled_adafisher(
    params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], fishers: list[Fisher],
    state_steps: list[int], *, workspace: Optional[Tensor], lr: float, beta: float, weight_decay: float,
    damping: float, decoupled_weight_decay: bool,
) -> None:
    """Tracked tensors whose F has their shape (all of them outside variant official) and which are
    contiguous: one fused compiled kernel each (tens of seconds of compilation on first use). The rest
    (constant F, a broadcasting F, non-contiguous memory) go through `_single_tensor_adafisher`."""
    kernel = _compiled_kernel()
    rest: list[int] = []
    scalars: dict[Any, Tensor] = {}

    def scalar(value: float, device: torch.device) -> Tensor:
        key = (value, device)
        if key not in scalars:  # a fill kernel, no host-to-device copy
            scalars[key] = torch.full((), value, dtype=torch.float32, device=device)
        return scalars[key]

    coupled = 0.0 if decoupled_weight_decay else (1.0 - beta) * weight_decay
    decay = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
    for i, (p, g, m, f, t) in enumerate(zip(params, grads, momenta, fishers, state_steps)):
        fusable = (isinstance(f, Kron) and tuple(p.shape) == tuple(f.shape)
                   and p.is_contiguous() and g.is_contiguous() and m.is_contiguous())
        if not fusable:
            rest.append(i)
            continue
        rows, dev = f.s.numel(), p.device
        kernel(p.view(rows, -1), g.view(rows, -1), m.view(rows, -1), f.s, f.h,
               scalar(lr / (1.0 - beta**t), dev), scalar(damping, dev), scalar(1.0 - beta, dev),
               scalar(coupled, dev), scalar(decay, dev))
    if rest:
        _single_tensor_adafisher(
            [params[i] for i in rest], [grads[i] for i in rest], [momenta[i] for i in rest],
            [fishers[i] for i in rest], [state_steps[i] for i in rest], workspace=workspace, lr=lr, beta=beta,
            weight_decay=weight_decay, damping=damping, decoupled_weight_decay=decoupled_weight_decay)


# ---------------------------------------------------------------------------------------------------------
# the optimizer


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
        sizes = [_fisher_numel(f) for f in self._fishers.values() if isinstance(f, Kron)]
        if not sizes or self.implementation == "compiled":
            return 0  # compiled: only a rare fallback tensor needs one, allocated when it happens
        if self.implementation == "single":
            return max(sizes)
        return max(max(sizes), min(sum(sizes), _chunk_elements(self._factors.state.device)))

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
                f"AdaFisher(variant='{self.variant}'): the tracked layer(s) {_listing(silent)} received gradients "
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
