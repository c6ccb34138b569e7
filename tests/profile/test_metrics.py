"""Float64 brute-force reference tests for layercard.profile.metrics (docs/design.md §1).

References are computed in numpy directly from X (n × d_in) and G (n × d_out), independently of
the eigh route used by the library.
"""

import math

import numpy as np
import pytest
import torch

from layercard.profile import metrics as lm

RIDGES = [1e-4, 1e-2, 0.1, 1.0, 10.0]


def make(n=200, d_in=16, d_out=12, seed=0, cond=True):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d_in))
    if cond:  # anisotropic features, like real activations
        X = X * np.logspace(0, -1.5, d_in)[None, :] + 0.3 * X[:, :1]
    G = rng.standard_normal((n, d_out))
    return X, G


def stats(X, G):
    return torch.tensor(X.T @ X), torch.tensor(X.T @ G), float((G**2).sum())


def abs_lam(X, ridge):
    return ridge * np.trace(X.T @ X) / X.shape[1]


def projector(X):
    """Orthogonal projector onto col(X) from an SVD with an explicit rank threshold."""
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    r = int((s > s[0] * max(X.shape) * np.finfo(float).eps).sum())
    return U[:, :r] @ U[:, :r].T


def rr_gain(X, G, lam, r):
    """Best reduced-rank gain Σ top-r σ² via the augmented least-squares problem
    [X; √λ I] Δᵀ ≈ −[G; 0] (λ > 0) or P_X G (λ = 0), independent of the library route."""
    if lam > 0:
        d = X.shape[1]
        Xa = np.vstack([X, math.sqrt(lam) * np.eye(d)])
        Ga = np.vstack([G, np.zeros((d, G.shape[1]))])
        Q, _ = np.linalg.qr(Xa)
        PG = Q @ (Q.T @ Ga)
    else:
        PG = projector(X) @ G
    s = np.linalg.svd(PG, compute_uv=False)
    return float((s[:r] ** 2).sum()), float((s**2).sum())


def objective(X, G, lam, Delta):
    return 0.5 * np.sum((X @ Delta.T + G) ** 2) + 0.5 * lam * np.sum(Delta**2)


# ---------------------------------------------------------------- ridge / eig


def test_ridge_lambda_and_eig_psd():
    X, _ = make()
    A = torch.tensor(X.T @ X)
    assert lm.ridge_lambda(A, 0.3) == pytest.approx(abs_lam(X, 0.3), rel=1e-12)
    assert lm.ridge_lambda(A, 0.0) == 0.0
    mu, V = lm.eig_psd(A.float())  # any float dtype in, float64 out
    assert mu.dtype == torch.float64 and V.dtype == torch.float64
    assert torch.all(mu[1:] >= mu[:-1]) and torch.all(mu >= 0)
    mu0, V0 = lm.eig_psd(torch.zeros(5, 5))
    assert torch.all(mu0 == 0) and torch.isfinite(V0).all()
    # rank-deficient, with slightly negative round-off eigenvalues → clamped, no NaN
    Xr = np.random.default_rng(1).standard_normal((3, 10))
    mur, _ = lm.eig_psd(torch.tensor(Xr.T @ Xr))
    assert torch.all(mur >= 0) and torch.isfinite(mur).all()


# ---------------------------------------------------------------- resnorm


@pytest.mark.parametrize("ridge", RIDGES)
def test_res2_matches_solve(ridge):
    X, G = make(seed=2)
    A, C, gg = stats(X, G)
    lam = abs_lam(X, ridge)
    ref = np.trace(G.T @ X @ np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ G))
    out = lm.resnorm(A, C, gg, ridge, rank=4)
    assert out["res2"] == pytest.approx(ref, rel=1e-10)
    assert out["res_frac"] == pytest.approx(ref / gg, rel=1e-10)
    assert 0 <= out["res_frac"] <= 1
    assert out["grad_norm"] == pytest.approx(np.linalg.norm(X.T @ G), rel=1e-12)
    # the ridge correction really lowers the local loss by ½ res2
    D = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), -(X.T @ G))
    assert objective(X, G, lam, D.T) == pytest.approx(0.5 * gg - 0.5 * ref, rel=1e-10)


