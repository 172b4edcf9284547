"""Paper Figure 1: optimizer trajectories over a loss surface, fully offline.

IRIS (bundled with scikit-learn), standardised and reduced to 2-D with PCA; a 2-layer MLP (2 -> 16 -> 3,
tanh) trained with cross-entropy for 20 epochs (mini-batches of 16) at LR 1e-3 by Adam, AdaHessian, K-FAC,
Shampoo and AdaFisher, built from the optimizer registry with their default configs (LR set to 1e-3), every
one from the same initial weights and on the same batches. The first layer's weights are recorded after
every step; one PCA of all recorded first-layer weights gives a common 2-D plane. The loss surface is the
training loss at the recorded points, interpolated (cubic) onto a 200 x 200 grid of that plane; the
trajectories are drawn on top.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.interpolate import griddata
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from fisherbench.analysis.plotting import save_figure as save
from fisherbench.analysis.plotting import series_color as _color
from fisherbench.engine.compose import load_group_option
from fisherbench.optim import BuildContext, build_optimizer

OPTIMIZERS = (("Adam", "adam"), ("AdaHessian", "adahessian"), ("K-FAC", "kfac"), ("Shampoo", "shampoo"),
              ("AdaFisher", "adafisher"))
EPOCHS, LR, BATCH, HIDDEN, GRID = 20, 1.0e-3, 16, 16, 200


def iris_2d() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_iris()
    x = PCA(n_components=2, random_state=0).fit_transform(StandardScaler().fit_transform(data.data))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 3))


def train_trajectory(option: str, x: torch.Tensor, y: torch.Tensor, init: dict, epochs: int = EPOCHS,
                     lr: float = LR, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """First-layer weights (flattened) and full-batch training loss after each step, starting at `init`."""
    model = mlp()
    model.load_state_dict(init)
    opts = {**load_group_option("optimizer", option), "lr": lr}
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    adapter = build_optimizer(opts, model, BuildContext(steps_per_epoch=steps_per_epoch,
                                                        total_steps=steps_per_epoch * epochs))
    gen = torch.Generator().manual_seed(seed)  # the same batches for every optimizer
    weights, losses = [], []

    def record() -> None:
        with torch.no_grad():
            weights.append(model[0].weight.detach().flatten().numpy().copy())
            losses.append(float(F.cross_entropy(model(x), y)))

    record()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            adapter.train_step(model, x[idx], y[idx], F.cross_entropy, contextlib.nullcontext)
            record()
    return np.stack(weights), np.asarray(losses)


def figure1(out_stem: Path, optimizers: Sequence[tuple[str, str]] = OPTIMIZERS, epochs: int = EPOCHS,
            grid: int = GRID) -> tuple[list[Path], dict[str, float]]:
    """Draw Figure 1; returns the files written and each optimizer's final training loss."""
    x, y = iris_2d()
    init = {k: v.clone() for k, v in mlp().state_dict().items()}
    trajectories = {}
    with torch.random.fork_rng():
        for label, option in optimizers:
            trajectories[label] = train_trajectory(option, x, y, init, epochs)
    all_w = np.concatenate([w for w, _ in trajectories.values()])
    all_l = np.concatenate([losses for _, losses in trajectories.values()])
    pca = PCA(n_components=2, random_state=0).fit(all_w)
    points = pca.transform(all_w)
    finite = np.isfinite(all_l) & np.all(np.isfinite(points), axis=1)
    lo, hi = points[finite].min(axis=0), points[finite].max(axis=0)
    pad = 0.05 * (hi - lo + 1e-12)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid))
    surface = griddata(points[finite], all_l[finite], (gx, gy), method="cubic")
    # cubic interpolation overshoots between distant trajectories: keep it within the recorded losses
    surface = np.clip(surface, all_l[finite].min(), all_l[finite].max())

    fig, ax = plt.subplots(figsize=(7, 5.5))
    cs = ax.contourf(gx, gy, surface, levels=30, cmap="viridis", alpha=0.85)
    fig.colorbar(cs, ax=ax, label="training loss (cross-entropy; cubic interpolation of the recorded points)")
    final = {}
    for k, (label, (w, losses)) in enumerate(trajectories.items()):
        p = pca.transform(w)
        ax.plot(p[:, 0], p[:, 1], color=_color(k + 1), lw=1.8, label=f"{label} (final loss {losses[-1]:.3f})")
        ax.scatter(p[-1, 0], p[-1, 1], color=_color(k + 1), marker="*", s=90, edgecolor="k", zorder=5)
        final[label] = float(losses[-1])
    start = pca.transform(all_w[:1])
    ax.scatter(start[0, 0], start[0, 1], color="white", edgecolor="k", s=60, zorder=6, label="start (shared)")
    ax.set(xlabel="first-layer weights, PC 1", ylabel="first-layer weights, PC 2",
           title=f"IRIS (PCA 2-D), 2-layer MLP, {epochs} epochs at LR {LR:g}")
    ax.legend(fontsize=7, loc="best")
    return save(fig, out_stem), final
