"""Figures from the results store (matplotlib; each saved as PNG and PDF).

- `curves`: test error (or perplexity) and training loss against training time and against epochs, one line
  per optimizer with a band of ± one sample std (ddof=1) over seeds (paper Figs. 10-15, the WCT figures). The
  time axis is the budget clock (`train_s`: data, forward/backward, curvature work, steps; evaluation excluded), the
  quantity the WCT protocol equalises.
- `cost`: training seconds per epoch and peak memory per optimizer and network (Figs. 17-18).
- `stability`: Figure 5's four panels, for specs whose rows are tagged with `panel: batch_size | lr`.
- `fisher_spread`: min and max of F/λ over training for AdaFisher-family runs (1 = the damping dominates).
- `over_time`: one logged metric (e.g. validation accuracy) against training time, mean ± std over seeds per
  column, one panel per row, with the target line of a time-to-target report.
- `profile`: the performance profile ρ(τ) of a time-to-target report (`results.profiles`).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from fisherbench.analysis.plotting import save_figure as save
from fisherbench.analysis.plotting import series_color as _color
from fisherbench.core.scores import Target, is_fraction
from fisherbench.results.report import CellResult, TableResult, run_epoch_seconds, run_peak_memory


def _series(rows: list[dict[str, Any]], x_key: str, y_key: str, transform=None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in rows:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(transform(y) if transform else y))
    return np.asarray(xs), np.asarray(ys)


def band(series: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 100):
    """Mean and std over seeds on a common grid (each seed interpolated within its own range)."""
    series = [(x, y) for x, y in series if len(x) > 0]
    if not series:
        return None
    hi = max(float(x.max()) for x, _ in series)
    lo = min(float(x.min()) for x, _ in series)
    if len(series) == 1 or hi <= lo:
        x, y = series[0]
        return x, y, np.zeros_like(y)
    grid = np.linspace(lo, hi, points)
    stack = np.full((len(series), points), np.nan)
    for i, (x, y) in enumerate(series):
        order = np.argsort(x)
        x, y = x[order], y[order]
        inside = (grid >= x[0]) & (grid <= x[-1])
        stack[i, inside] = np.interp(grid[inside], x, y)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stack, axis=0)
            # sample std (ddof=1) where two or more seeds cover the point; 0 where only one does (no spread)
            covered = np.sum(~np.isnan(stack), axis=0)
            std = np.where(covered > 1, np.nanstd(stack, axis=0, ddof=1), 0.0)
    keep = ~np.isnan(mean)
    return grid[keep], mean[keep], std[keep]


def band_by_eval(series: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Mean and std over seeds evaluation by evaluation (x: the mean time of each evaluation), when every seed
    has the same number of evaluations (the same schedule); otherwise `band` on a common grid. Averaging by
    evaluation avoids the jumps a common time grid makes where one seed's time range starts or ends."""
    series = [(x, y) for x, y in series if len(x) > 0]
    if not series:
        return None
    if len({len(x) for x, _ in series}) == 1:
        xs, ys = np.stack([x for x, _ in series]), np.stack([y for _, y in series])
        std = ys.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros(ys.shape[1])  # sample std, as every table
        return xs.mean(axis=0), ys.mean(axis=0), std
    return band(series)


def _test_quantity(task_is_lm: bool) -> tuple[str, str, Any]:
    if task_is_lm:
        return "test/ppl", "test perplexity", None
    return "test/acc1", "test error (%)", lambda a: 100.0 * (1.0 - a)


def _is_lm(t: TableResult) -> bool:
    return (t.metric.key or "").endswith("ppl")


