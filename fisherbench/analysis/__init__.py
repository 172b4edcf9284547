"""Fisher analysis: what the Kronecker factors H = E[a aᵀ] and S = E[g gᵀ] of a layer actually contain.

* `factors`: collect FULL factors of chosen Linear/Conv2d layers (hooks; sampled principal sub-blocks
  for wide layers).
* `diagnostics`: per-factor numbers (diagonal energy, the paper's SNR, Gershgorin discs, spectra with and
  without off-diagonal noise, curvature vs damping) and the diagonal-approximation error of H ⊗ S.
* `figures`: the paper's Figures 3, 6-8 (Gershgorin discs, spectra, FFT, heatmaps).
* `report`: tables (CSV + Markdown) and W&B logging.
* `sources`: where the model comes from (a run's checkpoints, or a short training run).

`scripts/fisher_analysis.py` is the command line. Nothing here is imported by `optim/__init__` (no
registry entries; matplotlib stays out of the training path).
"""
