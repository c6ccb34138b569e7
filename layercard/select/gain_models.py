"""Set models: the predicted loss decrease Q(S) of adapting a layer set S, batched over sets.

Three models are selectable (``layercard select --model``); :data:`DEFAULT_MODEL` is the one the
predictor leaderboard (``benchmarks/predictors.py``) ranks best on the measured tables.

* ``newton`` — ½ b̂_Sᵀ (K̂_SS + E_SS)⁺ b̂_S (:mod:`layercard.select.selection`): the exact line-search gain
  along the layers' ridge-optimal updates Δ*, damped by each layer's reliability. Scale-invariant
  per layer by construction.
* ``adam`` — the trust-region gain of Adam's first LoRA step taken on every layer of S at once
  (:mod:`layercard.profile.adam_step`)::

      Q(S) = max_{0 ≤ t ≤ ρ} t·Σ_{ℓ∈S} s_ℓ − ½·t²·Σ_{ℓ,m∈S} H_ℓm

  s_ℓ = adam_b_ℓ / N (the ℓ1 rate of layer ℓ's sign step per loss term), H = k_adam / N (the
  Gram of the sign steps' output directions in the softmax metric, per loss term), ρ = Σ_t lr_t of
  the training recipe. Adam moves every adapted coordinate at the same rate, so the layers share one
  t; layers whose output directions align add curvature (H_ℓm > 0) faster than rate, which is how
  the model makes gains sub-additive. No constant is fitted: s, H come from the card, ρ from the recipe.
* ``coverage`` — Q(S) = Σ_j G_j · max_{ℓ∈S} |ρ_jℓ|, G_j the trust-region gain of layer j alone and
  ρ the correlation of the sign-step directions: a chosen layer covers the improvement of every layer
  whose direction it shares. Monotone submodular, so greedy keeps its (1 − 1/e) guarantee.
* ``measured`` — the coverage model with G_j replaced by the gain layer j reached when trained alone
  (``measured_gain``, which a ``layercard search … mode=per-layer`` writes into its card version; a
  layer that lost alone counts 0). It spends one trial per layer to learn what the card can only
  predict, and keeps the card's redundancy term.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layercard.profile.adam_step import step_budget, trust_region_gain
from layercard.errors import LayercardError

__all__ = ["AdamGain", "CoverageGain", "MODELS", "FORMULAS", "DEFAULT_MODEL", "adam_terms", "gain_model_from_card",
           "default_step_budget", "measured_gains"]

MODELS = ("newton", "adam", "coverage", "measured")
FORMULAS = {
    "adam": "Q(S) = max_{0≤t≤ρ} t·Σ_S s_ℓ − ½t²·Σ_{S×S} H_ℓm; s = adam_b/N, H = k_adam/N, ρ = Σ lr_t "
            "(layercard.select.gain_models)",
    "coverage": "Q(S) = Σ_j G_j·max_{ℓ∈S} |ρ_jℓ|; G_j = max_{0≤t≤ρ} t·s_j − ½t²·H_jj, ρ of the sign-step Gram "
                "(layercard.select.gain_models)",
    "measured": "Q(S) = Σ_j max(m_j, 0)·max_{ℓ∈S} |ρ_jℓ|; m_j the measured gain of layer j trained alone "
                "(a per-layer search), ρ of the sign-step Gram (layercard.select.gain_models)",
}
DEFAULT_MODEL = "coverage"
"""Chosen on headline alone (benchmarks/results/predictors.md: within-k ρ +0.72 against +0.09 for
newton and −0.11 for adam; per layer +0.85), then frozen; the other tasks are its held-out check."""
ADAM_HINT = "`layercard profile` with coupling.adam=true (the default)"
MEASURED_HINT = "`layercard search … mode=per-layer` writes a card version with them (OUT/card)"
_CHUNK = 4096    # sets scored at once by the coverage model (its temporary is L × chunk × |S|)


def default_step_budget() -> float:
    """ρ of the default training recipe (:class:`layercard.train.config.TrainConfig`'s lr/steps/warmup)."""
    from dataclasses import fields

    from layercard.train.config import TrainConfig

    d = {f.name: f.default for f in fields(TrainConfig)}
    return step_budget(d["lr"], d["steps"], d["warmup_steps"])


@dataclass(frozen=True)
class AdamGain:
    s: np.ndarray      # (L,) ℓ1 rate per loss term
    H: np.ndarray      # (L, L) sign-step Gram per loss term
    rho: float         # step budget Σ lr_t
    name: str = "adam"

    def __call__(self, sets: np.ndarray) -> np.ndarray:
        sets = np.asarray(sets, dtype=np.int64)
        if sets.shape[1] == 0:
            return np.zeros(len(sets))
        s = self.s[sets].sum(axis=1)
        h = self.H[sets[:, :, None], sets[:, None, :]].sum(axis=(1, 2))
        return trust_region_gain(s, h, self.rho)


@dataclass(frozen=True)
class CoverageGain:
    G: np.ndarray      # (L,) singleton trust-region gains
    sim: np.ndarray    # (L, L) |ρ| of the sign-step directions, unit diagonal
    name: str = "coverage"

    def __call__(self, sets: np.ndarray) -> np.ndarray:
        sets = np.asarray(sets, dtype=np.int64)
        if sets.shape[1] == 0:
            return np.zeros(len(sets))
        out = np.empty(len(sets))
        for i in range(0, len(sets), _CHUNK):
            block = sets[i: i + _CHUNK]
            out[i: i + _CHUNK] = self.G @ self.sim[:, block].max(axis=2)
        return out


def adam_terms(card) -> tuple[np.ndarray, np.ndarray]:
    """(s, H) per loss term from a card's sign-step columns; a one-line error when it has none."""
    H = getattr(card, "coupling_adam", None)
    if H is None or "adam_b" not in card.layers.columns:
        raise LayercardError(f"card lacks Adam's sign-step directions (k_adam, adam_b); {ADAM_HINT} fills them")
    n = card.meta.get("coupling_tokens")
    if not n:
        raise LayercardError("card lacks 'coupling_tokens' (the probe set's loss terms); re-profile it")
    s = card.layers["adam_b"].to_numpy(np.float64) / n
    H = np.asarray(H, dtype=np.float64) / n
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(H))):
        raise LayercardError("card's sign-step columns (adam_b, k_adam) are not finite; re-profile it")
    return s, 0.5 * (H + H.T)