def test_res2_lambda0_full_rank_is_projection():
    X, G = make(n=120, d_in=20, d_out=7, seed=3)
    A, C, gg = stats(X, G)
    B, *_ = np.linalg.lstsq(X, G, rcond=None)
    proj = np.sum((X @ B) ** 2)
    out = lm.resnorm(A, C, gg, 0.0, rank=3)
    assert out["res2"] == pytest.approx(proj, rel=1e-10)
    # M itself equals (XᵀX)^{-1/2} XᵀG computed with numpy's eigh
    w, V = np.linalg.eigh(X.T @ X)
    M_ref = V @ np.diag(w**-0.5) @ V.T @ X.T @ G
    M = lm.whitened_gradient(A, C, 0.0)
    assert M.dtype == torch.float64 and M.shape == (20, 7)
    np.testing.assert_allclose(M.numpy(), M_ref, rtol=1e-9, atol=1e-12 * np.abs(M_ref).max())
    assert np.sum(M_ref**2) == pytest.approx(proj, rel=1e-10)


def _dup_cols(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((150, 12))
    X[:, 5] = X[:, 0]
    X[:, 7] = 2 * X[:, 1] - X[:, 3]
    X[:, 11] = 0.0
    return X, rng.standard_normal((150, 9)), 9  # rank 9


@pytest.mark.parametrize("case", ["n_lt_d", "dup_cols"])
def test_rank_deficient_lambda0(case):
    if case == "n_lt_d":
        rng = np.random.default_rng(4)
        X, G, rank = rng.standard_normal((10, 24)), rng.standard_normal((10, 6)), 10
    else:
        X, G, rank = _dup_cols(5)
    A, C, gg = stats(X, G)
    ref = np.sum((projector(X) @ G) ** 2)
    ref_pinv = np.sum((X @ np.linalg.pinv(X) @ G) ** 2)
    assert ref == pytest.approx(ref_pinv, rel=1e-10)
    out = lm.module_metrics(A, C, gg, X.shape[0], 0.0, 3, G.shape[1])
    assert all(math.isfinite(v) for k, v in out.items() if k != "kappa")
    assert out["res2"] == pytest.approx(ref, rel=1e-9)
    assert out["res2_rank_r"] == pytest.approx(rr_gain(X, G, 0.0, 3)[0], rel=1e-9)
    assert out["d_eff"] == pytest.approx(rank, abs=1e-9)  # numerical rank at λ' = 0
    assert out["mu_min"] == 0.0 and out["kappa"] == math.inf
    D = lm.best_rank_r_update(A, C, 0.0, 3).numpy()
    assert np.isfinite(D).all()
    assert objective(X, G, 0.0, D) == pytest.approx(0.5 * gg - 0.5 * out["res2_rank_r"], rel=1e-9)
    # with n < d_in the full update interpolates: the whole of G in col(X) = R^n is fitted
    if case == "n_lt_d":
        assert out["res2"] == pytest.approx(gg, rel=1e-9)


# ---------------------------------------------------------------- rank-r


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("r", [0, 1, 3, 12])
def test_rank_r_gain_and_update(ridge, r):
    X, G = make(n=90, d_in=14, d_out=10, seed=6)
    A, C, gg = stats(X, G)
    lam = abs_lam(X, ridge)
    ref_r, ref_full = rr_gain(X, G, lam, r)
    out = lm.resnorm(A, C, gg, ridge, rank=r)
    assert out["res2"] == pytest.approx(ref_full, rel=1e-10)
    assert out["res2_rank_r"] == pytest.approx(ref_r, rel=1e-10, abs=1e-12 * gg)
    if r >= 10:
        assert out["res2_rank_r"] == pytest.approx(out["res2"], rel=1e-12)

    D = lm.best_rank_r_update(A, C, ridge, r).numpy()
    assert D.shape == (10, 14)
    assert np.linalg.matrix_rank(D) <= r
    best = objective(X, G, lam, D)
    assert best == pytest.approx(0.5 * gg - 0.5 * ref_r, rel=1e-10)

    rng = np.random.default_rng(7)
    if r == 0:
        assert np.all(D == 0)
        return
    # nothing of rank r does better: random rank-r matrices, and small rank-preserving
    # perturbations P Qᵀ → (P + εE)(Q + εF)ᵀ of the optimum
    U, s, Vt = np.linalg.svd(D, full_matrices=False)
    P, Q = U[:, :r] * s[:r], Vt[:r].T
    scale = np.abs(D).max()
    for _ in range(30):
        R = rng.standard_normal((10, r)) @ rng.standard_normal((r, 14)) * scale
        assert objective(X, G, lam, R) >= best
        eps = 10.0 ** rng.uniform(-4, -1)
        Pe = P + eps * rng.standard_normal(P.shape) * np.abs(P).max()
        Qe = Q + eps * rng.standard_normal(Q.shape)
        assert objective(X, G, lam, Pe @ Qe.T) >= best - 1e-12 * gg


def test_eig_passthrough_and_dtypes():
    X, G = make(seed=8)
    A, C, gg = stats(X, G)
    eig = lm.eig_psd(A)
    a = lm.resnorm(A, C, gg, 0.1, 3)
    b = lm.resnorm(A, C, gg, 0.1, 3, eig=eig)
    assert a == b
    assert torch.equal(lm.best_rank_r_update(A, C, 0.1, 3), lm.best_rank_r_update(A, C, 0.1, 3, eig))
    # float32 statistics are accepted and promoted (tolerance = float32 rounding of A, C)
    c = lm.resnorm(A.float(), C.float(), gg, 0.1, 3)
    assert c["res2"] == pytest.approx(a["res2"], rel=1e-4)
    assert lm.whitened_gradient(A.float(), C.float(), 0.1).dtype == torch.float64
    # module_metrics = union of the three
    mm = lm.module_metrics(A, C, gg, X.shape[0], 0.1, 3, G.shape[1])
    sp = lm.spectrum(A, X.shape[0], 0.1)
    assert set(mm) == set(a) | set(sp) | {"gain_adj", "gain_adj_rank_r"}
    for k in list(a) + list(sp):
        assert mm[k] == pytest.approx({**a, **sp}[k], rel=1e-12)
    assert mm["gain_adj"] == lm.gain_adj(a["res2"], gg, X.shape[0], G.shape[1], sp["d_eff"])
    assert mm["gain_adj_rank_r"] == lm.gain_adj_rank_r(a["res2_rank_r"], a["res2"], gg, X.shape[0], G.shape[1],
                                                       sp["d_eff"], 3)


# ---------------------------------------------------------------- spectrum


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.1, 2.0])
def test_spectrum_matches_eigvalsh(ridge):
    X, _ = make(n=300, d_in=18, seed=9)
    n, d = X.shape
    S = X.T @ X / n
    mu = np.linalg.eigvalsh(S)
    lam = ridge * np.trace(S) / d
    p = mu / mu.sum()
    ref = {
        "energy": np.trace(S),
        "mu_max": mu.max(),
        "mu_min": mu.min(),
        "kappa": (mu.max() + lam) / (mu.min() + lam),
        "erank": np.exp(-np.sum(p * np.log(p))),
        "d_eff": np.sum(mu / (mu + lam)),
    }
    out = lm.spectrum(torch.tensor(X.T @ X), n, ridge)
    for k, v in ref.items():
        assert out[k] == pytest.approx(v, rel=1e-9), k
    assert 1 <= out["erank"] <= d and 0 < out["d_eff"] <= d
    if ridge == 0:
        assert out["d_eff"] == pytest.approx(d, abs=1e-12)


