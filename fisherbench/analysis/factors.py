"""Collect FULL Kronecker factors H = E[ã ãᵀ] and S = E[g gᵀ] of chosen Linear / Conv2d layers.

Conventions (documented in the README, `## Fisher analysis`):
* Rows. A Linear layer contributes one row per input row (all leading dims flattened, e.g. batch x
  sequence); a Conv2d one row per (example, output position, group): the unfolded input patch (columns
  ordered (channel-in-group, kh, kw) like `weight.view(C_out, -1)`, groups pooled as in AdaFisher) and
  the output gradient at that position. Both factors are MEANS over rows, as in the official analysis
  code and AdaFisher's diagonal statistics (so diag(H), diag(S) are proportional to AdaFisher's H_hat,
  S_hat). K-FAC for convolutions (KFC) instead sums over positions in S: S_KFC = L * S.
* Bias. With a bias, ã = [a, 1]: H has an extra last row/column.
* Gradient scale. `grad_scale="batch"` (default, the K-FAC convention): g is the gradient of the
  batch-mean loss multiplied by the number of loss terms (`targets.numel()`), i.e. the gradient of each
  example's own loss, so S does not depend on the batch size. `grad_scale="mean"`: g as delivered by
  backward (the official AdaFisher code and its analysis notebook), S smaller by that count squared.
* Gradients come from the training loss with the data's labels (the empirical Fisher, as AdaFisher uses).
* Memory guard: a factor wider than `max_dim` is analysed as a random principal sub-block of `max_dim`
  indices (seeded); only those columns are accumulated. Its full diagonal is always kept.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherbench.analysis.diagnostics import Block
from fisherbench.optim.adafisher.stats import kind_of

SUPPORTED = (nn.Linear, nn.Conv2d)
GRAD_SCALES = ("batch", "mean")
DEFAULT_MAX_DIM = 1024
# conv patches are unfolded in chunks of examples holding at most this many elements
_PATCH_CHUNK_ELEMENTS = 1 << 23

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"[fisher_analysis] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- dimensions
def factor_dims(module: nn.Module) -> tuple[int, int]:
    """(dim of H, dim of S) of a supported layer (H includes the bias's appended 1)."""
    bias = int(getattr(module, "bias", None) is not None)
    if isinstance(module, nn.Linear):
        return module.in_features + bias, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel() + bias, module.out_channels
    raise TypeError(unsupported_message(type(module).__name__))


def unsupported_message(what: str) -> str:
    return (f"{what} is not a layer whose Kronecker factors this tool computes (supported: nn.Linear, "
            "nn.Conv2d); choose other layers with --layers (see --list-layers).")


# ---------------------------------------------------------------------------------------------- rows
def conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches, (examples * positions * groups, C_in/groups * kh * kw).

    Padding is applied exactly as the module's forward does (any padding mode, 'same' included, via the
    module's own padding tuple), then `F.unfold` handles kernel, stride and dilation.
    """
    pad = module._reversed_padding_repeated_twice  # the (left, right, top, bottom) nn.Conv2d itself uses
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, pad, mode=mode) if any(pad) else x
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    b, cd, length = cols.shape
    g = module.groups
    # (B, G * D, L) -> (B, G, D, L) -> rows (B, L, G) x D
    return cols.view(b, g, cd // g, length).permute(0, 3, 1, 2).reshape(-1, cd // g)


def input_rows(module: nn.Module, x: Tensor) -> Iterable[Tensor]:
    """Rows ã of the layer input (bias column appended), in chunks."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        chunks: Iterable[Tensor] = [x.reshape(-1, x.shape[-1])]
    else:
        per_example = max(1, x[0].numel() * module.kernel_size[0] * module.kernel_size[1])
        step = max(1, _PATCH_CHUNK_ELEMENTS // per_example)
        chunks = (conv_patches(module, x[i:i + step]) for i in range(0, x.shape[0], step))
    for rows in chunks:
        rows = rows.to(torch.float64)
        if bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        yield rows


def grad_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Rows of the gradient w.r.t. the layer output: (rows, out_features / out_channels)."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1]).to(torch.float64)
    # (B, C, OH, OW) -> (B * OH * OW, C)
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).to(torch.float64)


# ------------------------------------------------------------------------------------- accumulation
class _Moment:
    """Running sum of x_I x_Iᵀ over rows (I = the analysed indices) and of x * x (full diagonal), kept on
    the device of the rows."""

    def __init__(self, dim: int, index: Optional[Tensor]) -> None:
        self.dim = dim
        self.index = index
        self.outer: Optional[Tensor] = None
        self.diag: Optional[Tensor] = None
        self.rows = 0

    def add(self, rows: Tensor) -> None:
        if self.outer is None:
            k = self.dim if self.index is None else int(self.index.numel())
            self.outer = rows.new_zeros(k, k)
            self.diag = rows.new_zeros(self.dim)
            if self.index is not None:
                self.index = self.index.to(rows.device)
        sub = rows if self.index is None else rows[:, self.index]
        self.outer.addmm_(sub.T, sub)
        self.diag.add_(rows.square().sum(0))
        self.rows += rows.shape[0]

    def block(self) -> Block:
        if self.outer is None or self.diag is None or self.rows == 0:
            raise RuntimeError("no rows were collected for this factor: the layer did not run in forward, or "
                               "its output received no gradient")
        index = None if self.index is None else self.index.cpu()
        return Block((self.outer / self.rows).cpu(), (self.diag / self.rows).cpu(), index)


@dataclass
class LayerFactors:
    """The full (or sub-block) Kronecker factors of one layer."""

    name: str
    kind: str
    H: Block
    S: Block
    rows_H: int
    rows_S: int
    examples: int
    grad_scale: str


def sample_index(dim: int, max_dim: int, seed: int) -> Optional[Tensor]:
    """Sorted random subset of `max_dim` of `dim` indices (seeded), or None when dim <= max_dim."""
    if dim <= max_dim:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(dim, generator=gen)[:max_dim]).values


