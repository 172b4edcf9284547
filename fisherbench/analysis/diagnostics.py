"""Diagnostics of Kronecker factors (AdaFisher paper §3.1 and Appendix A.1, plus damping checks).

Every function takes a factor as a `Block`: the analysed matrix (the full factor, or a random principal
sub-block of a wide one), the factor's FULL diagonal, and the sampled indices. A plain square tensor is
accepted wherever a `Block` is (it is the full factor). For a sampled block, quantities that sum over
off-diagonal entries are extrapolated to the full factor with the unbiased scale `n(n-1) / (k(k-1))`
(a random k-subset of n indices contains each off-diagonal pair with probability k(k-1)/(n(n-1))), and
Gershgorin radii with `(n-1)/(k-1)`; eigenvalues are those of the sub-block.

Definitions (n = dimension, M = factor, M~ = M + E with E symmetric, zero diagonal, E_ij ~ N(0, sigma^2)):
* diagonal-energy ratio: sum_i M_ii^2 / ||M||_F^2 (1 for a diagonal matrix, ~1/n for a dense one).
* SNR (paper Eq. 7): 10 log10( sum_i |M_ii|^2 / sum_{i<j} |M~_ij|^2 ). The paper applies it to the factor
  and its noisy version, as does the official analysis notebook; the FFT of Eq. 6 is only shown next to it
  (`fft_magnitude_db`). `snr_db_noise_free` uses M itself: the absolute sigma swamps factors whose entries
  are far below it (e.g. convolution S from mean-loss gradients). The notebook's code uses means instead
  of sums (`snr_db_notebook`), which adds 10 log10(n) dB (mean over n diagonal entries vs. over all n^2
  entries of triu(M~, 1)).
* Gershgorin discs: centre M_ii, radius R_i = sum_{j != i} |M_ij|; a row is diagonally dominant (its disc
  excludes 0) when |M_ii| > R_i.
* Kaiser criterion: eigenvalues above the mean eigenvalue (= 1 for a correlation matrix, the notebook's line).
* diagonal-approximation error of the Kronecker block: ||diag(H) (x) diag(S) - H (x) S||_F / ||H (x) S||_F,
  from ||A (x) B||_F = ||A||_F ||B||_F and <A (x) B, C (x) D> = <A, C><B, D>; with <diag(M), M> =
  sum_i M_ii^2 it equals sqrt(1 - r_H r_S) for the diagonal-energy ratios r.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor

from fisherbench.optim.adafisher.stats import fold_coefficients, minmax

DEFAULT_SIGMA = 1e-3  # the paper's off-diagonal noise level
DEFAULT_DAMPING = 1e-3  # AdaFisher's lambda


@dataclass(frozen=True)
class Block:
    """A factor as analysed: `matrix` (k x k), the full `diag` (n,), and `index` (k,) into it (None: k == n)."""

    matrix: Tensor
    diag: Tensor
    index: Optional[Tensor] = None

    @property
    def n(self) -> int:
        return int(self.diag.numel())

    @property
    def k(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def sampled(self) -> bool:
        return self.k < self.n

    @property
    def pair_scale(self) -> float:
        """Sum over off-diagonal pairs of the block -> estimate of the sum over the full factor."""
        n, k = self.n, self.k
        return 1.0 if k == n or k < 2 else n * (n - 1) / (k * (k - 1))

    @property
    def row_scale(self) -> float:
        """Sum over the off-diagonal entries of one row of the block -> estimate over the full row."""
        n, k = self.n, self.k
        return 1.0 if k == n or k < 2 else (n - 1) / (k - 1)


BlockLike = Union[Block, Tensor]


def as_block(m: BlockLike) -> Block:
    if isinstance(m, Block):
        return m
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a factor must be a square matrix, got shape {tuple(m.shape)}")
    m = m.detach().to(torch.float64)
    return Block(m, torch.diagonal(m).clone())


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


# ------------------------------------------------------------------------------------------- energy
def energy_parts(m: BlockLike) -> tuple[float, float]:
    """(sum_i M_ii^2 over the full diagonal, sum_{i != j} M_ij^2 estimated for the full factor)."""
    b = as_block(m)
    mat = _f64(b.matrix)
    diag_sq = float(_f64(b.diag).square().sum())
    off_sq = float(mat.square().sum() - torch.diagonal(mat).square().sum())
    return diag_sq, max(off_sq, 0.0) * b.pair_scale


def diag_energy_ratio(m: BlockLike) -> float:
    """||diag M||^2 / ||M||_F^2 (nan for the zero matrix)."""
    d, o = energy_parts(m)
    return d / (d + o) if d + o > 0 else math.nan


# ---------------------------------------------------------------------------------- noise and SNR
def add_offdiag_noise(matrix: Tensor, sigma: float = DEFAULT_SIGMA, seed: int = 0) -> Tensor:
    """M + E with E symmetric, zero on the diagonal, E_ij = E_ji ~ N(0, sigma^2) (seeded, float64)."""
    mat = _f64(matrix)
    gen = torch.Generator().manual_seed(int(seed))
    e = torch.randn(mat.shape, generator=gen, dtype=torch.float64) * sigma
    e = torch.triu(e, diagonal=1)
    return mat + e + e.T


def snr_db(m: BlockLike, noisy: Tensor) -> float:
    """Paper Eq. 7: 10 log10( sum_i |M_ii|^2 / sum_{i<j} |M~_ij|^2 ), M~ = the noisy block (same indices)."""
    b = as_block(m)
    num = float(_f64(b.diag).square().sum())
    den = float(torch.triu(_f64(noisy), diagonal=1).square().sum()) * b.pair_scale
    if den == 0.0:
        return math.inf if num > 0 else math.nan
    if num == 0.0:
        return -math.inf
    return 10.0 * math.log10(num / den)


def snr_db_notebook(matrix: Tensor, noisy: Tensor) -> float:
    """The official analysis notebook's variant: means instead of sums (mean of M_ii^2 over n entries over
    the mean of triu(M~, 1)^2 over all n^2 entries, zeros included). Equals `snr_db` + 10 log10(n)."""
    mat, nz = _f64(matrix), _f64(noisy)
    num = float(torch.diagonal(mat).square().mean())
    den = float(torch.triu(nz, diagonal=1).square().mean())
    if den == 0.0:
        return math.inf if num > 0 else math.nan
    if num == 0.0:
        return -math.inf
    return 10.0 * math.log10(num / den)


def fft_magnitude_db(matrix: Tensor) -> Tensor:
    """20 log10 |F(M)| with the zero frequency centred (paper Eq. 6, Figure 7)."""
    f = torch.fft.fftshift(torch.fft.fft2(_f64(matrix)))
    return 20.0 * torch.log10(f.abs().clamp_min(1e-300))


# ------------------------------------------------------------------------------------- Gershgorin
def gershgorin(m: BlockLike) -> tuple[Tensor, Tensor]:
    """(centres M_ii, radii sum_{j != i} |M_ij|) for the rows of the block (radii extrapolated if sampled)."""
    b = as_block(m)
    mat = _f64(b.matrix)
    centres = torch.diagonal(mat).clone()
    radii = (mat.abs().sum(1) - centres.abs()).clamp_min(0.0) * b.row_scale
    return centres, radii


def gershgorin_summary(centres: Tensor, radii: Tensor) -> dict[str, float]:
    """Fraction of diagonally dominant rows (disc excludes 0) and the median radius / |centre|."""
    c = centres.abs()
    ratio = torch.where(c > 0, radii / c.clamp_min(1e-300), torch.full_like(radii, math.inf))
    return {
        "dominant_frac": float((c > radii).double().mean()),
        "median_radius_over_centre": float(ratio.median()),
    }


# ------------------------------------------------------------------------------------------ spectra
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK's symmetric eigensolver on one thread: its tridiagonal reduction gains little from threads
    and, on a machine whose cores are busy, multi-threaded spin-waiting made it ~60x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eigenvalues(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric matrix, ascending, float64 (the symmetric part is used)."""
    mat = _f64(matrix)
    with _one_thread():
        return torch.linalg.eigvalsh(0.5 * (mat + mat.T))