def test_spectrum_erank_rank_deficient_and_isotropic():
    X, _, rank = _dup_cols(10)
    out = lm.spectrum(torch.tensor(X.T @ X), X.shape[0], 0.1)
    mu = np.clip(np.linalg.eigvalsh(X.T @ X / X.shape[0]), 0, None)
    mu[mu < mu.max() * 12 * np.finfo(float).eps] = 0
    p = mu[mu > 0] / mu.sum()
    assert out["erank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)
    assert out["erank"] <= rank + 1e-9
    assert math.isfinite(out["kappa"])  # ridge > 0 → finite
    iso = lm.spectrum(torch.eye(7) * 5.0, 5, 0.0)
    assert iso["erank"] == pytest.approx(7) and iso["kappa"] == pytest.approx(1.0)
    assert iso["energy"] == pytest.approx(7.0) and iso["d_eff"] == pytest.approx(7.0)


# ---------------------------------------------------------------- gain_adj


def test_gain_adj_formula():
    # s² = (10 − 4) / (2·(100 − 3)) ; gain = ½ (4 − s²·2·3)
    s2 = 6.0 / (2 * 97)
    assert lm.gain_adj(4.0, 10.0, 100, 2, 3.0) == pytest.approx(0.5 * (4 - s2 * 6))
    assert lm.gain_adj(0.0, 0.0, 10, 3, 0.0) == 0.0
    assert lm.gain_adj(1.0, 1.0, 2, 3, 5.0) == 0.5  # n < d_eff: dof guard, s² = 0
    assert lm.gain_adj(0.1, 100.0, 10, 3, 9.0) == 0.0  # noise explains it all → clipped


def test_gain_adj_noise_vs_signal():
    n, d_in, d_out = 2000, 32, 16
    noise_ratio, signal_ratio = [], []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        X = rng.standard_normal((n, d_in)) * np.logspace(0, -2, d_in)[None, :]
        G = rng.standard_normal((n, d_out))  # pure noise, independent of X
        A, C, gg = stats(X, G)
        m = lm.module_metrics(A, C, gg, n, 1e-3, 4, d_out)
        noise_ratio.append(m["gain_adj"] / (0.5 * m["res2"]))
        # planted signal: G = X B + small noise
        B = rng.standard_normal((d_in, d_out)) / np.logspace(0, -2, d_in)[:, None]
        G2 = X @ B + 0.05 * rng.standard_normal((n, d_out))
        A2, C2, gg2 = stats(X, G2)
        m2 = lm.module_metrics(A2, C2, gg2, n, 0.0, 4, d_out)
        signal_ratio.append(m2["gain_adj"] / (0.5 * m2["res2"]))
    assert np.mean(noise_ratio) < 0.2
    assert min(signal_ratio) > 0.98 and max(signal_ratio) <= 1.0


def test_gain_adj_rank_r_formula():
    # s² = (100 − 40) / (20·(1000 − 30)); rank-1 noise = s²(√30 + √20)², below the full s²·20·30 cap
    s2 = 60.0 / (20 * 970)
    edge = (math.sqrt(30) + math.sqrt(20)) ** 2
    assert lm.noise_variance(40.0, 100.0, 1000, 20, 30.0) == pytest.approx(s2)
    assert lm.rank_r_noise(s2, 20, 30.0, 1) == pytest.approx(s2 * edge)
    assert lm.gain_adj_rank_r(30.0, 40.0, 100.0, 1000, 20, 30.0, 1) == pytest.approx(0.5 * (30 - s2 * edge))
    assert lm.gain_adj_rank_r(30.0, 40.0, 100.0, 1000, 20, 30.0, 4) == pytest.approx(0.5 * (30 - 4 * s2 * edge))
    # a rank whose edge figure passes the full-rank noise is capped there: it recovers gain_adj
    assert lm.rank_r_noise(s2, 20, 30.0, 7) == pytest.approx(s2 * 600)
    assert lm.gain_adj_rank_r(40.0, 40.0, 100.0, 1000, 20, 30.0, 20) == pytest.approx(
        lm.gain_adj(40.0, 100.0, 1000, 20, 30.0))
    assert lm.gain_adj_rank_r(0.01, 4.0, 100.0, 10, 2, 3.0, 1) == 0.0          # noise explains it: clipped
    assert lm.gain_adj_rank_r(0.0, 0.0, 0.0, 10, 3, 0.0, 4) == 0.0


@pytest.mark.parametrize("n, d_in, d_out, rank", [(4000, 64, 48, 4), (300, 128, 128, 1), (3000, 96, 64, 8)])
def test_gain_adj_rank_r_noise_level_and_planted_signal(n, d_in, d_out, rank):
    """Float64 Monte Carlo. Pure noise: the best rank-r fit captures at most the bulk-edge figure
    r·s²(√d_eff + √d_out)², and not much less (the r largest squared singular values of a
    d_eff × d_out noise matrix sit at or just below the edge). A planted rank-1 signal of known
    energy: gain_adj_rank_r recovers most of it, and the rank-r noise share of res2_rank_r is far
    below the full-rank one (the case the selection's reliability depends on: n not ≫ d_eff)."""
    noise, recovered, f_rank_r, f_full = [], [], [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n, d_in)) * np.logspace(0, -1, d_in)[None, :]
        E = rng.standard_normal((n, d_out))
        A, C, gg = stats(X, E)
        m = lm.module_metrics(A, C, gg, n, 1e-3, rank, d_out)
        s2 = lm.noise_variance(m["res2"], gg, n, d_out, m["d_eff"])
        noise.append(m["res2_rank_r"] / lm.rank_r_noise(s2, d_out, m["d_eff"], rank))
        u = X @ rng.standard_normal(d_in)
        v = rng.standard_normal(d_out)
        S = np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)) * math.sqrt(8) * (math.sqrt(d_in) + math.sqrt(d_out))
        A2, C2, gg2 = stats(X, S + E)
        m2 = lm.module_metrics(A2, C2, gg2, n, 1e-3, rank, d_out)
        recovered.append(m2["gain_adj_rank_r"] / (0.5 * (S**2).sum()))
        f_rank_r.append(2 * m2["gain_adj_rank_r"] / m2["res2_rank_r"])
        f_full.append(2 * m2["gain_adj"] / m2["res2"])
    assert 0.7 < min(noise) and max(noise) <= 1.02
    assert 0.75 < np.mean(recovered) <= 1.05
    assert np.mean(f_rank_r) > 1.2 * np.mean(f_full)


