"""AdaFisher's per-layer diagonal Kronecker statistics, min-max normalisation and running averages.

For a tracked layer the preconditioner of a parameter element is `F[o, i] = S[o] * H[i] + damping`, where
`H` (activation side) and `S` (gradient side) are running diagonal states. Each statistics step produces
new diagonals `H_hat`, `S_hat` from the layer's input and the gradient of the loss w.r.t. its output, which
are folded into the running state (min-max normalised before the average for `default`/`official`, after it
for `paper`; see `factors.py`). The definitions below follow the official AdaFisher code
(`optimizers/AdaFisher.py`, `Compute_H_D` L92-210 and `Compute_S_D` L213-321; docs/adafisher.md) and are
written from its formulas:

* Linear (any input rank, rows = all leading dims): `H_hat = mean_rows(a**2)` (+ a trailing 1 for the
  bias), `S_hat = mean_rows(g**2)`.
* Conv2d: `H_hat[c, i, j] = mean over (batch, group, output position) of the squared input value under
  kernel tap (i, j)` (+ 1 for the bias), groups pooled into one vector of length `C_in/groups*kh*kw`;
  `S_hat = mean over (batch, position) of g**2`. Computed without unfold: square and sum over the batch,
  then sum strided slices per tap (handles stride, padding incl. 'same'/non-zero modes, dilation, groups).
* BatchNorm2d / SyncBatchNorm: the official 2-entry `H_hat = [sum_c m_c**2, C] / B**2` with
  `m_c = sum_{n,h,w} a / (HW)**2`; `S_hat = (sum_{n,h,w} g)**2 / B`.
* LayerNorm: 2-entry `H_hat = [sum_t m_t**2, n_t] / B**2` reducing all dims but dim 1 (as the official code,
  which keeps the sequence axis of a (B, T, D) input), `m_t = sum a / k**2` with `k` the product of the
  reduced non-batch dims; `S_hat = (sum over the leading dims of g)**2 / B`, one entry per normalised element.

Every statistic is computed in fp32 whatever the autocast dtype of the hooked tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------
# min-max normalisation


def minmax(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Scale-free min-max of one statistic vector: `(x - min) / (max - min + eps * max|x|)`.

    The official code divides by `max - min + 1e-6` (absolute epsilon), which makes the result depend on the
    loss scale (S is quadratic in it) and on constant divisors. Scaling the epsilon by `max|x|` makes the
    result invariant to any positive rescaling of `x`; it equals the official value when `max|x| == 1` and
    reproduces the official CUDA runs, whose loss scaler (>= 2**16) made the absolute epsilon negligible.
    """
    mn, mx = x.min(), x.max()
    den = ((mx - mn) + eps * mx.abs()).clamp_min(torch.finfo(x.dtype).tiny)
    return (x - mn) / den


def minmax_segments(flat: Tensor, segment_ids: Tensor, num_segments: int, eps: float = 1e-6) -> Tensor:
    """`minmax` applied independently to each segment of a flat vector, in a fixed number of kernels."""
    big = torch.finfo(flat.dtype).max
    mx = flat.new_full((num_segments,), -big).scatter_reduce_(0, segment_ids, flat, "amax", include_self=False)
    mn = flat.new_full((num_segments,), big).scatter_reduce_(0, segment_ids, flat, "amin", include_self=False)
    den = ((mx - mn) + eps * mx.abs()).clamp_min(torch.finfo(flat.dtype).tiny)
    return (flat - mn[segment_ids]) / den[segment_ids]


def fold_coefficients(variant: str, gamma: float) -> tuple[float, float]:
    """(old, new) coefficients of the running average `state <- old * state + new * x`.

    The official code (and so `default`/`official`) folds `x = minmax(stat)` with `0.1*gamma` / `0.01*gamma`
    (0.08 / 0.008 for the configured gamma 0.8): not a convex average, the state settles at ~1/115 of the
    normalised statistic. `paper` folds the raw statistic `x = stat` with the paper's Eq. (3), the convex
    `gamma * old + (1 - gamma) * new`, and min-max normalises the average when F is formed; for a constant
    statistic both orders settle at `new / (1 - old) * minmax(stat)` as the factor F uses.
    """
    if variant == "paper":
        return gamma, 1.0 - gamma
    return 0.1 * gamma, 0.01 * gamma


# ---------------------------------------------------------------------------------------------------------
# statistics per layer type


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _with_bias_entry(h: Tensor, module: nn.Module) -> Tensor:
    if getattr(module, "bias", None) is None:
        return h
    return torch.cat([h, h.new_ones(1)])


def linear_activation_stat(module: nn.Linear, x: Tensor) -> Tensor:
    rows = _fp32(x.reshape(-1, x.shape[-1]))
    return _with_bias_entry(rows.square().sum(0) / rows.shape[0], module)