def perturbation_summary(eig: Tensor, eig_noisy: Tensor) -> dict[str, float]:
    """How far the noise moved the spectrum: max |shift|, and max relative shift of the eigenvalues above
    the Kaiser criterion (mean eigenvalue). Weyl: max |shift| <= ||E||_2."""
    shift = (eig_noisy - eig).abs()
    kaiser = float(eig.mean())
    above = eig > kaiser
    rel = float((shift[above] / eig[above].abs()).max()) if bool(above.any()) else math.nan
    return {
        "max_abs_shift": float(shift.max()),
        "kaiser_threshold": kaiser,
        "n_above_kaiser": int(above.sum()),
        "max_rel_shift_above_kaiser": rel,
    }


def fraction_above(values: Tensor, threshold: float) -> float:
    return float((values > threshold).double().mean()) if values.numel() else math.nan


def product_fraction_above(a: Tensor, b: Tensor, threshold: float) -> float:
    """Fraction of pairs (i, j) with a_i * b_j > threshold, for a, b >= 0 (negatives count as 0), without
    forming the outer product: the spectrum of A (x) B is {a_i b_j}."""
    a = _f64(a).clamp_min(0.0)
    b = torch.sort(_f64(b).clamp_min(0.0)).values
    if a.numel() == 0 or b.numel() == 0:
        return math.nan
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    need = threshold / a[a > 0]  # b_j must exceed this (a_i == 0 gives products 0, never above)
    count = (b.numel() - torch.searchsorted(b, need, right=True)).sum()
    return float(count) / (a.numel() * b.numel())


