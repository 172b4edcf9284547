"""Figure conventions shared by every figure the suite writes (Fisher analysis, paper figures, reports)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def save_figure(fig, path_stem: Path, dpi: int = 130) -> list[Path]:
    """Write `fig` as `<path_stem>.png` and `.pdf` (vector, for papers), close it, return the paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        p = path_stem.with_suffix(f".{ext}")
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
        out.append(p)
    plt.close(fig)
    return out


def series_color(i: int, n: int = 10):
    """The i-th of n colours: tab10, or tab20 when there are more than ten lines (same colour per series)."""
    return plt.get_cmap("tab10")(i % 10) if n <= 10 else plt.get_cmap("tab20")(i % 20)
