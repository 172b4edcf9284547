"""Running diagonal factors of the tracked layers, and the hooks that feed them on statistics steps.

All factor states live in one flat fp32 buffer (`H` and `S` of every tracked layer are views into it), so
that the fold on a statistics step (min-max per vector, running average, DDP all-reduce) is a fixed number
of kernels whatever the number of layers, and never syncs with the host.

Two ways of folding a statistics step into the state (docs/adafisher.md, "Running average"):

* ``minmax_then_average`` (variants default/official, the official code's order): each new statistic vector
  is min-max normalised, then `state <- old * state + new * minmax(stat)`, from a state of ones. The state
  is the factor F uses.
* ``average_then_minmax`` (variant paper, the paper's Eq. (3) then Eq. (4)): the state is a convex running
  average of the *raw* fp32 diagonals, `state <- gamma * state + (1 - gamma) * stat`, started from the first
  statistic a segment receives; the factor F uses is `minmax(state)`, recomputed when the state changes. A
  segment that has received no statistic yet has the identity factor (ones).

Collection is paired: on a statistics step the forward hook of a tracked layer reduces its input to
`H_hat` and registers a tensor hook on the layer's output; when the gradient w.r.t. that output arrives,
`S_hat` is computed and both are added to the pending buffer together. A forward without a backward
(evaluation with grad enabled) therefore contributes nothing. A layer called several times per step (shared
modules, gradient accumulation) contributes the sum of its per-call statistics: their average after
min-max, and explicitly divided by the number of calls before the raw running average of `paper`. Hooks exist
only while a statistics step is pending; other steps run the model without them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .stats import LayerKind, minmax_segments


def distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


FOLD_MODES = ("minmax_then_average", "average_then_minmax")


class FactorState:
    """Flat storage of the factors `H`, `S` of each tracked layer, their running state and pending statistics.

    `H[i]`, `S[i]` are the factors F uses (F = S (outer) H + damping). Under ``minmax_then_average`` they are
    views of the running state itself; under ``average_then_minmax`` they are views of a separate buffer
    `minmax(state)` (identity before a segment's first statistic), and `H_avg[i]`, `S_avg[i]` view the raw
    running averages.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module, LayerKind]], device: torch.device,
                 mode: str = "minmax_then_average") -> None:
        if mode not in FOLD_MODES:
            raise ValueError(f"FactorState: mode must be one of {FOLD_MODES}, got {mode!r}")
        self.mode = mode
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
        # the official code creates each state as ones on the first statistics step; under
        # average_then_minmax the state is only read once a segment has been observed
        self.state = torch.ones(self.size, dtype=torch.float32, device=device)
        if mode == "average_then_minmax":
            self.factor = torch.ones(self.size, dtype=torch.float32, device=device)  # identity until observed
            self.observed = torch.zeros(self.num_segments, dtype=torch.bool, device=device)
        else:
            self.factor = self.state
            self.observed = None
        # pending statistics, then one call counter per layer: one buffer, one all-reduce
        self.pending = torch.zeros(self.size + len(layers), dtype=torch.float32, device=device)
        self.segment_ids = torch.repeat_interleave(
            torch.arange(self.num_segments, device=device), torch.tensor(lengths, device=device)
        )
        self.H = [self._view(self.factor, 2 * i) for i in range(len(layers))]
        self.S = [self._view(self.factor, 2 * i + 1) for i in range(len(layers))]
        self.H_avg = [self._view(self.state, 2 * i) for i in range(len(layers))]
        self.S_avg = [self._view(self.state, 2 * i + 1) for i in range(len(layers))]
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

    def fold(self, old: float, new: float, eps: float, all_reduce: bool) -> bool:
        """Fold the pending statistics into the state of every segment that received finite statistics.

        ``minmax_then_average``: `state <- old*state + new*minmax(pending)`.
        ``average_then_minmax``: `state <- old*state + new*(pending/calls)` (just `pending/calls` for a segment's
        first statistic), then `factor <- minmax(state)`.
        Returns whether anything was folded (False when nothing is pending and there is no all-reduce).
        """
        if all_reduce:
            # raw statistics (sums of per-rank means) are summed over ranks: min-max is scale-free, so this
            # is the statistic of the global batch; every rank then folds identical numbers (the call counters
            # are summed too, so pending/calls is the mean over ranks and calls)
            dist.all_reduce(self.pending)
        elif not self.has_pending:
            return False
        stats = self.pending[: self.size]
        received = torch.repeat_interleave(self._calls > 0, 2)  # per segment
        finite = torch.ones(self.num_segments, dtype=torch.float32, device=stats.device).scatter_reduce_(
            0, self.segment_ids, torch.isfinite(stats).float(), "amin"
        )
        ok_segment = received & (finite > 0)
        ok = ok_segment[self.segment_ids]
        if self.mode == "minmax_then_average":
            folded = self.state * old + minmax_segments(stats, self.segment_ids, self.num_segments, eps) * new
            self.state.copy_(torch.where(ok, folded, self.state))
        else:
            calls = torch.repeat_interleave(self._calls.clamp_min(1.0), 2)[self.segment_ids]
            mean = stats / calls
            averaged = torch.where(self.observed[self.segment_ids], self.state * old + mean * new, mean)
            self.state.copy_(torch.where(ok, averaged, self.state))
            self.observed |= ok_segment
            self._refresh_factor(eps)
        self.pending.zero_()
        self.has_pending = False
        return True

    def _refresh_factor(self, eps: float) -> None:
        """average_then_minmax: factor = minmax(state) per segment, ones where nothing was observed yet."""
        normalised = minmax_segments(self.state, self.segment_ids, self.num_segments, eps)
        self.factor.copy_(torch.where(self.observed[self.segment_ids], normalised, torch.ones_like(normalised)))

    # -- inspection ---------------------------------------------------------------------------------------
    def segment_ranges(self) -> tuple[Tensor, Tensor]:
        """Per-segment (min, max) of the factors F uses, shape (num_segments,) each."""
        big = torch.finfo(torch.float32).max
        mx = self.factor.new_full((self.num_segments,), -big).scatter_reduce_(
            0, self.segment_ids, self.factor, "amax", include_self=False
        )
        mn = self.factor.new_full((self.num_segments,), big).scatter_reduce_(
            0, self.segment_ids, self.factor, "amin", include_self=False
        )
        return mn, mx

    def nbytes(self) -> int:
        total = (self.state.numel() + self.pending.numel()) * 4
        if self.factor is not self.state:
            total += self.factor.numel() * 4 + self.observed.numel()
        return total

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{layer: {"H", "S"}}: the factors F uses. ``average_then_minmax`` adds the raw running averages
        "H_avg", "S_avg" and "observed" (whether H, S have received a statistic), which resuming needs."""
        out = {}
        for i, name in enumerate(self.names):
            entry = {"H": self.H[i].clone(), "S": self.S[i].clone()}
            if self.mode == "average_then_minmax":
                entry.update(H_avg=self.H_avg[i].clone(), S_avg=self.S_avg[i].clone(),
                             observed=self.observed[2 * i:2 * i + 2].clone())
            out[name] = entry
        return out

    def load_state_dict(self, factors: dict[str, Any], eps: float) -> None:
        missing = sorted(set(self.names) - set(factors))
        unexpected = sorted(set(factors) - set(self.names))
        if missing or unexpected:
            raise ValueError(
                f"AdaFisher factors in the checkpoint do not match the model's tracked layers: "
                f"missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        raw = self.mode == "average_then_minmax"
        keys = ("H_avg", "S_avg") if raw else ("H", "S")
        for i, name in enumerate(self.names):
            entry = factors[name]
            if raw and not {"H_avg", "S_avg", "observed"} <= set(entry):
                raise ValueError(
                    f"AdaFisher factors of layer {name!r} lack the raw running averages (H_avg, S_avg, observed) "
                    "that variant 'paper' resumes from"
                )
            for target, key in zip((self.H_avg[i], self.S_avg[i]), keys):
                value = entry[key]
                if value.numel() != target.numel():
                    raise ValueError(
                        f"AdaFisher factor {name}.{key} has {value.numel()} entries in the checkpoint, "
                        f"{target.numel()} in the model"
                    )
                target.copy_(value.reshape(-1))
            if raw:
                self.observed[2 * i:2 * i + 2].copy_(entry["observed"].reshape(-1))
        if raw:
            self._refresh_factor(eps)
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
