"""Which curvature each optimised parameter takes: the parameter -> layer map, built once at construction.

`explicit_plan` maps by module ownership (variants `default` and `paper`); `official_plan` replays the
official code's index-loop assignment (variant `official`, see `official_map.py`). Both return a `Plan`:
the tracked layers in model order, a `ParamSpec` per parameter and the notes the user is warned about.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import Tensor, nn

from .official_map import ModuleF, NeverUpdated, OnesF, official_assignment
from .stats import kind_of, official_kind_of

MAX_NAMES = 12  # names listed in one warning


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


def listing(names: list[str]) -> str:
    """At most MAX_NAMES names, then how many more: one warning stays readable on a large model."""
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f", ... ({len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


# ---------------------------------------------------------------------------------------------------------
# parameter -> layer maps (built once)


@dataclass
class Plan:
    """The parameter -> layer map of one optimizer."""

    layers: list[tuple[str, nn.Module, Any]]  # (module name, module, LayerKind), tracked order
    specs: dict[int, ParamSpec]  # id(param) -> spec
    notes: list[str]  # what the user should know (one warning)


def explicit_plan(root: nn.Module, params: list[Tensor], names: dict[int, str], untracked_f: float,
                  variant: str) -> Plan:
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
            f"{listing(untracked)}"
        )
    if shared:
        notes.append(f"parameters shared between a tracked and an untracked module: {listing(shared)}")
    if not layers:
        raise ValueError(
            f"AdaFisher(variant='{variant}'): the model has no supported layer (Linear, Conv2d, BatchNorm2d, "
            "LayerNorm) with trainable parameters, so there is no curvature to estimate. Use "
            "variant='constf' (momentum SGD at lr/damping) or another optimizer."
        )
    return Plan(layers, specs, notes)


def official_plan(root: nn.Module, params: list[Tensor], names: dict[int, str]) -> Plan:
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
                     f"official code: {listing(never)}")
    if ones:
        notes.append(f"{len(ones)} tensor(s) get F = 1: {listing(ones)}")
    if foreign:
        notes.append(f"{len(foreign)} tensor(s) use another layer's F: {listing(foreign)}")
    return Plan(layers, specs, notes)
