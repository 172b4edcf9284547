"""FAdam (Hwang 2024, arXiv 2405.12807): Adam as natural gradient with the diagonal empirical Fisher.

Per parameter tensor, with Fisher diagonal ``f`` and momentum ``m`` (both start at 0), at step t:

1. ``β̂2 = β2·(1 − β2^(t−1)) / (1 − β2^t)``;  ``f ← β̂2·f + (1 − β̂2)·g²``   (so f = g² at t = 1)
2. ``ε_t = ε·min(1, RMS(g))``;  natural gradient ``ḡ = g / (f^p + ε_t)``
3. ``ḡ ← ḡ / max(1, RMS(ḡ)/c)``                                          (RMS clipping, per tensor)
4. ``m ← β1·m + (1 − β1)·ḡ``
5. ``w = θ / (f^p + ε_t)``, clipped like ḡ                                 (natural gradient of the decay)
6. ``θ ← θ − lr·(m + λ·w)``

RMS is the per-tensor root mean square. The whole step is foreach (`torch._foreach_*`); per-tensor
scalars (RMS, ε_t, clip divisors) stay on the device as 0-d tensors, so there is no host sync.

Differences from `pytorch_optimizer.FAdam` (4.1.0), found by reading its source and by the tests in
`tests/optim/test_fadam.py`:

* Adaptive ε. pytorch_optimizer adds ``min(eps, eps_2·RMS(g))^(2p)`` with a separate ``eps_2 = 0.01``;
  the paper adds ``ε·min(1, RMS(g))`` (i.e. ``eps_2 = eps``) and does not raise it to 2p. With
  its defaults pytorch_optimizer's ε_t is 1e-8 whenever RMS(g) ≥ 1e-6, where ours is 1e-8·RMS(g).
  The two agree exactly when ``eps_2 = eps`` and ``p = 0.5``.
* Step counter. pytorch_optimizer counts steps per parameter *group*; we count per *parameter*
  (like `torch.optim`), so a parameter whose first gradient arrives late still gets ``β̂2 = 0`` on its
  own first step. Identical whenever every parameter receives a gradient on every step.
* RMS(g) = 0 (a tensor whose whole gradient is zero). The equations give ε_t = 0 and 0/0 where f = 0.
  Both implementations fall back to ε_t = ε for such a tensor (ours: a documented guard, not in the paper).

Entries whose gradient is always zero (a dead input feature, an unused embedding row) take nearly all of
their tensor's weight decay, in both implementations, because the equations say so: there f = 0, so
``w = θ / ε_t`` is ~1/ε_t times larger than anywhere else and dominates RMS(w); after the RMS clip the
dead entries share RMS(w) = c among themselves, and each shrinks by the same factor
``1 − lr·λ·c·√N / ‖θ_dead‖`` per step (N entries in the tensor) while the live entries' decay all but
vanishes. In `tests/optim/test_fadam.py` (Linear(12, 4), one dead input, lr 1e-2, λ 0.1) the dead column shrinks
10.6% in 5 steps, 21× the nominal ``1 − (1 − lr·λ)^5``, pinned against a brute-force run of the equations.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim import Optimizer


class FAdam(Optimizer):
    """Fisher Adam. Defaults follow the paper: β=(0.9, 0.999), ε=1e-8, clip=1, p=0.5, weight_decay=0.1."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float = 1.0,
        p: float = 0.5,
        weight_decay: float = 0.1,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"FAdam: lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FAdam: betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"FAdam: eps must be >= 0, got {eps}")
        if not clip > 0:
            raise ValueError(f"FAdam: clip must be > 0, got {clip}")
        if not p > 0:
            raise ValueError(f"FAdam: p (Fisher exponent) must be > 0, got {p}")
        if not weight_decay >= 0:
            raise ValueError(f"FAdam: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, clip=clip, p=p, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # bucket by (device, dtype, step): foreach kernels need one device/dtype, β̂2 needs one step
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["fisher"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets[(p.device, p.dtype, state["step"])].append(p)
            for (_, _, step), params in buckets.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], step: int) -> None:
        beta1, beta2 = group["betas"]
        eps, clip, power, lr, wd = group["eps"], group["clip"], group["p"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        fisher = [self.state[p]["fisher"] for p in params]
        momentum = [self.state[p]["momentum"] for p in params]
        inv_sqrt_numel = [1.0 / math.sqrt(p.numel()) for p in params]

        # 1. Fisher EMA with the bias-corrected decay (β̂2 = 0 at step 1, so f = g² there)
        beta2_hat = beta2 * (1.0 - beta2 ** (step - 1)) / (1.0 - beta2**step)
        torch._foreach_mul_(fisher, beta2_hat)
        torch._foreach_addcmul_(fisher, grads, grads, value=1.0 - beta2_hat)

        # 2. adaptive epsilon and the natural gradient
        rms_g = self._rms(grads, inv_sqrt_numel)
        eps_t = eps * torch.where(rms_g > 0, rms_g.clamp(max=1.0), torch.ones_like(rms_g))
        denom = torch._foreach_sqrt(fisher) if power == 0.5 else torch._foreach_pow(fisher, power)
        torch._foreach_add_(denom, eps_t.unbind(0))
        natural = torch._foreach_div(grads, denom)

        # 3.-4. RMS clipping, then momentum on the clipped natural gradient
        self._clip_rms_(natural, inv_sqrt_numel, clip)
        torch._foreach_lerp_(momentum, natural, 1.0 - beta1)

        # 5.-6. natural gradient of the weight decay (from θ before this step), clipped the same way
        del natural  # folded into m; frees its memory before the decay term is allocated
        if wd != 0.0:
            decay = torch._foreach_div(params, denom)
            self._clip_rms_(decay, inv_sqrt_numel, clip)
            torch._foreach_add_(params, decay, alpha=-lr * wd)
        torch._foreach_add_(params, momentum, alpha=-lr)

    @staticmethod
    def _rms(tensors: list[torch.Tensor], inv_sqrt_numel: list[float]) -> torch.Tensor:
        """Per-tensor RMS as one 1-D device tensor (no host sync)."""
        norms = torch._foreach_norm(tensors)
        torch._foreach_mul_(norms, inv_sqrt_numel)
        return torch.stack(norms)

    @classmethod
    def _clip_rms_(cls, tensors: list[torch.Tensor], inv_sqrt_numel: list[float], clip: float) -> None:
        """x ← x / max(1, RMS(x)/clip), per tensor, in place."""
        divisor = (cls._rms(tensors, inv_sqrt_numel) / clip).clamp(min=1.0)
        torch._foreach_div_(tensors, divisor.unbind(0))