class FactorCollector:
    """Hooks that accumulate H and S of `layers` ({name: module}) over forward/backward passes.

    Use as a context manager (hooks are removed on exit). Set `grad_multiplier` before each backward
    (`collect_factors` does): output gradients are multiplied by it.
    """

    def __init__(self, layers: dict[str, nn.Module], *, max_dim: int = DEFAULT_MAX_DIM, seed: int = 0,
                 log: Log = _stderr) -> None:
        if max_dim < 2:
            raise ValueError(f"max_dim must be >= 2, got {max_dim}")
        self.layers = layers
        self.grad_multiplier = 1.0
        self.examples = 0
        self._handles: list = []
        self.moments: dict[str, tuple[_Moment, _Moment]] = {}
        for name, module in layers.items():
            if not isinstance(module, SUPPORTED):
                raise TypeError(f"layer '{name}': " + unsupported_message(type(module).__name__))
            dims = factor_dims(module)
            pair = []
            for which, dim in zip("HS", dims):
                index = sample_index(dim, max_dim, seed)
                if index is not None:
                    log(f"layer '{name}': {which} is {dim}x{dim} (more than --max-dim {max_dim}); analysing a "
                        f"random principal {max_dim}x{max_dim} sub-block (seed {seed}). Its full diagonal is "
                        "kept; off-diagonal energy and Gershgorin radii are extrapolated; eigenvalues are the "
                        "sub-block's.")
                pair.append(_Moment(dim, index))
            self.moments[name] = (pair[0], pair[1])

    def __enter__(self) -> "FactorCollector":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str):
        h_moment, s_moment = self.moments[name]

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            with torch.no_grad():
                for rows in input_rows(module, inputs[0].detach()):
                    h_moment.add(rows)
            if isinstance(output, Tensor) and output.requires_grad:
                def grad_hook(g: Tensor) -> None:
                    with torch.no_grad():
                        s_moment.add(grad_rows(module, g.detach()) * self.grad_multiplier)

                output.register_hook(grad_hook)

        return hook

    def result(self, grad_scale: str) -> dict[str, LayerFactors]:
        out = {}
        for name, (h, s) in self.moments.items():
            out[name] = LayerFactors(name, type(self.layers[name]).__name__, h.block(), s.block(), h.rows, s.rows,
                                     self.examples, grad_scale)
        return out


