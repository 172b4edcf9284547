"""The paper's factor figures (AdaFisher, Figures 3 and 6-8) for one layer at several training steps.

* `gershgorin_figure`: Gershgorin discs (coloured by radius, centres as black dots) and the eigenvalues
  (red crosses) of H (top row) and S (bottom row), one column per step (Figures 3 left, 6 left).
* `spectrum_figure`: eigenvalues without / with the off-diagonal noise on log-log axes, with the Kaiser
  criterion (mean eigenvalue) and the damping (Figures 3 right, 6 right).
* `fft_figure`: 20 log10 |FFT| of H, H~, S, S~ with the Eq. 7 SNR under the noisy rows (Figure 7).
* `heatmap_figure`: log10 |entries| of H (top) and S (bottom) at each step (Figure 8).
Each is saved as PNG and PDF by `save`. The library never chooses matplotlib's backend (a notebook keeps its
own); the command-line entry points choose Agg, files only (`fisherbench.cli_backend`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from matplotlib.patches import Circle
from matplotlib.ticker import LogFormatter, NullFormatter

from fisherbench.analysis.diagnostics import FactorAnalysis, LayerAnalysis, fft_magnitude_db
from fisherbench.analysis.plotting import save_figure

# plain-text labels and tick formatters: mathtext and tight layouts cost most of the drawing time
FACTORS = (("H", "H"), ("S", "S"))


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _grid(rows: int, cols: int, size: float = 3.0):
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.0, size * rows + 0.6), squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.88, bottom=0.08, top=0.9, wspace=0.45, hspace=0.45)
    return fig, axes


def _plain_log_axes(ax) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(LogFormatter(labelOnlyBase=True))
        axis.set_minor_formatter(NullFormatter())


def _suffix(fa: FactorAnalysis) -> str:
    b = fa.block
    return f" [{b.k} of {b.n} sampled]" if b.sampled else ""


def _few_ticks(ax) -> None:
    ax.locator_params(nbins=4)
    ax.tick_params(labelsize=7)


def _row_colorbar(fig, axes_row, mappable, label: str = "") -> None:
    """One colour bar per row (shared scale across steps): fewer axes to draw, honest comparison."""
    cb = fig.colorbar(mappable, ax=list(axes_row), fraction=0.03, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    if label:
        cb.set_label(label, fontsize=8)


def gershgorin_figure(layer: str, analyses: Sequence[LayerAnalysis]):
    fig, axes = _grid(2, len(analyses))
    for row, (key, label) in enumerate(FACTORS):
        factors: list[FactorAnalysis] = [getattr(la, key) for la in analyses]
        all_r = np.concatenate([_np(fa.radii) for fa in factors])
        norm = Normalize(vmin=float(all_r.min()), vmax=float(all_r.max()) + 1e-300)
        for col, (la, fa) in enumerate(zip(analyses, factors)):
            ax = axes[row, col]
            c, r, eig = _np(fa.centres), _np(fa.radii), _np(fa.eig)
            discs = PatchCollection([Circle((ci, 0.0), ri) for ci, ri in zip(c, r)], cmap="viridis", norm=norm,
                                    alpha=0.6)
            discs.set_array(r)
            discs.set_facecolor("none")
            ax.add_collection(discs)
            ax.plot(c, np.zeros_like(c), "ko", markersize=2)
            ax.plot(eig, np.zeros_like(eig), "rx", markersize=4)
            reach = float(np.max(np.abs(c) + r)) if c.size else 1.0
            lo = float(np.min(c - r)) if c.size else -1.0
            ax.set_xlim(min(lo, -0.05 * reach), reach * 1.05)
            ax.set_ylim(-float(np.max(r)) * 1.05 - 1e-12, float(np.max(r)) * 1.05 + 1e-12)
            ax.set_title(f"{label} | step {la.step}{_suffix(fa)}", fontsize=9)
            ax.grid(True, linewidth=0.4)
            _few_ticks(ax)
            if col == 0:
                ax.set_ylabel("imaginary part", fontsize=8)
            if row == 1:
                ax.set_xlabel("real part", fontsize=8)
        _row_colorbar(fig, axes[row], ScalarMappable(norm=norm, cmap="viridis"), "disc radius")
    fig.suptitle(f"Gershgorin discs (centres: black dots) and eigenvalues (red x): {layer}", fontsize=10)
    return fig


def spectrum_figure(layer: str, analyses: Sequence[LayerAnalysis]):
    fig, axes = _grid(2, len(analyses))
    for col, la in enumerate(analyses):
        for row, (key, label) in enumerate(FACTORS):
            fa: FactorAnalysis = getattr(la, key)
            ax = axes[row, col]
            tiny = 1e-30
            eig = np.clip(np.sort(_np(fa.eig))[::-1], tiny, None)  # log axes: non-positive values drawn at `tiny`
            eig_n = np.clip(np.sort(_np(fa.eig_noisy))[::-1], tiny, None)
            idx = np.arange(1, eig.size + 1)
            ax.plot(idx, eig, "-", color="tab:blue", linewidth=1.8, label="without noise")
            ax.plot(idx, eig_n, "--", color="tab:red", linewidth=1.4, label=f"with noise (σ={fa.sigma:g})")
            ax.axhline(fa.metrics["noise_kaiser_threshold"], color="green", linestyle="--", linewidth=1.0,
                       label="Kaiser (mean eigenvalue)")
            ax.axhline(la.metrics["damping"], color="grey", linestyle=":", linewidth=1.0, label="damping λ")
            _plain_log_axes(ax)
            ax.set_title(f"{label} | step {la.step}{_suffix(fa)}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", linestyle="--", linewidth=0.4)
            if row == 1:
                ax.set_xlabel("eigenvalue index (descending)")
            if col == 0:
                ax.set_ylabel("eigenvalue")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Eigenvalue spectra with/without off-diagonal noise: {layer}", fontsize=10)
    return fig


def fft_figure(layer: str, analyses: Sequence[LayerAnalysis]):
    fig, axes = _grid(4, len(analyses))
    rows = (("H", "H", False), ("H", "H + noise", True), ("S", "S", False), ("S", "S + noise", True))
    for row, (key, label, noisy) in enumerate(rows):
        factors: list[FactorAnalysis] = [getattr(la, key) for la in analyses]
        spectra = [_np(fft_magnitude_db(fa.noisy_matrix() if noisy else fa.block.matrix)) for fa in factors]
        norm = Normalize(vmin=min(float(x.min()) for x in spectra), vmax=max(float(x.max()) for x in spectra))
        for col, (la, fa, spec) in enumerate(zip(analyses, factors, spectra)):
            ax = axes[row, col]
            img = ax.imshow(spec, cmap="hot", norm=norm, extent=(-np.pi, np.pi, -np.pi, np.pi))
            ax.set_title(f"{label} | step {la.step}{_suffix(fa)}", fontsize=9)
            _few_ticks(ax)
            if noisy:
                ax.set_xlabel(f"SNR (Eq. 7): {fa.metrics['snr_db']:.2f} dB", fontsize=9, fontweight="bold")
        _row_colorbar(fig, axes[row], img, "dB")
    fig.suptitle(f"|FFT| in dB of the factors and their noisy versions: {layer}", fontsize=10)
    return fig


def heatmap_figure(layer: str, analyses: Sequence[LayerAnalysis]):
    fig, axes = _grid(2, len(analyses))
    for row, (key, label) in enumerate(FACTORS):
        factors: list[FactorAnalysis] = [getattr(la, key) for la in analyses]
        logs = []
        for fa in factors:
            mat = np.abs(_np(fa.block.matrix))
            logs.append(np.log10(mat + max(float(mat.max()), 1e-300) * 1e-12))
        norm = Normalize(vmin=min(float(x.min()) for x in logs), vmax=max(float(x.max()) for x in logs))
        for col, (la, fa, lg) in enumerate(zip(analyses, factors, logs)):
            ax = axes[row, col]
            img = ax.imshow(lg, cmap="viridis", norm=norm)
            ax.set_title(f"{label} | step {la.step}{_suffix(fa)}", fontsize=9)
            _few_ticks(ax)
        _row_colorbar(fig, axes[row], img, f"log10 |{label}|")
    fig.suptitle(f"Kronecker factors (log10 |entries|): {layer}", fontsize=10)
    return fig


FIGURES = {
    "gershgorin": gershgorin_figure,
    "spectrum": spectrum_figure,
    "fft": fft_figure,
    "heatmap": heatmap_figure,
}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "layer"


def write_layer_figures(layer: str, analyses: Sequence[LayerAnalysis], out_dir: Path) -> list[Path]:
    """All four figures of one layer (analyses of the same layer, one per step, sorted by step)."""
    ordered = sorted(analyses, key=lambda a: a.step)
    written: list[Path] = []
    for kind, make in FIGURES.items():
        written += save_figure(make(layer, ordered), out_dir / f"{kind}_{_slug(layer)}", dpi=100)
    return written
