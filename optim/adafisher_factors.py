"""Running diagonal factors of the tracked layers, and the hooks that feed them on statistics steps.

All factor states live in one flat fp32 buffer (`H` and `S` of every tracked layer are views into it), so
that the fold on a statistics step (min-max per vector, running average, DDP all-reduce) is a fixed number
of kernels whatever the number of layers, and never syncs with the host.

Collection is paired: on a statistics step the forward hook of a tracked layer reduces its input to
`H_hat` and registers a tensor hook on the layer's output; when the gradient w.r.t. that output arrives,
`S_hat` is computed and both are added to the pending buffer together. A forward without a backward
(evaluation with grad enabled) therefore contributes nothing. A layer called several times per step (shared
modules, gradient accumulation) contributes the sum of its per-call statistics, i.e. their average after
min-max. Hooks exist only while a statistics step is pending; other steps run the model without them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optim.adafisher_stats import LayerKind, minmax_segments


def distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class FactorState:
    """Flat storage of the running factors `H`, `S` of each tracked layer plus the pending new statistics."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module, LayerKind]], device: torch.device) -> None:
        self.names = [name for name, _, _ in layers]
        self.modules = [module for _, module, _ in layers]
        self.kinds = [kind for _, _, kind in layers]
        h_lens = [kind.h_length(m) for _, m, kind in layers]
        s_lens = [kind.s_length(m) for _, m, kind in layers]
        lengths = [n for pair in zip(h_lens, s_lens) for n in pair]  # H0, S0, H1, S1, ...
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.size = self.offsets[-1]
        self.num_segments = len(lengths)
        # the official code creates each state as ones on the first statistics step
        self.state = torch.ones(self.size, dtype=torch.float32, device=device)
        # pending statistics, then one call counter per layer: one buffer, one all-reduce
        self.pending = torch.zeros(self.size + len(layers), dtype=torch.float32, device=device)
        self.segment_ids = torch.repeat_interleave(
            torch.arange(self.num_segments, device=device), torch.tensor(lengths, device=device)
        )
        self.H = [self._view(self.state, 2 * i) for i in range(len(layers))]
        self.S = [self._view(self.state, 2 * i + 1) for i in range(len(layers))]
        self._pending_H = [self._view(self.pending, 2 * i) for i in range(len(layers))]
        self._pending_S = [self._view(self.pending, 2 * i + 1) for i in range(len(layers))]
        self._calls = self.pending[self.size:]
        self.has_pending = False

    def _view(self, flat: Tensor, segment: int) -> Tensor:
        return flat[self.offsets[segment]:self.offsets[segment + 1]]

    def __len__(self) -> int:
        return len(self.names)

    # -- collection -------------------------------------------------------------------------------------
    def accumulate(self, index: int, h: Tensor, s: Tensor) -> None:
        self._pending_H[index].add_(h.to(self.pending.device))
        self._pending_S[index].add_(s.to(self.pending.device))
        self._calls[index].add_(1.0)
        self.has_pending = True

    def clear_pending(self) -> None:
        if self.has_pending:
            self.pending.zero_()
            self.has_pending = False

    def fold(self, old: float, new: float, eps: float, all_reduce: bool) -> None:
        """state <- old*state + new*minmax(pending) for every layer that received finite statistics."""
        if all_reduce:
            # raw statistics (sums of per-rank means) are summed over ranks: min-max is scale-free, so this
            # is the statistic of the global batch; every rank then folds identical numbers
            dist.all_reduce(self.pending)
        elif not self.has_pending:
            return
        stats = self.pending[: self.size]
        received = torch.repeat_interleave(self._calls > 0, 2)  # per segment
        finite = torch.ones(self.num_segments, dtype=torch.float32, device=stats.device).scatter_reduce_(
            0, self.segment_ids, torch.isfinite(stats).float(), "amin"
        )
        ok = (received & (finite > 0))[self.segment_ids]
        folded = self.state * old + minmax_segments(stats, self.segment_ids, self.num_segments, eps) * new
        self.state.copy_(torch.where(ok, folded, self.state))
        self.pending.zero_()
        self.has_pending = False

    # -- inspection ---------------------------------------------------------------------------------------
    def segment_ranges(self) -> tuple[Tensor, Tensor]:
        """Per-segment (min, max) of the state, shape (num_segments,) each."""
        big = torch.finfo(torch.float32).max
        mx = self.state.new_full((self.num_segments,), -big).scatter_reduce_(
            0, self.segment_ids, self.state, "amax", include_self=False
        )
        mn = self.state.new_full((self.num_segments,), big).scatter_reduce_(
            0, self.segment_ids, self.state, "amin", include_self=False
        )
        return mn, mx

    def nbytes(self) -> int:
        return (self.state.numel() + self.pending.numel()) * 4

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {n: {"H": h.clone(), "S": s.clone()} for n, h, s in zip(self.names, self.H, self.S)}

    def load_state_dict(self, factors: dict[str, Any]) -> None:
        missing = sorted(set(self.names) - set(factors))
        unexpected = sorted(set(factors) - set(self.names))
        if missing or unexpected:
            raise ValueError(
                f"AdaFisher factors in the checkpoint do not match the model's tracked layers: "
                f"missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        for name, h, s in zip(self.names, self.H, self.S):
            for target, key in ((h, "H"), (s, "S")):
                value = factors[name][key]
                if value.numel() != target.numel():
                    raise ValueError(
                        f"AdaFisher factor {name}.{key} has {value.numel()} entries in the checkpoint, "
                        f"{target.numel()} in the model"
                    )
                target.copy_(value.reshape(-1))
        self.pending.zero_()
        self.has_pending = False


class StatisticsHooks:
    """Forward hooks on the tracked layers, registered only while a statistics step is pending."""

    def __init__(self, factors: FactorState) -> None:
        self.factors = factors
        self._handles: list[Any] = []
        self.fired: set[int] = set()  # layers that delivered statistics since the last reset (Python side)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def set_active(self, active: bool) -> None:
        if active and not self._handles:
            for index, (module, kind) in enumerate(zip(self.factors.modules, self.factors.kinds)):
                self._handles.append(module.register_forward_hook(self._make_hook(index, kind)))
        elif not active and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _make_hook(self, index: int, kind: LayerKind):
        factors, fired = self.factors, self.fired

        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not torch.is_grad_enabled() or not inputs or not isinstance(output, Tensor):
                return
            if not output.requires_grad:
                return
            x = inputs[0]
            with torch.no_grad(), _autocast_off(x):
                h = kind.activation_stat(module, x.detach(), output)

            def gradient_hook(g: Tensor) -> None:
                with torch.no_grad():
                    s = kind.gradient_stat(module, g.detach())
                factors.accumulate(index, h, s)
                fired.add(index)

            output.register_hook(gradient_hook)

        return forward_hook


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    device_type = x.device.type
    if device_type in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def layer_ranges(
    factors: Optional[FactorState], damping: float
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per-layer min and max of F / damping = 1 + S*H / damping (all entries are >= 0), as tensors."""
    if factors is None or len(factors) == 0:
        return None, None
    mn, mx = factors.segment_ranges()
    lo = 1.0 + mn[0::2] * mn[1::2] / damping
    hi = 1.0 + mx[0::2] * mx[1::2] / damping
    return lo, hi
