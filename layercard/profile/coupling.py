"""Layer coupling maths (docs/design.md §1 "Layer coupling"): pure torch/numpy, no hooks, no I/O.

For layer ℓ let u_ℓ ∈ R^{T×V} be the change of the logits at T supervised tokens caused by the
layer's best update Δ*_ℓ (a JVP, see :mod:`layercard.profile.directions`). With the summed softmax
cross-entropy L = Σ_t CE(z_t, y_t):

* ∇_z L per token is ``p − onehot(y)`` (:func:`ce_logit_grad`);
* the Gauss-Newton / Fisher metric per token is H = diag(p) − ppᵀ, so
  uᵀHv = Σ_i p_i u_i v_i − ū v̄ = Σ_i p_i (u_i − ū)(v_i − v̄) with ū = Σ_i p_i u_i.

:func:`metric_embed` maps u to w = √p ⊙ (u − ū) so that the metric becomes the plain dot
product; w may then go through a seeded JL :class:`Sketch` for large vocabularies. Then

    K_ℓm = Σ_t ⟨w_ℓ, w_m⟩,   b_ℓ = −Σ_t ⟨∇_z L, u_ℓ⟩,   ρ = K / sqrt(diag ⊗ diag)

and the predicted first-order gain of a layer set S is ½ b_Sᵀ K_SS⁺ b_S. K and b are plain sums
over tokens, so they add across batches, shards and machines.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from layercard.errors import LayercardError

__all__ = [
    "centered_softmax_weights",
    "metric_embed",
    "ce_logit_grad",
    "Sketch",
    "coupling_from_embeddings",
    "linear_term",
    "correlation",
    "set_gain",
    "singleton_gains",
    "additivity_gap",
    "predicted_gain",
    "additivity_error",
]

PINV_RCOND = 1e-10


def _float_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (half, bf16, float32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Per-token metric
# ---------------------------------------------------------------------------------------------
def centered_softmax_weights(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``p = softmax(logits)`` over the last axis and ``sqrt(p)``; half precision is upcast to float32."""
    z = logits.to(_float_dtype(logits))
    p = torch.softmax(z, dim=-1)
    return p, p.sqrt()


def metric_embed(u: Tensor, p: Tensor) -> Tensor:
    """w = √p ⊙ (u − ū), ū = Σ_i p_i u_i per token, so ⟨w_u, w_v⟩ = uᵀ(diag p − ppᵀ)v.

    ``u`` and ``p`` are (T, V) (any leading shape works; the metric acts on the last axis).
    """
    if u.shape != p.shape:
        raise LayercardError(f"metric_embed: direction shape {tuple(u.shape)} != probability shape {tuple(p.shape)}")
    dtype = torch.promote_types(_float_dtype(u), _float_dtype(p))
    u = u.to(dtype)
    p = p.to(dtype)
    ubar = (p * u).sum(dim=-1, keepdim=True)
    return p.sqrt() * (u - ubar)


def ce_logit_grad(p: Tensor, targets: Tensor) -> Tensor:
    """∇_z of Σ_t CE(z_t, y_t): ``p − onehot(targets)`` per token; p is (T, V), targets (T,) int."""
    if p.shape[:-1] != targets.shape:
        raise LayercardError(f"ce_logit_grad: targets shape {tuple(targets.shape)} does not match p {tuple(p.shape)}")
    g = p.clone()
    g.scatter_add_(-1, targets.long().unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
    return g


# ---------------------------------------------------------------------------------------------
# JL sketch
# ---------------------------------------------------------------------------------------------
class Sketch:
    """Seeded Johnson–Lindenstrauss projection R^V → R^dim with entries N(0, 1/dim).

    The matrix is float32, drawn on the CPU from ``torch.Generator().manual_seed(seed)`` so every
    process (and every device) gets bit-identical entries; E[⟨Sx, Sy⟩] = ⟨x, y⟩.
    """

    def __init__(self, vocab: int, dim: int, seed: int):
        if vocab <= 0 or dim <= 0:
            raise LayercardError(f"Sketch needs positive vocab and dim, got vocab={vocab}, dim={dim}")
        self.vocab = int(vocab)
        self.dim = int(dim)
        self.seed = int(seed)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.matrix = torch.randn(self.vocab, self.dim, generator=gen, dtype=torch.float32) / math.sqrt(self.dim)
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = self.matrix.to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, w: Tensor) -> Tensor:
        """(T, V) → (T, dim), computed in w's float dtype (float32 for half inputs)."""
        if w.shape[-1] != self.vocab:
            raise LayercardError(f"Sketch built for vocab {self.vocab} got directions with last dim {w.shape[-1]}")
        dtype = _float_dtype(w)
        return w.to(dtype) @ self._on(w.device, dtype)

    def __repr__(self) -> str:
        return f"Sketch(vocab={self.vocab}, dim={self.dim}, seed={self.seed})"