def curves(t: TableResult, out_dir: Path, name: str = "wct") -> list[Path]:
    """Per row: training loss and test error against training time and against epochs, seed bands."""
    rows = [r for r in t.rows if any((c := t.cell(r, col)) and c.seeds for col in t.columns)]
    if not rows:
        return []
    test_key, test_label, test_tf = _test_quantity(_is_lm(t))
    panels = [("train_s", "train/loss", "training time (s)", "training loss", None),
              ("train_s", test_key, "training time (s)", test_label, test_tf),
              ("epoch", "train/loss", "epoch", "training loss", None),
              ("epoch", test_key, "epoch", test_label, test_tf)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(16, 3.2 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, (xk, yk, xl, yl, tf) in enumerate(panels):
            ax = axes[i][j]
            for k, col in enumerate(t.columns):
                c = t.cell(row, col)
                if c is None or not c.seeds:
                    continue
                b = band([_series(s.run.rows(), xk, yk, tf) for s in c.seeds])
                if b is None:
                    continue
                x, m, sd = b
                ax.plot(x, m, color=_color(k, len(t.columns)), label=col, lw=1.4)
                ax.fill_between(x, m - sd, m + sd, color=_color(k, len(t.columns)), alpha=0.2, lw=0)
            ax.set_yscale("log")  # losses, errors and perplexities span decades
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_title(row, loc="left", fontsize=10)
        axes[i][1].legend(fontsize=7, ncol=2 if len(t.columns) > 5 else 1)
    fig.suptitle(f"{t.spec.title}\nmean ± std over seeds", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir / name)


def cost(t: TableResult, out_dir: Path, name: str = "cost") -> list[Path]:
    """Grouped bars: training seconds per epoch and peak memory, per row (network) and column (optimizer)."""
    cells = [[t.cell(r, c) for c in t.columns] for r in t.rows]
    secs = np.array([[(c.mean_of(run_epoch_seconds) if c else None) or np.nan for c in row] for row in cells])
    mem = np.array([[(c.mean_of(run_peak_memory) if c else None) or np.nan for c in row] for row in cells]) / 2**30
    if np.all(np.isnan(secs)) and np.all(np.isnan(mem)):
        return []
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(t.rows) * 2 + 4), 4))
    width = 0.8 / max(1, len(t.columns))
    x = np.arange(len(t.rows))
    for ax, data, label in ((axes[0], secs, "training seconds per epoch"), (axes[1], mem, "peak memory (GiB)")):
        for k, col in enumerate(t.columns):
            ax.bar(x + (k - (len(t.columns) - 1) / 2) * width, np.nan_to_num(data[:, k]), width, label=col,
                   color=_color(k, len(t.columns)))
        ax.set_xticks(x, t.rows, rotation=20 if len(t.rows) > 3 else 0, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, ncol=min(7, len(t.columns)), loc="lower center",
               bbox_to_anchor=(0.5, -0.02 - 0.04 * math.ceil(len(t.columns) / 7)))
    fig.suptitle(f"{t.spec.title}: cost per epoch (peak memory: CUDA max allocated; on CPU the process peak RSS)",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir / name)


def _panels(c: CellResult) -> list[str]:
    p = c.tags.get("panel")
    return list(p) if isinstance(p, (list, tuple)) else ([p] if p else [])


def _config_value(c: CellResult, dotted: str) -> Optional[float]:
    for s in c.seeds:
        node: Any = s.run.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            return float(node)
    return None


def stability(t: TableResult, out_dir: Path, name: str = "stability") -> list[Path]:
    """Figure 5: (A) metric vs batch size, (B) vs learning rate, (C) vs seconds per epoch, (D) seconds per epoch
    at the default batch size (the row tagged with both panels)."""
    if not any(_panels(c) for c in t.cells):
        return []
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    markers = "osv^D<>p*h"
    for k, col in enumerate(t.columns):
        color = _color(k, len(t.columns))
        cells = [c for c in t.cells if c.column == col and c.mean is not None]
        bs = sorted(((_config_value(c, "data.batch_size"), c) for c in cells if "batch_size" in _panels(c)),
                    key=lambda p: p[0] or 0)
        lr = sorted(((_config_value(c, "optimizer.lr"), c) for c in cells if "lr" in _panels(c)),
                    key=lambda p: p[0] or 0)
        if bs:
            axes[0].errorbar([b for b, _ in bs], [c.mean for _, c in bs], [c.std or 0.0 for _, c in bs], color=color,
                             marker="o", label=col, capsize=2)
            for j, (b, c) in enumerate(bs):
                sec = c.mean_of(run_epoch_seconds)
                if sec is not None:
                    axes[2].scatter(sec, c.mean, color=color, marker=markers[j % len(markers)],
                                    label=f"batch {int(b)}" if k == 0 else None)
            # the row on both panels is the recipe's own setting (batch 256 in Figure 5)
            default = [c for _, c in bs if {"batch_size", "lr"} <= set(_panels(c))]
            if default and default[0].mean_of(run_epoch_seconds) is not None:
                axes[3].bar(k, default[0].mean_of(run_epoch_seconds), color=color)
        if lr:
            axes[1].errorbar([x for x, _ in lr], [c.mean for _, c in lr], [c.std or 0.0 for _, c in lr], color=color,
                             marker="o", label=col, capsize=2)
    axes[0].set(xscale="log", xlabel="batch size", ylabel=t.metric.label, title="(A) batch size")
    axes[0].set_xscale("log", base=2)
    axes[1].set(xscale="log", xlabel="learning rate", ylabel=t.metric.label, title="(B) learning rate")
    axes[2].set(xlabel="training seconds per epoch", ylabel=t.metric.label, title="(C) accuracy vs epoch time")
    axes[3].set_xticks(range(len(t.columns)), t.columns, rotation=30, fontsize=8)
    axes[3].set(ylabel="training seconds per epoch", title="(D) epoch time, default batch size")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(t.spec.title, fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir / name)