def measured_gains(card) -> np.ndarray:
    """Each layer's measured gain trained alone (the card's ``measured_gain``), losses counted as 0; a
    one-line error naming the layers that lack one."""
    if "measured_gain" not in card.layers.columns:
        raise LayercardError(f"card has no measured single-layer gains (column measured_gain); {MEASURED_HINT}")
    m = card.layers["measured_gain"].to_numpy(np.float64)
    missing = [int(l) for l, v in zip(card.layers["layer"], m) if not np.isfinite(v)]
    if missing:
        raise LayercardError(f"card lacks a measured gain for layer(s) {missing}; {MEASURED_HINT}")
    return np.clip(m, 0.0, None)


def _similarity(H: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(H), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.abs(H) / np.outer(d, d)
    sim = np.where(np.isfinite(sim), np.clip(sim, 0.0, 1.0), 0.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def gain_model_from_card(card, name: str, rho: float | None = None):
    """The set model ``name`` for ``card`` (None for ``newton``: selection builds it from K and b)."""
    if name not in MODELS:
        raise LayercardError(f"--model '{name}' is not one of {', '.join(MODELS)}")
    if name == "newton":
        return None
    rho = default_step_budget() if rho is None else float(rho)
    if not rho > 0:
        raise LayercardError(f"step budget ρ = Σ lr_t must be > 0, got {rho}")
    s, H = adam_terms(card)
    if name == "adam":
        return AdamGain(s, H, rho)
    if name == "measured":
        return CoverageGain(measured_gains(card), _similarity(H), name="measured")
    return CoverageGain(trust_region_gain(s, np.diag(H), rho), _similarity(H))