# ---------------------------------------------------------------------------------------------
# K and b (additive over token batches)
# ---------------------------------------------------------------------------------------------
def coupling_from_embeddings(W: Sequence[Tensor]) -> Tensor:
    """K_ℓm = Σ_tokens ⟨W_ℓ, W_m⟩ as a float64 (L, L) CPU tensor; sum the K's of token batches."""
    W = list(W)
    if not W:
        return torch.zeros(0, 0, dtype=torch.float64)
    shape = W[0].shape
    for i, w in enumerate(W):
        if w.shape != shape:
            raise LayercardError(f"coupling_from_embeddings: layer {i} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    F = torch.stack([w.reshape(-1).to(torch.float64) for w in W])  # (L, T*D)
    K = F @ F.T
    K = 0.5 * (K + K.T)  # exact symmetry
    return K.cpu()


def linear_term(grad_z: Tensor, u: Tensor) -> float:
    """b contribution −Σ_tokens ⟨∇_z L, u⟩ in float64; sum over batches."""
    if grad_z.shape != u.shape:
        raise LayercardError(f"linear_term: gradient shape {tuple(grad_z.shape)} != direction shape {tuple(u.shape)}")
    return -float((grad_z.to(torch.float64) * u.to(torch.float64)).sum().item())


# ---------------------------------------------------------------------------------------------
# Gains
# ---------------------------------------------------------------------------------------------
def _as_matrix(K) -> np.ndarray:
    if isinstance(K, Tensor):
        K = K.detach().cpu().numpy()
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise LayercardError(f"coupling matrix must be square, got shape {K.shape}")
    return K


def _as_vector(b, n: int) -> np.ndarray:
    if isinstance(b, Tensor):
        b = b.detach().cpu().numpy()
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if b.shape[0] != n:
        raise LayercardError(f"linear term has {b.shape[0]} entries, coupling matrix has {n} layers")
    return b


def _indices(layers, n: int) -> list[int]:
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    idx = [int(i) for i in layers]
    for i in idx:
        if not 0 <= i < n:
            raise LayercardError(f"layer position {i} is out of range for a {n}-layer coupling matrix")
    if len(set(idx)) != len(idx):
        raise LayercardError(f"layer set {idx} repeats a layer")
    return idx


def correlation(K) -> np.ndarray:
    """ρ = K / sqrt(diag ⊗ diag), clipped to [−1, 1]; a row/col with K_ℓℓ ≤ 0 is 0 off-diagonal, 1 on it."""
    K = _as_matrix(K)
    d = np.diag(K).copy()
    ok = d > 0
    s = np.where(ok, np.sqrt(np.where(ok, d, 1.0)), 1.0)
    rho = K / np.outer(s, s)
    rho[~ok, :] = 0.0
    rho[:, ~ok] = 0.0
    rho = np.clip(rho, -1.0, 1.0)
    np.fill_diagonal(rho, 1.0)
    return rho


def set_gain(K, b, layers) -> float:
    """½ b_Sᵀ K_SS⁻¹ b_S (pseudo-inverse, rcond 1e-10, when K_SS is singular); empty S → 0."""
    K = _as_matrix(K)
    b = _as_vector(b, K.shape[0])
    idx = _indices(layers, K.shape[0])
    if not idx:
        return 0.0
    Kss = K[np.ix_(idx, idx)]
    bs = b[idx]
    Kss = 0.5 * (Kss + Kss.T)
    x = None
    try:
        if np.linalg.cond(Kss) < 1.0 / PINV_RCOND:
            x = np.linalg.solve(Kss, bs)
    except np.linalg.LinAlgError:
        x = None
    if x is None or not np.all(np.isfinite(x)):
        x = np.linalg.pinv(Kss, rcond=PINV_RCOND, hermitian=True) @ bs
    return float(0.5 * bs @ x)


def singleton_gains(K, b) -> np.ndarray:
    """b_ℓ² / (2 K_ℓℓ) per layer, 0 where K_ℓℓ ≤ 0."""
    K = _as_matrix(K)
    b = _as_vector(b, K.shape[0])
    d = np.diag(K)
    ok = d > 0
    return np.where(ok, b**2 / (2.0 * np.where(ok, d, 1.0)), 0.0)


def additivity_gap(K, b, layers) -> float:
    """Σ_{ℓ∈S} b_ℓ²/(2K_ℓℓ) − set_gain(S) (signed: > 0 when layers overlap and the sum over-counts)."""
    K = _as_matrix(K)
    idx = _indices(layers, K.shape[0])
    return float(singleton_gains(K, b)[idx].sum() - set_gain(K, b, idx))


# ---------------------------------------------------------------------------------------------
# On a Layer Card
# ---------------------------------------------------------------------------------------------
def _card_terms(card, layers) -> tuple[np.ndarray, np.ndarray, list[int]]:
    K = getattr(card, "coupling_k", None)
    if K is None:
        raise LayercardError("card has no coupling; run `layercard profile` with coupling enabled")
    table = card.layers
    if "b" not in table.columns:
        raise LayercardError("card has no coupling; run `layercard profile` with coupling enabled")
    K = _as_matrix(K)
    if K.shape[0] != len(table):
        raise LayercardError(f"card coupling matrix is {K.shape[0]}x{K.shape[0]} but the card has {len(table)} layers")
    position = {int(layer): pos for pos, layer in enumerate(table["layer"].to_numpy())}
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    idx = []
    for layer in layers:
        try:
            key = int(layer)
        except (TypeError, ValueError):
            raise LayercardError(f"layer {layer!r} is not a layer index") from None
        if key not in position:
            raise LayercardError(f"layer {key} is not in the card (layers {min(position, default=None)}..{max(position, default=None)})")
        idx.append(position[key])
    b = table["b"].to_numpy(dtype=np.float64)
    return K, b, idx


def predicted_gain(card, layers: Iterable[int]) -> float:
    """Predicted first-order gain ½ b_Sᵀ K_SS⁺ b_S of adapting the card's layers ``layers`` (layer indices)."""
    K, b, idx = _card_terms(card, layers)
    return set_gain(K, b, idx)


def additivity_error(card, layers: Iterable[int]) -> float:
    """Signed error of adding singleton gains over ``layers`` instead of the joint gain."""
    K, b, idx = _card_terms(card, layers)
    return additivity_gap(K, b, idx)