def fisher_spread(t: TableResult, out_dir: Path, name: str = "fisher_spread") -> list[Path]:
    """Min and max of F/λ over all tracked parameters against epochs, for every cell that logged them."""
    lo_key, hi_key = "opt/F_over_lambda_min", "opt/F_over_lambda_max"
    cells = [c for c in t.cells if any(any(lo_key in r for r in s.run.rows()) for s in c.seeds)]
    if not cells:
        return []
    fig, axes = plt.subplots(1, len(t.rows), figsize=(5 * len(t.rows), 3.5), squeeze=False)
    for i, row in enumerate(t.rows):
        ax = axes[0][i]
        for k, col in enumerate(t.columns):
            c = next((c for c in cells if c.row == row and c.column == col), None)
            if c is None:
                continue
            lo = band([_series(s.run.rows(), "epoch", lo_key) for s in c.seeds])
            hi = band([_series(s.run.rows(), "epoch", hi_key) for s in c.seeds])
            if lo is None or hi is None:
                continue
            ax.plot(lo[0], lo[1], color=_color(k, len(t.columns)), lw=1, ls="--")
            ax.plot(hi[0], hi[1], color=_color(k, len(t.columns)), lw=1.4, label=f"{col} (max; dashed: min)")
            if len(lo[0]) == len(hi[0]):
                ax.fill_between(hi[0], lo[1], hi[1], color=_color(k, len(t.columns)), alpha=0.15, lw=0)
        ax.set(xlabel="epoch", ylabel="F / λ", title=row)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{t.spec.title}: spread of the preconditioner F/λ (1 = damping dominates)", fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir / name)


def over_time(t: TableResult, key: str, out_dir: Path, target: Optional[Target] = None,
              name: str = "over_time", clock: str = "train_s") -> list[Path]:
    """`key` (accuracies in %) against budget-clock training time: per row a panel, per column the mean over
    seeds with a ± one std band; the target as a dashed line."""
    rows = [r for r in t.rows if any((c := t.cell(r, col)) and c.seeds for col in t.columns)]
    if not rows:
        return []
    tf = (lambda a: 100.0 * a) if is_fraction(key) else None
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.8), squeeze=False)
    drawn = False
    for i, row in enumerate(rows):
        ax = axes[0][i]
        for k, col in enumerate(t.columns):
            c = t.cell(row, col)
            if c is None or not c.seeds:
                continue
            series = [xy for s in c.seeds if len((xy := _series(s.run.rows(), clock, key, tf))[0])]
            b = band_by_eval(series)
            if b is None:
                continue
            x, m, sd = b
            color = _color(k, len(t.columns))
            for sx, sy in series:  # each seed, thin: the band alone hides how few runs it summarises
                ax.plot(sx, sy, color=color, lw=0.6, alpha=0.35)
            ax.plot(x, m, color=color, label=f"{col} ({len(series)} seed{'s' if len(series) != 1 else ''})", lw=1.6,
                    marker="o" if len(x) < 12 else None, ms=3)
            ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.2, lw=0)
            drawn = True
        if target is not None and target.key == key:
            ax.axhline(target.threshold * (100.0 if tf else 1.0), color="k", ls="--", lw=0.8,
                       label=f"target {target.text}")
        ax.set(xlabel="training time (s, budget clock)", ylabel=key + (" (%)" if tf else ""), title=row)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return []
    fig.suptitle(f"{t.spec.title}\n{key} vs training time: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir / name)


def profile(p: Any, out_dir: Path, name: str = "profile") -> list[Path]:
    """Performance profile (a `results.profiles.Profile`): ρ_s(τ) against τ, one step line per optimizer."""
    if not p.problems or not p.solvers:
        return []
    finite = [r for prob in p.problems for s in p.solvers if math.isfinite(r := p.ratio(prob, s))]
    hi = max([p.tau_max, *finite]) * 1.05
    taus = np.unique(np.concatenate([[1.0, hi], np.asarray(finite, dtype=float)]))
    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(p.solvers)
    for k, s in enumerate(p.solvers):
        # profiles often coincide: earlier lines wider and each its own dash pattern, so none hides another
        ax.step(taus, p.curve(s, taus), where="post", color=_color(k, n), lw=1.2 + 2.4 * (n - 1 - k) / max(1, n - 1),
                ls=("-", "--", "-.", ":")[k % 4], label=f"{s} (score {p.score(s):.2f})")
    ax.axvline(p.tau_max, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlim=(1, hi), ylim=(-0.03, 1.08), xlabel="τ (time-to-target ratio to the fastest)",
           ylabel="fraction of problems within τ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Performance profile: time to {p.target.text} over {len(p.problems)} problem(s)", fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir / name)


def all_figures(t: TableResult, out_dir: Path) -> list[Path]:
    paths: list[Path] = []
    for fn in (curves, cost, stability, fisher_spread):
        paths += fn(t, out_dir)
    return paths
