"""The parameter -> preconditioner assignment that the official AdaFisher `step()` produces.

The official code keeps no parameter->layer map. Each step it walks `model.parameters()` and the list of
tracked modules with two indices in a loop that runs exactly `len(modules)` times (official
`optimizers/AdaFisher.py`, `step`, L630-682; docs/adafisher.md, "Parameters -> layers"):

1. a parameter without a gradient is skipped; the module index advances if the *next* parameter is a
   matrix, otherwise every second such vector parameter advances it;
2. a parameter whose shape equals the current module's weight or bias shape gets that module's F (weight
   F, and the bias F for the following parameter when the module has a bias); the module index advances;
3. any other parameter gets F = 1 (a plain momentum step at the raw lr); the module index stays.

Every case-1/case-3 iteration drops one module off the end, so trailing parameters are never updated, and
shape matching can hand a layer's F to another layer's parameter (broadcast where shapes differ).

`official_assignment` replays that loop once, on the `requires_grad` pattern (a parameter has a gradient
iff it requires one), and returns the outcome per parameter. It never runs during `step()`. Where the
official loop would raise (index past the end, a module without weight, a stepped parameter without
gradient, an F that does not broadcast), `OfficialLoopError` says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn


class OfficialLoopError(ValueError):
    """The official AdaFisher step() would crash on this model; variant='official' cannot reproduce it."""


@dataclass(frozen=True)
class ModuleF:
    """The parameter is updated with module `module`'s weight or bias F (shape `f_shape`, broadcast)."""

    module: int
    slot: str  # "weight" | "bias"
    f_shape: tuple[int, ...]


@dataclass(frozen=True)
class OnesF:
    """The parameter is updated with F = 1."""


@dataclass(frozen=True)
class NeverUpdated:
    """The official loop never reaches (or always skips) the parameter."""


Assignment = Union[ModuleF, OnesF, NeverUpdated]


def _error(message: str) -> OfficialLoopError:
    return OfficialLoopError(
        f"AdaFisher(variant='official'): the official step() would fail on this model: {message}. "
        "Use variant='default' (explicit parameter->layer map)."
    )


def official_assignment(
    params: Sequence[torch.Tensor],
    modules: Sequence[nn.Module],
    has_grad: Optional[Sequence[bool]] = None,
) -> list[Assignment]:
    """Replay the official index loop. `params` in `model.parameters()` order, `modules` the tracked modules
    in `model.modules()` order; `has_grad[i]` defaults to `params[i].requires_grad`."""
    grads = [p.requires_grad for p in params] if has_grad is None else list(has_grad)
    out: list[Assignment] = [NeverUpdated() for _ in params]
    n = len(params)

    def param_at(i: int) -> torch.Tensor:
        if i >= n:
            raise _error(f"it indexes parameter {i} but the model has only {n}")
        return params[i]

    def module_at(k: int) -> nn.Module:
        if k >= len(modules):
            raise _error(f"it indexes tracked module {k} but only {len(modules)} exist")
        return modules[k]

    def apply(i: int, assignment: Assignment, f_shape: Optional[tuple[int, ...]] = None) -> None:
        p = param_at(i)
        if not grads[i]:
            raise _error(f"it steps parameter {i} (shape {tuple(p.shape)}), which has no gradient")
        if f_shape is not None and torch.broadcast_shapes(tuple(p.shape), f_shape) != tuple(p.shape):
            raise _error(f"an F of shape {f_shape} cannot update parameter {i} of shape {tuple(p.shape)}")
        out[i] = assignment

    ip = im = vector_skips = 0
    for _ in range(len(modules)):
        param_at(ip)
        if not grads[ip]:
            ip += 1
            if param_at(ip).ndim > 1:
                im += 1
            else:
                vector_skips += 1
            if vector_skips == 2:
                im += 1
                vector_skips = 0
            continue
        module = module_at(im)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is None:
            raise _error(f"tracked module {im} ({type(module).__name__}) has no weight")
        shape = tuple(param_at(ip).shape)
        if shape == tuple(weight.shape) or (bias is not None and shape == tuple(bias.shape)):
            if (not weight.requires_grad) or (bias is not None and not bias.requires_grad):
                raise _error(f"tracked module {im} ({type(module).__name__}) has a parameter without gradient")
            apply(ip, ModuleF(im, "weight", tuple(weight.shape)), tuple(weight.shape))
            ip += 1
            if bias is not None:
                apply(ip, ModuleF(im, "bias", tuple(bias.shape)), tuple(bias.shape))
                ip += 1
            im += 1
        else:
            apply(ip, OnesF())
            ip += 1
    return out
