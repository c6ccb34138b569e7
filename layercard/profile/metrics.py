"""Per-module Layer Card maths from streaming sufficient statistics (docs/design.md §1).

Everything here is a small pure function on the statistics of one linear module:

* ``A = XᵀX``  (d_in × d_in, Gram matrix of the module's inputs, summed over n tokens)
* ``C = XᵀG``  (d_in × d_out, the transposed weight gradient)
* ``gg = ‖G‖²_F``, ``n`` (number of tokens / rows of X).

Inputs may be any float dtype (or numpy arrays); all maths is done in float64 and scalar
results are python floats. ``ridge`` is always *relative*: λ = ridge · tr(A) / d_in.

Numerical rank convention: an eigenvalue μ_i of A (after clamping at 0) is treated as zero when
μ_i + λ <= tol with tol = max(μ) · d_in · eps64 (the numpy ``matrix_rank`` rule). Such
directions are dropped (pseudo-inverse), so a singular A at λ = 0 gives the projected residual
‖P_X G‖²_F and never NaN/Inf.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ridge_lambda",
    "eig_psd",
    "whitened_gradient",
    "resnorm",
    "best_rank_r_update",
    "spectrum",
    "noise_variance",
    "gain_adj",
    "rank_r_noise",
    "gain_adj_rank_r",
    "module_metrics",
]

_F64 = torch.float64
_EPS = float(np.finfo(np.float64).eps)


def _f64(x) -> Tensor:
    """Any array-like → float64 torch tensor (device kept)."""
    return torch.as_tensor(x).to(_F64)


def _tol(mu: Tensor) -> float:
    """Zero threshold for eigenvalues mu (length d_in) of a PSD matrix: max(mu)·d_in·eps64."""
    if mu.numel() == 0:
        return 0.0
    return float(mu.max()) * mu.numel() * _EPS


def ridge_lambda(A: Tensor, ridge: float) -> float:
    """Absolute ridge λ = ridge · tr(A) / d_in (same units as A's entries). ridge=0 → λ=0."""
    A = _f64(A)
    d_in = A.shape[0]
    if d_in == 0 or ridge == 0:
        return 0.0
    return float(ridge) * float(torch.diagonal(A).sum()) / d_in


def eig_psd(A: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the PSD matrix A (d_in × d_in) in float64.

    Returns (mu, V): mu (d_in,) ascending eigenvalues of ½(A + Aᵀ) clamped at >= 0, and V
    (d_in × d_in) orthonormal eigenvectors (columns). Never NaN for finite A (A = 0 gives mu = 0).
    """
    A = _f64(A)
    S = 0.5 * (A + A.T)
    mu, V = torch.linalg.eigh(S)
    return mu.clamp(min=0.0), V


def _inv_sqrt_scale(mu: Tensor, lam: float) -> Tensor:
    """(mu + λ)^{-1/2} per eigen-direction, 0 where mu + λ <= tol (dropped, pseudo-inverse)."""
    s = mu + lam
    keep = s > _tol(mu)
    out = torch.zeros_like(s)
    out[keep] = s[keep].rsqrt()
    return out


def whitened_gradient(A: Tensor, C: Tensor, ridge: float, eig=None) -> Tensor:
    """M = (A + λI)^{-1/2} C, shape d_in × d_out (units of C / sqrt(units of A)).

    Symmetric inverse square root via eigh; directions with μ_i + λ <= tol are dropped, so at
    λ = 0 with singular A, ‖M‖²_F = ‖P_X G‖²_F. ``eig`` = (mu, V) from :func:`eig_psd` (A) lets
    callers share one eigh between modules that read the same input.
    """
    mu, V = eig if eig is not None else eig_psd(A)
    C = _f64(C).to(V.device)
    w = _inv_sqrt_scale(mu, ridge_lambda(A, ridge))
    return V @ (w[:, None] * (V.T @ C))


def resnorm(A: Tensor, C: Tensor, gg: float, ridge: float, rank: int, eig=None) -> dict:
    """Resnorm quantities for one module (all python floats, units of gg = ‖G‖²_F).

    res2        = ‖M‖²_F = tr(Cᵀ(A+λI)⁻¹C): twice the best ridge local-loss decrease.
    res2_rank_r = Σ_{i<=rank} σ_i(M)²: the same for a rank-``rank`` adapter.
    res_frac    = res2 / gg (0 when gg == 0), in [0, 1].
    grad_norm   = ‖C‖_F (Frobenius norm of the weight gradient).
    """
    M = whitened_gradient(A, C, ridge, eig)
    sv = torch.linalg.svdvals(M) if M.numel() else M.new_zeros(0)
    res2 = float((sv**2).sum())
    res2_r = float((sv[: max(int(rank), 0)] ** 2).sum())
    gg = float(gg)
    return {
        "res2": res2,
        "res2_rank_r": res2_r,
        "res_frac": res2 / gg if gg > 0 else 0.0,
        "grad_norm": float(torch.linalg.norm(_f64(C))),
    }


def best_rank_r_update(A: Tensor, C: Tensor, ridge: float, rank: int, eig=None) -> Tensor:
    """Δ* (d_out × d_in) minimising ½‖XΔᵀ + G‖²_F + ½λ‖Δ‖²_F over rank(Δ) <= ``rank``.

    With D = Δᵀ the objective is ½tr(Dᵀ(A+λI)D) + tr(DᵀC) + ½gg; substituting
    E = (A+λI)^{1/2} D gives ½‖E + M‖² − ½‖M‖² + ½gg, minimised over rank-r E by
    E = −[M]_r (truncated SVD). Hence D = −(A+λI)^{-1/2}[M]_r, and the objective at Δ* is
    ½gg − ½ res2_rank_r. Dropped (null) directions of A get no update.
    """
    mu, V = eig if eig is not None else eig_psd(A)
    w = _inv_sqrt_scale(mu, ridge_lambda(A, ridge))
    M = V @ (w[:, None] * (V.T @ _f64(C).to(V.device)))
    r = max(int(rank), 0)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    Mr = (U[:, :r] * S[:r]) @ Vh[:r]
    D = -(V @ (w[:, None] * (V.T @ Mr)))
    return D.T.contiguous()


def spectrum(A: Tensor, n: int, ridge: float, eig=None) -> dict:
    """Activation-energy quantities of Σ = A / n (python floats; μ in units of X entries²).

    μ = eigenvalues of Σ clamped >= 0, with μ_i <= max(μ)·d_in·eps64 set to 0 (numerical rank);
    λ' = ridge · tr(Σ) / d_in.
      energy = tr Σ;  mu_max, mu_min;
      kappa  = (μ_max + λ') / (μ_min + λ'); math.inf when the denominator is 0
               (ridge = 0 with singular Σ, or Σ = 0) — finite whenever ridge > 0 and Σ ≠ 0;
      erank  = exp(H(μ / Σμ)) with 0·log0 = 0 (0 for Σ = 0);
      d_eff  = Σ μ_i / (μ_i + λ') (terms with μ_i + λ' = 0 count 0; at λ' = 0 the numerical rank).
    ``n`` <= 0 is treated as 1. ``eig`` = eig_psd(A) (of A, not Σ).
    """
    mu_A, _ = eig if eig is not None else eig_psd(A)
    scale = 1.0 / n if n > 0 else 1.0
    mu = torch.where(mu_A > _tol(mu_A), mu_A, torch.zeros_like(mu_A)) * scale
    lam = ridge_lambda(A, ridge) * scale
    energy = float(torch.diagonal(_f64(A)).sum()) * scale
    if mu.numel() == 0:
        return {"energy": 0.0, "mu_max": 0.0, "mu_min": 0.0, "kappa": math.inf,
                "erank": 0.0, "d_eff": 0.0}
    mu_max, mu_min = float(mu.max()), float(mu.min())
    den = mu_min + lam
    kappa = (mu_max + lam) / den if den > 0 else math.inf
    tot = float(mu.sum())
    if tot > 0:
        p = mu[mu > 0] / tot
        erank = math.exp(float(-(p * p.log()).sum()))
    else:
        erank = 0.0
    s = mu + lam
    pos = s > 0
    d_eff = float((mu[pos] / s[pos]).sum())
    return {"energy": energy, "mu_max": mu_max, "mu_min": mu_min, "kappa": kappa,
            "erank": erank, "d_eff": d_eff}


def noise_variance(res2: float, gg: float, n: int, d_out: int, d_eff: float) -> float:
    """Per-entry noise variance of G, s² = (gg − res2) / max(d_out · (n − d_eff), 1), clipped at 0:
    the unfit residual over its degrees of freedom (see :func:`gain_adj`)."""
    return max(float(gg) - float(res2), 0.0) / max(d_out * (n - d_eff), 1.0)


def gain_adj(res2: float, gg: float, n: int, d_out: int, d_eff: float) -> float:
    """Noise-adjusted gain of the full-rank ridge update (units of loss, like ½res2).

        s²       = (gg − res2) / max(d_out · (n − d_eff), 1)
        gain_adj = ½ · max(res2 − s² · d_out · d_eff, 0)

    Why: with H = X(A+λI)⁻¹Xᵀ (the ridge hat matrix, tr H = d_eff), res2 = tr(GᵀHG) and
    gg − res2 = tr(Gᵀ(I−H)G). If G has i.i.d. noise of variance s² per entry, the noise puts
    s²·d_out·tr H = s²·d_out·d_eff into res2 (docs/design.md §1: ill-conditioned / high-d_eff modules
    "fit" more noise) and s²·d_out·(n − d_eff) into the part the adapter cannot fit. So the
    unfit residual divided by its degrees of freedom d_out·(n − d_eff) is the usual unbiased
    regression estimate of s² (the max(·, 1) guards n <= d_eff). Subtracting the expected
    noise share from res2 leaves the signal part; ½ turns it into a local-loss decrease, and
    the outer max clips estimates that noise alone explains to 0. s² is clipped at >= 0.
    """
    s2 = noise_variance(res2, gg, n, d_out, d_eff)
    return 0.5 * max(float(res2) - s2 * d_out * d_eff, 0.0)


def rank_r_noise(s2: float, d_out: int, d_eff: float, rank: int) -> float:
    """Noise a rank-r fit captures: r · s² · (√d_eff + √d_out)², at most the full s² · d_out · d_eff.

    The noise part of M = (A+λI)^{-1/2} C behaves like a d_eff × d_out matrix of i.i.d. entries of
    variance s² (its squared Frobenius norm is s²·d_out·d_eff, the full-rank noise of
    :func:`gain_adj`). A rank-r truncation keeps its r largest squared singular values, each at the
    bulk edge s²(√d_eff + √d_out)² (Bai–Yin / Marchenko–Pastur); r = min(d_out, d_eff) recovers the
    full-rank figure."""
    return min(rank * s2 * (math.sqrt(max(d_eff, 0.0)) + math.sqrt(d_out)) ** 2, s2 * d_out * d_eff)


def gain_adj_rank_r(res2_rank_r: float, res2: float, gg: float, n: int, d_out: int, d_eff: float,
                    rank: int) -> float:
    """Noise-adjusted gain of the best *rank-r* update, the adapter actually trained (docs/design.md §1's
    Res²_r "matches the LoRA rank"):  ½ · max(res2_rank_r − rank_r_noise(s², d_out, d_eff, r), 0),
    with s² from :func:`noise_variance`. A full-rank fit of n tokens in d_eff dimensions absorbs
    s²·d_out·d_eff of noise; a rank-r adapter only the noise along its r directions, about
    r·(√d_eff+√d_out)² / (d_eff·d_out) of it (≈ 7 % for r = 8 on a 576 × 576 module)."""
    s2 = noise_variance(res2, gg, n, d_out, d_eff)
    return 0.5 * max(float(res2_rank_r) - rank_r_noise(s2, d_out, d_eff, rank), 0.0)


def module_metrics(A: Tensor, C: Tensor, gg: float, n: int, ridge: float, rank: int,
                   d_out: int, eig=None) -> dict:
    """All per-module card numbers with ONE eigh of A: the union of :func:`resnorm`,
    :func:`spectrum`, ``gain_adj`` and ``gain_adj_rank_r`` (keys res2, res2_rank_r, res_frac,
    grad_norm, energy, mu_max, mu_min, kappa, erank, d_eff, gain_adj, gain_adj_rank_r).
    Shapes: A d_in×d_in, C d_in×d_out.
    """
    eig = eig if eig is not None else eig_psd(A)
    out = resnorm(A, C, gg, ridge, rank, eig)
    out.update(spectrum(A, n, ridge, eig))
    out["gain_adj"] = gain_adj(out["res2"], gg, n, d_out, out["d_eff"])
    out["gain_adj_rank_r"] = gain_adj_rank_r(out["res2_rank_r"], out["res2"], gg, n, d_out, out["d_eff"], rank)
    return out