def linear_gradient_stat(module: nn.Linear, g: Tensor) -> Tensor:
    rows = _fp32(g.reshape(-1, g.shape[-1]))
    return rows.square().sum(0) / rows.shape[0]


def _tap_sums(sq: Tensor, dim: int, taps: int, positions: int, stride: int, dilation: int) -> Tensor:
    """For every kernel tap t along `dim`: sum of `sq` over the `positions` indices `t*dilation + p*stride`."""
    span = (positions - 1) * stride + 1
    windows = sq.unfold(dim, span, dilation)  # window start t*dilation, window content in a new last dim
    index = [slice(None)] * windows.ndim
    index[dim] = slice(0, taps)
    index[-1] = slice(None, None, stride)
    return windows[tuple(index)].sum(-1)


def conv2d_activation_stat(module: nn.Conv2d, x: Tensor, out_size: Optional[tuple[int, int]] = None) -> Tensor:
    """`out_size`: the output's spatial size, if known (detects padding done inside a subclass's forward)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    batch = x.shape[0]
    pads = module._reversed_padding_repeated_twice  # (left, right, top, bottom), also for padding='same'
    if module.padding_mode != "zeros":
        x = F.pad(x, pads, mode=module.padding_mode)
        pads = (0, 0, 0, 0)
    sq = _fp32(x).square().sum(0)  # (C_in, H, W): the batch is reduced before any spatial work
    if any(pads):
        sq = F.pad(sq, tuple(pads))  # zero padding of the squared map == squares of zero-padded input
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    out_h = (sq.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (sq.shape[2] - dw * (kw - 1) - 1) // sw + 1
    if out_size is not None and (out_h, out_w) != tuple(out_size):
        # a subclass that pads inside forward (TF-style "same", e.g. timm Conv2dSame): infer that padding
        extra_h = (out_size[0] - 1) * sh + dh * (kh - 1) + 1 - sq.shape[1]
        extra_w = (out_size[1] - 1) * sw + dw * (kw - 1) + 1 - sq.shape[2]
        if extra_h < 0 or extra_w < 0:
            raise ValueError(f"AdaFisher: cannot relate the input and output of {type(module).__name__}")
        sq = F.pad(sq, (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2))
        out_h, out_w = out_size
    rows = _tap_sums(sq, 1, kh, out_h, sh, dh)  # (C_in, kh, W_padded)
    taps = _tap_sums(rows, 2, kw, out_w, sw, dw)  # (C_in, kh, kw)
    groups = module.groups
    pooled = taps.reshape(groups, -1, kh, kw).sum(0).reshape(-1)  # groups share one H, (c, kh, kw) order
    return _with_bias_entry(pooled / (batch * groups * out_h * out_w), module)


def conv2d_gradient_stat(module: nn.Conv2d, g: Tensor) -> Tensor:
    if g.ndim == 3:
        g = g.unsqueeze(0)
    positions = g.shape[0] * g.shape[2] * g.shape[3]
    return _fp32(g).square().sum((0, 2, 3)) / positions


def batchnorm_activation_stat(module: nn.Module, x: Tensor) -> Tensor:
    batch = x.shape[0]
    spatial = math.prod(x.shape[2:])
    reduce = [0] + list(range(2, x.ndim))
    m = x.sum(reduce, dtype=torch.float32) / spatial**2
    return torch.stack([m.square().sum(), m.new_full((), float(m.numel()))]) / batch**2


def batchnorm_gradient_stat(module: nn.Module, g: Tensor) -> Tensor:
    reduce = [0] + list(range(2, g.ndim))
    return g.sum(reduce, dtype=torch.float32).square() / g.shape[0]


def layernorm_activation_stat(module: nn.LayerNorm, x: Tensor) -> Tensor:
    if x.ndim < 2:
        x = x.unsqueeze(0)
    batch = x.shape[0]
    reduce = [d for d in range(x.ndim) if d != 1]
    k = math.prod(x.shape[d] for d in reduce if d != 0)
    m = x.sum(reduce, dtype=torch.float32) / k**2
    return torch.stack([m.square().sum(), m.new_full((), float(m.numel()))]) / batch**2


def layernorm_gradient_stat(module: nn.LayerNorm, g: Tensor) -> Tensor:
    if g.ndim < 2:
        g = g.unsqueeze(0)
    shape = tuple(module.normalized_shape)
    if tuple(g.shape[g.ndim - len(shape):]) == shape:  # nn.LayerNorm: the normalised dims are the last ones
        reduce = list(range(g.ndim - len(shape)))
    elif len(shape) == 1 and g.shape[1] == shape[0]:  # channels-first subclasses (e.g. timm LayerNorm2d)
        reduce = [d for d in range(g.ndim) if d != 1]
    else:
        raise ValueError(
            f"AdaFisher: cannot locate the normalised dims {shape} of {type(module).__name__} in its output of "
            f"shape {tuple(g.shape)}"
        )
    return g.sum(reduce, dtype=torch.float32).square().reshape(-1) / g.shape[0]


# ---------------------------------------------------------------------------------------------------------
# layer kinds: what each supported layer type contributes


@dataclass(frozen=True)
class LayerKind:
    """How one layer type is tracked.

    `roles` maps a parameter attribute ("weight"/"bias") to the slice `(start, length)` of H it uses; the
    parameter's F is `S (outer) H[start:start+length] + damping`, reshaped to the parameter's shape.
    """

    name: str
    h_length: Callable[[nn.Module], int]
    s_length: Callable[[nn.Module], int]
    activation_stat: Callable[[nn.Module, Tensor, Tensor], Tensor]  # (module, input, output) -> H_hat
    gradient_stat: Callable[[nn.Module, Tensor], Tensor]  # (module, grad of output) -> S_hat
    roles: Callable[[nn.Module], dict[str, tuple[int, int]]]


def _fan_in(module: nn.Module) -> int:
    return module.weight[0].numel()


def _linear_like_roles(module: nn.Module) -> dict[str, tuple[int, int]]:
    d = _fan_in(module)
    roles = {"weight": (0, d)}
    if module.bias is not None:
        roles["bias"] = (d, 1)
    return roles


def _norm_roles(module: nn.Module) -> dict[str, tuple[int, int]]:
    roles = {}
    if getattr(module, "weight", None) is not None:
        roles["weight"] = (0, 1)
    if getattr(module, "bias", None) is not None:
        roles["bias"] = (1, 1)
    return roles


LINEAR = LayerKind(
    "Linear",
    h_length=lambda m: m.in_features + (m.bias is not None),
    s_length=lambda m: m.out_features,
    activation_stat=lambda m, x, out: linear_activation_stat(m, x),
    gradient_stat=linear_gradient_stat,
    roles=_linear_like_roles,
)
CONV2D = LayerKind(
    "Conv2d",
    h_length=lambda m: _fan_in(m) + (m.bias is not None),
    s_length=lambda m: m.out_channels,
    activation_stat=lambda m, x, out: conv2d_activation_stat(m, x, tuple(out.shape[-2:])),
    gradient_stat=conv2d_gradient_stat,
    roles=_linear_like_roles,
)
BATCHNORM2D = LayerKind(
    "BatchNorm2d",
    h_length=lambda m: 2,
    s_length=lambda m: m.num_features,
    activation_stat=lambda m, x, out: batchnorm_activation_stat(m, x),
    gradient_stat=batchnorm_gradient_stat,
    roles=_norm_roles,
)
LAYERNORM = LayerKind(
    "LayerNorm",
    h_length=lambda m: 2,
    s_length=lambda m: math.prod(m.normalized_shape),
    activation_stat=lambda m, x, out: layernorm_activation_stat(m, x),
    gradient_stat=layernorm_gradient_stat,
    roles=_norm_roles,
)

# default / paper / constf: by type (subclasses included); SyncBatchNorm is what DDP users convert BN to
KINDS_BY_TYPE: dict[type, LayerKind] = {
    nn.Linear: LINEAR,
    nn.Conv2d: CONV2D,
    nn.BatchNorm2d: BATCHNORM2D,
    nn.SyncBatchNorm: BATCHNORM2D,
    nn.LayerNorm: LAYERNORM,
}
# official: the official code matches the exact class name
KINDS_BY_OFFICIAL_NAME: dict[str, tuple[type, LayerKind]] = {
    "Linear": (nn.Linear, LINEAR),
    "Conv2d": (nn.Conv2d, CONV2D),
    "BatchNorm2d": (nn.BatchNorm2d, BATCHNORM2D),
    "LayerNorm": (nn.LayerNorm, LAYERNORM),
}


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind of a module by type (first registered class in its MRO), or None if unsupported."""
    for cls in type(module).__mro__:
        kind = KINDS_BY_TYPE.get(cls)
        if kind is not None:
            return kind
    return None


def official_kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind the official code would give a module (exact class-name match), or None."""
    entry = KINDS_BY_OFFICIAL_NAME.get(type(module).__name__)
    if entry is None:
        return None
    torch_type, kind = entry
    if not isinstance(module, torch_type):
        raise ValueError(
            f"AdaFisher(variant='official'): module of class {type(module).__qualname__} is named like a "
            f"supported layer but is not a {torch_type.__module__}.{torch_type.__name__}; the official code would "
            "track it by name but its statistics cannot be computed. Use variant='default'."
        )
    return kind