# ----------------------------------------------------------------------------------------- one pass
def collect_factors(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    layers: Sequence[str],
    *,
    num_batches: int = 4,
    grad_scale: str = "batch",
    max_dim: int = DEFAULT_MAX_DIM,
    seed: int = 0,
    log: Log = _stderr,
) -> dict[str, LayerFactors]:
    """H and S of `layers` (module names of `model`) averaged over `num_batches` batches.

    The model runs in training mode (the curvature the optimizer sees) on a hook-free copy, so neither the
    caller's model (BN running statistics, gradients) nor an optimizer's own hooks are touched.
    """
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    work = hook_free_copy(model)
    modules = dict(work.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"no layer named {missing} in the model; see --list-layers for the names")
    work.train()
    collector = FactorCollector({n: modules[n] for n in layers}, max_dim=max_dim, seed=seed, log=log)
    done = 0
    with collector:
        for inputs, targets in batches:
            if done >= num_batches:
                break
            collector.grad_multiplier = float(targets.numel()) if grad_scale == "batch" else 1.0
            work.zero_grad(set_to_none=True)
            loss = loss_fn(work(inputs), targets)
            loss.backward()
            collector.examples += int(inputs.shape[0])
            done += 1
    if done == 0:
        raise ValueError("no batch to collect factors from (empty data source)")
    return collector.result(grad_scale)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def hook_free_copy(model: nn.Module) -> nn.Module:
    """A deep copy without module hooks (an optimizer's statistics hooks must not see our passes).

    The hook dicts (private nn.Module attributes, stable across torch 2.x) are replaced by empty ones through
    deepcopy's memo, so whatever the hooks reference (an optimizer's state) is never copied.
    """
    memo: dict[int, object] = {}
    for m in model.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d is not None:
                memo[id(d)] = type(d)()
    work = copy.deepcopy(model, memo)
    for p in work.parameters():
        p.grad = None
    return work


# -------------------------------------------------------------------------------------- layer choice
def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED)]


def adafisher_order(model: nn.Module) -> list[str]:
    """Names of the layers AdaFisher tracks (Linear, Conv2d, BatchNorm2d, LayerNorm), in model order: the
    paper counts ResNet-18's layers this way (37th = layer4.1.conv1, 41st = the classifier)."""
    return [n for n, m in model.named_modules() if n and kind_of(m) is not None]


PAPER_POSITIONS = (37, 41)  # the paper's conv and linear layers of ResNet-18 (1-based tracked positions)


def default_layers(model: nn.Module) -> list[str]:
    """A conv and a linear layer: the paper's 37th/41st tracked layers when they are a Conv2d and a Linear
    (ResNet-18), otherwise the last Conv2d and the last Linear (whichever exist)."""
    order = adafisher_order(model)
    modules = dict(model.named_modules())
    if len(order) >= max(PAPER_POSITIONS):
        conv, lin = (modules[order[p - 1]] for p in PAPER_POSITIONS)
        if isinstance(conv, nn.Conv2d) and isinstance(lin, nn.Linear):
            return [order[p - 1] for p in PAPER_POSITIONS]
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    lins = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    chosen = ([convs[-1]] if convs else []) + ([lins[-1]] if lins else [])
    if not chosen:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to analyse")
    return chosen


def select_layers(model: nn.Module, spec: str = "default") -> list[str]:
    """Resolve `--layers`: `default`, `all` (every Linear/Conv2d), or comma-separated module names and
    `#N` (N-th AdaFisher-tracked layer, 1-based, as the paper counts)."""
    spec = spec.strip()
    if spec == "default":
        return default_layers(model)
    if spec == "all":
        names = [n for n, _ in supported_layers(model)]
        if not names:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to analyse")
        return names
    modules = dict(model.named_modules())
    order = adafisher_order(model)
    out: list[str] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token.startswith("#"):
            pos = int(token[1:])
            if not 1 <= pos <= len(order):
                raise ValueError(f"--layers {token}: the model has {len(order)} tracked layers (1..{len(order)})")
            token = order[pos - 1]
        if token not in modules:
            raise ValueError(f"--layers: no module named '{token}' in the model; see --list-layers")
        if not isinstance(modules[token], SUPPORTED):
            raise ValueError(f"--layers: '{token}' ({type(modules[token]).__name__}): "
                             + unsupported_message(type(modules[token]).__name__))
        if token not in out:
            out.append(token)
    if not out:
        raise ValueError("--layers selected no layer")
    return out


def describe_layers(model: nn.Module) -> list[str]:
    """One line per supported layer: tracked position, name, type and factor sizes (for --list-layers)."""
    order = {n: i + 1 for i, n in enumerate(adafisher_order(model))}
    lines = []
    for name, m in supported_layers(model):
        h, s = factor_dims(m)
        lines.append(f"#{order.get(name, '?'):<4} {name:<40} {type(m).__name__:<7} H {h}x{h}  S {s}x{s}")
    return lines