# --------------------------------------------------------------------- diagonal approximation error
def kron_diag_error_from_energies(h_diag_sq: float, h_off_sq: float, s_diag_sq: float, s_off_sq: float) -> float:
    """||diag(H)(x)diag(S) - H(x)S||_F / ||H(x)S||_F from the diagonal / off-diagonal energies of H and S.

    ||D_H(x)D_S||^2 = |D_H|^2 |D_S|^2, <D_H(x)D_S, H(x)S> = <D_H,H><D_S,S> = |D_H|^2 |D_S|^2 and
    ||H(x)S||^2 = ||H||^2 ||S||^2, so the squared numerator is ||H||^2||S||^2 - |D_H|^2 |D_S|^2.
    """
    h_sq, s_sq = h_diag_sq + h_off_sq, s_diag_sq + s_off_sq
    full = h_sq * s_sq
    if full == 0.0:
        return math.nan
    cross = h_diag_sq * s_diag_sq  # <D_H (x) D_S, H (x) S>, also ||D_H (x) D_S||^2
    num_sq = cross - 2.0 * cross + full
    return math.sqrt(max(num_sq, 0.0) / full)


def kron_diag_error(h: BlockLike, s: BlockLike) -> float:
    """Relative Frobenius error of the diagonal approximation of H (x) S, never forming the product."""
    return kron_diag_error_from_energies(*energy_parts(h), *energy_parts(s))


# ------------------------------------------------------------------------------- curvature vs damping
def steady_state_scale(variant: str = "default", gamma: float = 0.8) -> float:
    """Fixed point of AdaFisher's running average `x <- old*x + new*stat` for a constant statistic:
    new / (1 - old) (0.008/0.92 ~ 1/115 for the official coefficients, 1 for the paper's convex EMA)."""
    old, new = fold_coefficients(variant, gamma)
    return new / (1.0 - old)


def curvature_vs_damping(h: Tensor, s: Tensor, damping: float) -> dict[str, float]:
    """For AdaFisher's F[o, i] = S[o] H[i] + damping: the fraction of elements whose curvature term exceeds
    the damping, and the largest F / damping."""
    h, s = _f64(h).clamp_min(0.0), _f64(s).clamp_min(0.0)
    top = float(h.max() * s.max()) if h.numel() and s.numel() else math.nan
    return {"frac_above_damping": product_fraction_above(h, s, damping), "F_over_lambda_max": 1.0 + top / damping}


