"""SGD with bias-corrected EMA momentum: the update of AdaFisher's `constf` variant (F ≡ λ) without AdaFisher.

Per parameter, with momentum m (starts at 0), step counter t and weight decay wd:

1. ``m ← β·m + (1 − β)·(g + wd·θ)``              (EMA momentum, coupled L2 weight decay)
2. ``θ ← θ − lr · m / (1 − β^t)``                 (Adam-style bias correction of the first moment)

With ``decoupled_weight_decay=True`` the decay leaves the gradient and the step becomes
``θ ← θ·(1 − lr·wd) − lr · m / (1 − β^t)`` (decay multiplied by lr, as AdamW and AdaFisherW).

AdaFisher with F ≡ λ (`variant=constf`) takes exactly this step at ``lr = lr_AdaFisher / λ``, from its first
step (AdaFisherW: decoupled, with ``wd = λ · wd_AdaFisherW`` so that ``lr·wd`` is the same). Torch's SGD
(dampening 0) keeps ``b = m / (1 − β)``, so this optimizer at lr equals `torch.optim.SGD` at ``lr·(1 − β)``
once ``β^t`` is negligible; its first step is ``1 / (1 − β)`` times larger (10× for β = 0.9).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim import Optimizer


class SGDBiasCorrected(Optimizer):
    """Momentum SGD whose EMA momentum is divided by ``1 − β^t`` (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"SGDBiasCorrected: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGDBiasCorrected: momentum must be in [0, 1) (1 − β^t divides), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"SGDBiasCorrected: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      decoupled_weight_decay=bool(decoupled_weight_decay)))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device/dtype; the bias correction needs one step count
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGDBiasCorrected does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets[(p.device, p.dtype, state["step"])].append(p)
            for (_, _, step), params in buckets.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], step: int) -> None:
        beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1.0 - beta)
        if wd != 0.0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            else:
                torch._foreach_add_(bufs, params, alpha=(1.0 - beta) * wd)
        torch._foreach_add_(params, bufs, alpha=-lr / (1.0 - beta**step))
