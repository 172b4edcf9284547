"""Sign-SGD with momentum ("Signum", Bernstein et al. 2018), written the way torch.optim writes optimizers.

    m_t = beta * m_{t-1} + (1 - beta) * (g_t + weight_decay * p)      (beta = 0: plain sign-SGD)
    p   = p - lr * sign(m_t)

`foreach=True` (the default on every device) updates all parameters of a group with a handful of
multi-tensor kernels (`torch._foreach_*`) instead of a Python loop over parameters; `foreach=False` is the
reference loop the test compares it with. Nothing in `step` reads a tensor back to the host (no `.item()`),
so on a GPU the loop never waits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 foreach: Optional[bool] = None) -> None:
        if lr <= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach))

    def _init_group(self, group: dict, params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SignSGD does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = True  # the multi-tensor path works on every device
            fn = _multi_tensor_signsgd if foreach else _single_tensor_signsgd
            fn(params, grads, bufs, lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
        return loss


def _single_tensor_signsgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float,
                           momentum: float, weight_decay: float) -> None:
    for p, g, m in zip(params, grads, bufs):
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        m.mul_(momentum).add_(g, alpha=1 - momentum)
        p.add_(m.sign(), alpha=-lr)


def _multi_tensor_signsgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float,
                          momentum: float, weight_decay: float) -> None:
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads, alpha=1 - momentum)
    torch._foreach_add_(params, torch._foreach_sign(bufs), alpha=-lr)