def official_state(diag: Tensor, variant: str = "default", gamma: float = 0.8, eps: float = 1e-6) -> Tensor:
    """The running diagonal state AdaFisher would settle at if this factor's diagonal were its statistic at
    every statistics step: steady_state_scale * minmax(diag) (min-max is scale free, so the conventions of
    the full factors (row means, gradient scaling) do not matter)."""
    return steady_state_scale(variant, gamma) * minmax(_f64(diag), eps)


# --------------------------------------------------------------------------------------- per factor
@dataclass
class FactorAnalysis:
    """All diagnostics of one factor: `metrics` (scalars for tables) and the arrays figures need."""

    block: Block
    metrics: dict[str, float]
    eig: Tensor
    eig_noisy: Tensor
    centres: Tensor
    radii: Tensor
    noise_seed: int
    sigma: float

    def noisy_matrix(self) -> Tensor:
        """The same noisy matrix the metrics used (regenerated from the seed, not stored)."""
        return add_offdiag_noise(self.block.matrix, self.sigma, self.noise_seed)


def analyse_factor(m: BlockLike, damping: float = DEFAULT_DAMPING, sigma: float = DEFAULT_SIGMA,
                   seed: int = 0) -> FactorAnalysis:
    b = as_block(m)
    noisy = add_offdiag_noise(b.matrix, sigma, seed)
    eig, eig_noisy = eigenvalues(b.matrix), eigenvalues(noisy)
    centres, radii = gershgorin(b)
    d_sq, o_sq = energy_parts(b)
    metrics: dict[str, float] = {
        "dim": b.n,
        "analysed_dim": b.k,
        "trace_over_dim": float(_f64(b.diag).sum()) / b.n,
        "diag_energy_ratio": d_sq / (d_sq + o_sq) if d_sq + o_sq > 0 else math.nan,
        "snr_db": snr_db(b, noisy),
        "snr_db_noise_free": snr_db(b, b.matrix),
        "snr_db_notebook": snr_db_notebook(b.matrix, noisy),
        "frac_eig_above_damping": fraction_above(eig, damping),
        "eig_max": float(eig.max()),
        "eig_min": float(eig.min()),
        **{f"gershgorin_{k}": v for k, v in gershgorin_summary(centres, radii).items()},
        **{f"noise_{k}": v for k, v in perturbation_summary(eig, eig_noisy).items()},
        "_diag_sq": d_sq,
        "_off_sq": o_sq,
    }
    return FactorAnalysis(b, metrics, eig, eig_noisy, centres, radii, seed, sigma)


@dataclass
class LayerAnalysis:
    """Diagnostics of one layer at one step: its two factors and the Kronecker-level numbers."""

    name: str
    kind: str
    step: int
    H: FactorAnalysis
    S: FactorAnalysis
    metrics: dict[str, float] = field(default_factory=dict)


def analyse_layer(name: str, kind: str, step: int, h: BlockLike, s: BlockLike, *,
                  damping: float = DEFAULT_DAMPING, sigma: float = DEFAULT_SIGMA, seed: int = 0,
                  variant: str = "default", gamma: float = 0.8,
                  state: Optional[tuple[Tensor, Tensor]] = None) -> LayerAnalysis:
    """Analyse H and S of one layer. `variant`/`gamma` choose the running average of the official-state
    estimate; `state` is AdaFisher's actual running (H_D, S_D) for this layer if the run had one."""
    fh = analyse_factor(h, damping, sigma, seed)
    fs = analyse_factor(s, damping, sigma, seed + 1)
    m: dict[str, Any] = {
        "kron_diag_error": kron_diag_error_from_energies(
            fh.metrics["_diag_sq"], fh.metrics["_off_sq"], fs.metrics["_diag_sq"], fs.metrics["_off_sq"]),
        "kron_frac_eig_above_damping": product_fraction_above(fh.eig, fs.eig, damping),
        "damping": damping,
    }
    official = curvature_vs_damping(official_state(fh.block.diag, variant, gamma),
                                    official_state(fs.block.diag, variant, gamma), damping)
    m.update({f"official_{k}": v for k, v in official.items()})
    if state is not None:
        m.update({f"state_{k}": v for k, v in curvature_vs_damping(state[0], state[1], damping).items()})
    return LayerAnalysis(name, kind, step, fh, fs, m)
