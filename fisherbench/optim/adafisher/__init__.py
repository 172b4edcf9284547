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
  parameters included), replayed once at construction (`official_map.py`).
* ``paper``: the paper's order: Eq. (3) convex running average of the raw diagonals
  `H <- gamma H + (1-gamma) H_hat` (from the first statistic), Eq. (4) min-max of the averaged diagonals
  when F is formed, every parameter updated; identity factors (`F = 1*1 + damping`) for parameters of
  unsupported layers and for a layer before its first statistics.
* ``constf``: F = damping everywhere (no statistics, no hooks): EMA-momentum SGD at step lr/damping.

Structure (as `torch.optim.Adam`):

* `optimizer.py`: `AdaFisher` / `AdaFisherW`. `step()` folds pending statistics, gathers each group's tensor
  lists in `_init_group` (lazy state set-up lives there) and calls the functional `adafisher()`;
  `state_dict()` / `load_state_dict()` round-trip by parameter and layer names.
* `functional.py`: `adafisher()`, which dispatches to `_single_tensor_adafisher` (a loop over tensors),
  `_multi_tensor_adafisher` (grouped `torch._foreach_*` kernels, F formed for many tensors at once in a
  reused workspace) or `_compiled_adafisher` (one fused `torch.compile` kernel per tracked tensor).
* `plan.py`: which F each parameter takes (the parameter -> layer map, built once).
* `factors.py`: the running diagonal factors and the hooks that feed them; `stats.py`: the per-layer
  statistics and min-max; `official_map.py`: the official code's parameter assignment, replayed.

The package imports only torch and the standard library (and its own modules, relatively), so it can be
copied into another project as it is.
"""
from __future__ import annotations

from .functional import Fisher, Kron, adafisher
from .optimizer import IMPLEMENTATIONS, STATE_FORMAT, VARIANTS, AdaFisher, AdaFisherW

__all__ = ["AdaFisher", "AdaFisherW", "Fisher", "IMPLEMENTATIONS", "Kron", "STATE_FORMAT", "VARIANTS", "adafisher"]