# ---------------------------------------------------------------- degenerate


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_zero_stats_are_finite(ridge):
    d_in, d_out = 6, 4
    Z, Zc = torch.zeros(d_in, d_in), torch.zeros(d_in, d_out)
    m = lm.module_metrics(Z, Zc, 0.0, 10, ridge, 2, d_out)
    for k, v in m.items():
        assert not math.isnan(v), k
        if k != "kappa":  # kappa of Σ = 0 is documented as inf
            assert math.isfinite(v) and v == 0.0, k
    assert m["kappa"] == math.inf
    assert torch.all(lm.whitened_gradient(Z, Zc, ridge) == 0)
    assert torch.all(lm.best_rank_r_update(Z, Zc, ridge, 2) == 0)
    # non-zero A, zero gradient (gg = 0): res_frac defined as 0
    X, _ = make(seed=11, d_in=d_in)
    A = torch.tensor(X.T @ X)
    m = lm.module_metrics(A, Zc, 0.0, X.shape[0], ridge, 2, d_out)
    assert all(math.isfinite(v) for v in m.values())
    assert m["res2"] == m["res_frac"] == m["gain_adj"] == m["grad_norm"] == 0.0
    # n = 0 does not divide by zero
    assert all(not math.isnan(v) for v in lm.spectrum(Z, 0, ridge).values())


def test_numerical_rank_threshold():
    # an eigenvalue below max(μ)·d_in·eps64 is treated as 0: dropped from M, not counted in d_eff
    A = torch.diag(torch.tensor([1e-18, 2.0, 4.0], dtype=torch.float64))
    C = torch.ones(3, 2, dtype=torch.float64)
    out = lm.module_metrics(A, C, 10.0, 4, 0.0, 1, 2)
    assert out["res2"] == pytest.approx(2 * (1 / 2.0 + 1 / 4.0), rel=1e-12)
    assert out["d_eff"] == 2.0 and out["mu_min"] == 0.0 and out["kappa"] == math.inf
    # with ridge > 0 the direction is kept (μ + λ > tol) and weighted by 1/(μ + λ)
    lam = 0.1 * (6.0 + 1e-18) / 3
    ref = 2 * (1 / (1e-18 + lam) + 1 / (2.0 + lam) + 1 / (4.0 + lam))
    assert lm.resnorm(A, C, 10.0, 0.1, 1)["res2"] == pytest.approx(ref, rel=1e-12)
