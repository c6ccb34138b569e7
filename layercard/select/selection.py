"""Card-guided layer selection (docs/design.md §3): pure numpy on a few per-layer arrays.

**Predicted quality of a layer set S** (the number every objective maximises or constrains)::

    Q(S) = ½ · b̂_Sᵀ (K̂_SS + E_SS)⁺ b̂_S
    b̂_ℓ  = √r_ℓ · b_ℓ,   K̂_ℓm = √(r_ℓ r_m) · K_ℓm,   E = diag((1 − r_ℓ) · K_ℓℓ)
    r_ℓ  = f_ℓ² · g_ℓ ∈ [0, 1]                                      (the layer's reliability)
    f_ℓ  = clip(2 · gain_adj_ℓ / res2_ℓ, 0, 1)                       (0 when res2_ℓ = 0)
    g_ℓ  = min(1, sqrt(κ_ref / κ_ℓ)),  κ_ref = median_ℓ κ_ℓ          (0 when κ_ℓ = ∞)

With every r_ℓ = 1 this is docs/design.md §1's ½ b_Sᵀ K_SS⁻¹ b_S; for uncoupled layers it is
Σ_{ℓ∈S} r_ℓ · b_ℓ² / (2 K_ℓℓ). Why each term:

* ½ b_Sᵀ K_SS⁺ b_S (K, b from the coupling pass; ⁺ = pseudo-inverse, rcond 1e-10, as in
  :func:`layercard.profile.coupling.set_gain`): the first-order-optimal loss decrease when the chosen
  layers' best updates are combined — the residual projected onto the span of their output-space
  directions u_ℓ. Overlapping layers (|ρ| → 1) share one direction and are not counted twice. It
  lives at the network output, so it is invariant to a layer's gradient scale (b scales by s, K by
  s²): raw ``res2`` — which the SmolLM2 pilot showed is dominated by gradient scale and falls 2000×
  with depth — never drives the choice; it enters only through the scale-free ratio f_ℓ.
* The reliability r_ℓ as an errors-in-variables model: the update of layer ℓ moves the output by
  as much as before (its curvature K_ℓℓ is unchanged), but only the share r_ℓ (in squared norm) of
  that move lies along u_ℓ; the rest, (1 − r_ℓ)·K_ℓℓ, is noise independent across layers and of the
  loss gradient — the direction is √r_ℓ·u_ℓ + e_ℓ. Its Gram matrix is K̂ + E and its linear term
  b̂, giving the formula. Unlike scaling b alone, this keeps b̂ consistent with the metric: two
  near-duplicate layers of unequal reliability cannot buy a huge spurious gain along their tiny
  difference direction; Q(S) is at most the unweighted gain (r ≡ 1) and stays monotone in S.
* f_ℓ², the noise-surviving share (docs/design.md §1, noise amplification). ``gain_adj`` = ½(res2 −
  s²·d_out·d_eff) removes the noise an ill-conditioned / high-d_eff module fits
  (:func:`layercard.profile.metrics.gain_adj`). Δ*_ℓ is fitted on the calibration tokens the probe set is
  drawn from, so its direction holds signal S and fitted noise N; on new data the linear term along
  it keeps only ⟨S, S + N⟩ ≈ ‖S‖² = f_ℓ·‖M‖² while the curvature stays: the gain falls by f_ℓ².
  Measured alternative, not used: f from the rank-r pair ``gain_adj_rank_r``/``res2_rank_r`` (the
  noise a rank-r fit absorbs, ~15× less on SmolLM2). It fixed the full-rank f's near-zero rating
  of sentiment layers 0–16 (which train well), but its own k = 5 pick trained worse (81 % of the
  all-layer gain against 98 %) and it ranked the headline sets worse (Spearman 0.2 against 0.8) —
  benchmarks/README.md, paper_table.py. The card carries both columns.
* g_ℓ, slow to fit (docs/design.md §1). Momentum/Adam-type training needs ~√κ steps for the slowest
  feature direction, so within a step budget sized for a typical layer (κ_ref, the card's median κ)
  a layer with κ_ℓ > κ_ref reaches ~√(κ_ref/κ_ℓ) of its gain; better-conditioned layers gain no
  bonus beyond a full fit (the min). The reference is relative on purpose: the pilot saw
  κ ∈ [5e4, 1.5e6] in every layer of a real model, where an absolute κ penalty would flatten every
  layer to ~0; relative, the worst pilot layer keeps ~40 %, while a κ = 1e8 layer among κ ≈ 1e3
  layers keeps 0.3 %.

**Cost of a set** (any unit: FLOPs/token or seconds/step). Training pays the backward from the
top down to the lowest adapted layer, plus a small per-adapter term (docs/design.md §1), so::

    cost(S) = lowest_cost[min S] + Σ_{ℓ ∈ S, ℓ ≠ min S} added_cost[ℓ]

``lowest_cost[ℓ]`` is the cost of adapting ℓ alone, ``added_cost[ℓ]`` the extra cost of also
adapting ℓ above a lower adapted layer. :func:`arrays_from_card` reads both from
:func:`layercard.profile.cost.predicted_cost`.

**Search.** With L ≤ ``exact_max_layers`` (16) every one of the 2^L − 1 sets is scored (batched
eigendecompositions). Above that, cost structure is used: for every candidate lowest layer ℓ0 the
set grows greedily above ℓ0 on the coupling-aware gain Q, then a 1-swap pass polishes it; the best
ℓ0 wins. ``tests/select/test_selection.py`` measures the greedy against exact enumeration.

Everything below works on *positions* 0..L−1 (ascending depth) internally and returns the card's
layer indices.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from layercard.errors import LayercardError

__all__ = [
    "CardArrays",
    "Selection",
    "reliability",
    "card_reliability",
    "set_quality",
    "set_cost",
    "singleton_quality",
    "select_max_quality",
    "select_min_cost",
    "pareto_front",
    "arrays_from_card",
    "card_cost",
    "resolve_model",
    "COST_UNITS",
]

PINV_RCOND = 1e-10           # same rule as layercard.profile.coupling.set_gain
EXACT_MAX_LAYERS = 16        # 2^16 − 1 = 65,535 sets: well under a second
COST_UNITS = {"flops": "flops_per_token", "seconds": "step_seconds"}
_UNIT_WORDS = {"flops": "FLOPs/token", "seconds": "s/step"}
COUPLING_HINT = "`layercard profile` (coupling pass)"
COST_HINT = "`layercard profile` with cost measurement"


# ---------------------------------------------------------------------------------------------
# Inputs and results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CardArrays:
    """What selection needs from a card, as plain arrays (L = number of card layers, by depth).

    layers       (L,) int     card layer indices, strictly ascending
    K            (L, L)       output-space coupling matrix K_ℓm (PSD)
    b            (L,)         linear term b_ℓ
    weight       (L,)         reliability r_ℓ ∈ [0, 1] (see :func:`reliability`)
    lowest_cost  (L,)         cost of adapting layer ℓ alone (it is then the lowest adapted layer)
    added_cost   (L,)         extra cost of also adapting ℓ above a lower adapted layer
    cost_unit    "flops" (predicted FLOPs/token) or "seconds" (predicted seconds/step)
    """

    layers: np.ndarray
    K: np.ndarray
    b: np.ndarray
    weight: np.ndarray
    lowest_cost: np.ndarray
    added_cost: np.ndarray
    cost_unit: str = "flops"
    model: "GainModel | None" = None
    """The set model Q scores sets with; None: the Newton model ``½ b̂ᵀ(K̂ + E)⁺b̂`` of K, b and weight."""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)   # fresh on replace()

    def __post_init__(self):
        L = len(self.layers)
        if L == 0:
            raise LayercardError("the card has no layers to select from")
        for name in ("b", "weight", "lowest_cost", "added_cost"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (L,):
                raise LayercardError(f"selection input '{name}' has shape {v.shape}, expected ({L},)")
            bad = ~np.isfinite(v) | ((v < 0) | (v > 1) if name == "weight" else False)
            if bad.any():
                what = "outside [0, 1]" if name == "weight" else "not finite"
                raise LayercardError(f"selection input '{name}' is {what} at layers "
                                     f"{np.asarray(self.layers)[bad].tolist()}")
            object.__setattr__(self, name, v)
        K = np.asarray(self.K, dtype=np.float64)
        if K.shape != (L, L) or not np.all(np.isfinite(K)):
            raise LayercardError(f"coupling matrix K must be a finite {L}x{L} matrix, got shape {K.shape}")
        object.__setattr__(self, "K", 0.5 * (K + K.T))
        layers = np.asarray(self.layers, dtype=np.int64)
        if np.any(np.diff(layers) <= 0):
            raise LayercardError(f"card layers must be strictly ascending, got {layers.tolist()}")
        object.__setattr__(self, "layers", layers)
        if self.cost_unit not in COST_UNITS:
            raise LayercardError(f"cost unit '{self.cost_unit}' is not one of {sorted(COST_UNITS)}")

    @property
    def L(self) -> int:
        return len(self.layers)

    @property
    def b_eff(self) -> np.ndarray:
        """b̂ = √r ⊙ b."""
        return np.sqrt(self.weight) * self.b

    @property
    def K_eff(self) -> np.ndarray:
        """K̂ + E = (√r √rᵀ) ⊙ K + diag((1 − r) ⊙ diag K), cached."""
        if "K_eff" not in self._cache:
            s = np.sqrt(self.weight)
            self._cache["K_eff"] = np.outer(s, s) * self.K + np.diag((1.0 - self.weight) * np.diag(self.K))
        return self._cache["K_eff"]

    @property
    def unit_words(self) -> str:
        return _UNIT_WORDS[self.cost_unit]

    @property
    def model_name(self) -> str:
        return self.model.name if self.model is not None else "newton"

    def gains(self, sets: np.ndarray) -> np.ndarray:
        """Q of each row of ``sets`` (N, s) of positions, under this card's set model."""
        if self.model is not None:
            return self.model(sets)
        return _batched_gains(self.K_eff, self.b_eff, sets)

    def positions(self, layers) -> list[int]:
        where = {int(l): i for i, l in enumerate(self.layers)}
        bad = [int(l) for l in layers if int(l) not in where]
        if bad:
            raise LayercardError(f"layers {bad} are not in the card (it has layers {self.layers.tolist()})")
        return sorted(where[int(l)] for l in layers)


@dataclass(frozen=True)
class Selection:
    layers: tuple[int, ...]   # card layer indices, ascending
    gain: float               # Q(S)
    cost: float               # cost(S) in the arrays' unit
    method: str               # "exact" (all sets scored) or "greedy"


# ---------------------------------------------------------------------------------------------
# Quality and cost
# ---------------------------------------------------------------------------------------------
def reliability(res2, gain_adj, kappa) -> np.ndarray:
    """Per-layer reliability r_ℓ = f_ℓ² · g_ℓ ∈ [0, 1] (formula and reasons in the module docstring)."""
    res2 = np.asarray(res2, dtype=np.float64)
    gain_adj = np.asarray(gain_adj, dtype=np.float64)
    kappa = np.asarray(kappa, dtype=np.float64)
    for name, v in (("res2", res2), ("gain_adj", gain_adj), ("kappa", kappa)):
        if np.any(np.isnan(v)):
            raise LayercardError(f"card column '{name}' has NaN values; re-profile the card")
    pos = res2 > 0
    f = np.where(pos, np.clip(2.0 * gain_adj / np.where(pos, res2, 1.0), 0.0, 1.0), 0.0)
    finite = np.isfinite(kappa) & (kappa > 0)
    if not finite.any():
        return f**2                                # no usable κ anywhere: conditioning cannot rank layers
    k_ref = float(np.median(kappa[finite]))
    g = np.where(finite, np.minimum(1.0, np.sqrt(k_ref / np.where(finite, kappa, 1.0))), 0.0)
    return f**2 * g


def _batched_gains(K: np.ndarray, b: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Q for each row of ``sets`` (N, s) of positions: ½ Σ (Vᵀb)²/e over eigenpairs above rcond·max."""
    if sets.shape[1] == 0:
        return np.zeros(len(sets))
    Ks = K[sets[:, :, None], sets[:, None, :]]
    bs = b[sets]
    out = np.empty(len(sets))
    # Cholesky is ~25x faster than eigh; it serves the sets whose pivots are comfortably positive
    # (a jittered factor only diagnoses), the near-singular rest take the pseudo-inverse path.
    scale = np.maximum(np.abs(np.diagonal(Ks, axis1=1, axis2=2)).max(axis=1), 1e-300)
    eye = np.eye(Ks.shape[1])
    try:
        piv = np.diagonal(np.linalg.cholesky(Ks + 1e-12 * scale[:, None, None] * eye), axis1=1, axis2=2) ** 2
        fast = piv.min(axis=1) > 1e-8 * scale
    except np.linalg.LinAlgError:
        fast = np.zeros(len(sets), dtype=bool)
    if fast.any():
        try:
            y = np.linalg.solve(np.linalg.cholesky(Ks[fast]), bs[fast][..., None])[..., 0]
            out[fast] = 0.5 * (y**2).sum(axis=1)
        except np.linalg.LinAlgError:
            fast[:] = False
    slow = ~fast
    if slow.any():
        e, V = np.linalg.eigh(Ks[slow])
        proj = np.einsum("nij,ni->nj", V, bs[slow])
        keep = e > PINV_RCOND * np.abs(e).max(axis=1, keepdims=True)
        out[slow] = 0.5 * np.where(keep, proj**2 / np.where(keep, e, 1.0), 0.0).sum(axis=1)
    return out


def _batched_costs(A: CardArrays, sets: np.ndarray) -> np.ndarray:
    """cost of each row of ``sets`` (N, s), rows sorted ascending."""
    return A.lowest_cost[sets[:, 0]] + A.added_cost[sets[:, 1:]].sum(axis=1)


def set_quality(A: CardArrays, layers) -> float:
    """Q(S) for card layer indices ``layers`` (empty → 0)."""
    pos = A.positions(layers)
    if not pos:
        return 0.0
    return float(A.gains(np.array([pos]))[0])


def singleton_quality(A: CardArrays) -> np.ndarray:
    """Q({ℓ}) per layer, shape (L,); for the Newton model r_ℓ · b_ℓ² / (2 K_ℓℓ) (0 where K_ℓℓ ≤ 0)."""
    if A.model is not None:
        return A.gains(np.arange(A.L)[:, None])
    d = np.diag(A.K)
    ok = d > 0
    return np.where(ok, A.b_eff**2 / (2.0 * np.where(ok, d, 1.0)), 0.0)


def set_cost(A: CardArrays, layers) -> float:
    """cost(S) in ``A.cost_unit`` (empty → 0)."""
    pos = A.positions(layers)
    if not pos:
        return 0.0
    return float(_batched_costs(A, np.array([pos]))[0])


# ---------------------------------------------------------------------------------------------
# Exact enumeration
# ---------------------------------------------------------------------------------------------
def _enumerate(A: CardArrays) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Every non-empty set: (sets as position arrays, gains, costs, sizes); cached on the arrays."""
    if "all" not in A._cache:
        sets, gains, costs = [], [], []
        for s in range(1, A.L + 1):
            block = np.array(list(itertools.combinations(range(A.L), s)), dtype=np.int64)
            sets.extend(block)
            gains.append(A.gains(block))
            costs.append(_batched_costs(A, block))
        sizes = np.array([len(s) for s in sets])
        A._cache["all"] = (sets, np.concatenate(gains), np.concatenate(costs), sizes)
    return A._cache["all"]


def _best_exact(A: CardArrays, ok: np.ndarray, keys) -> tuple:
    """Among enumerated sets where ``ok``, the first by ``keys(gains, costs, sizes)`` (primary first)."""
    sets, gains, costs, sizes = _enumerate(A)
    idx = np.flatnonzero(ok)
    # gains equal to 1e-10 of the largest are ties (rounding must not buy a useless extra layer)
    tied = np.round(gains / (1e-10 * max(float(gains.max()), 1e-300)))
    order = np.lexsort(tuple(reversed([k[idx] for k in keys(tied, costs, sizes)])))
    i = int(idx[order[0]])
    return sets[i], float(gains[i]), float(costs[i])


def _to_selection(A: CardArrays, item, method: str) -> Selection:
    s, g, c = item
    return Selection(tuple(int(A.layers[i]) for i in sorted(s)), float(g), float(c), method)


# ---------------------------------------------------------------------------------------------
# Greedy above each lowest layer
# ---------------------------------------------------------------------------------------------
def _gains_with(A: CardArrays, S: list[int], cands: list[int]) -> np.ndarray:
    sets = np.array([sorted(S + [j]) for j in cands], dtype=np.int64)
    return A.gains(sets)


def _gain(A: CardArrays, S) -> float:
    return float(A.gains(np.array([sorted(S)], dtype=np.int64))[0]) if S else 0.0


def _cost(A: CardArrays, S) -> float:
    S = sorted(S)
    return float(A.lowest_cost[S[0]] + A.added_cost[S[1:]].sum())


def _grow(A: CardArrays, lo: int, k: int, budget: float, per_cost: bool = False, stop_at: float | None = None):
    """Greedy chain {lo} ⊂ … above ``lo``; yields every set (list of positions) along the way.

    Picks the candidate with the largest gain (or gain increase per unit added cost when
    ``per_cost``) that keeps |S| ≤ k and cost ≤ budget; stops when nothing fits, nothing adds gain,
    or the gain reaches ``stop_at``.
    """
    S = [lo]
    cost = float(A.lowest_cost[lo])
    gain = _gain(A, S)
    yield list(S), gain, cost
    rest = list(range(lo + 1, A.L))
    tol = 1e-12 * max(gain, 1e-300)
    while len(S) < k and rest and (stop_at is None or gain < stop_at):
        fits = [j for j in rest if cost + A.added_cost[j] <= budget]
        if not fits:
            return
        g = _gains_with(A, S, fits)
        inc = g - gain
        score = inc / np.maximum(A.added_cost[fits], 1e-300) if per_cost else inc
        i = int(np.argmax(score))
        if inc[i] <= tol:
            return
        j = fits[i]
        S.append(j)
        rest.remove(j)
        gain, cost = float(g[i]), cost + float(A.added_cost[j])
        tol = 1e-12 * max(gain, 1e-300)
        yield sorted(S), gain, cost


def _swap_polish(A: CardArrays, S: list[int], budget: float, accept, max_rounds: int = 50) -> list[int]:
    """1-swap local search keeping min(S) fixed: replace a member above min(S) by a non-member above it
    when ``accept(new_gain, new_cost, old_gain, old_cost)`` holds; first the best swap, until none."""
    lo = min(S)
    for _ in range(max_rounds):
        gain, cost = _gain(A, S), _cost(A, S)
        best = None
        for out in [i for i in S if i != lo]:
            base = [i for i in S if i != out]
            cands = [j for j in range(lo + 1, A.L) if j not in S]
            cands = [j for j in cands if cost - A.added_cost[out] + A.added_cost[j] <= budget]
            if not cands:
                continue
            g = _gains_with(A, base, cands)
            for j, gj in zip(cands, g):
                cj = cost - A.added_cost[out] + A.added_cost[j]
                if accept(float(gj), cj, gain, cost) and (best is None or accept(float(gj), cj, best[1], best[2])):
                    best = (sorted(base + [j]), float(gj), cj)
        if best is None:
            return sorted(S)
        S = best[0]
    return sorted(S)


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------
def _check_k(A: CardArrays, k) -> int:
    if k is None:
        return A.L
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= A.L:
        raise LayercardError(f"k={k!r} is out of range: the card has {A.L} layers, so k must be in 1..{A.L}")
    return int(k)


def _check_budget(A: CardArrays, budget) -> float:
    if budget is None:
        return np.inf
    budget = float(budget)
    cheapest = int(np.argmin(A.lowest_cost))
    if not budget >= A.lowest_cost[cheapest]:
        raise LayercardError(
            f"budget {budget:.4g} {A.unit_words} is below the cheapest single layer "
            f"(layer {int(A.layers[cheapest])}: {A.lowest_cost[cheapest]:.4g} {A.unit_words})")
    return budget


def select_max_quality(A: CardArrays, k: int | None = None, budget: float | None = None, *,
                       exact_max_layers: int = EXACT_MAX_LAYERS) -> Selection:
    """The set with the largest Q under |S| ≤ k and/or cost(S) ≤ budget (ties: cheaper, then fewer)."""
    k = _check_k(A, k)
    budget = _check_budget(A, budget)
    if A.L <= exact_max_layers:
        _, _, costs, sizes = _enumerate(A)
        item = _best_exact(A, (sizes <= k) & (costs <= budget), lambda g, c, n: (-g, c, n))
        return _to_selection(A, item, "exact")
    best = None
    better = lambda g1, c1, g0, c0: g1 > g0 * (1 + 1e-12) or (g1 >= g0 * (1 - 1e-12) and c1 < c0)
    for lo in range(A.L):
        if A.lowest_cost[lo] > budget:
            continue
        *_, (S, _, _) = _grow(A, lo, k, budget)
        S = _swap_polish(A, S, budget, better)
        item = (S, _gain(A, S), _cost(A, S))
        if best is None or better(item[1], item[2], best[1], best[2]):
            best = item
    return _to_selection(A, best, "greedy")


def _check_target(target) -> float:
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise LayercardError(f"target {target!r} is not a number; it must be in (0, 1]") from None
    if not 0.0 < t <= 1.0:
        raise LayercardError(f"target {target!r} is outside (0, 1]: it is the fraction of the all-layer gain to reach")
    return t


def select_min_cost(A: CardArrays, target: float, *, exact_max_layers: int = EXACT_MAX_LAYERS) -> Selection:
    """The cheapest set with Q(S) ≥ target · Q(all layers) (ties: higher gain, then fewer layers)."""
    t = _check_target(target)
    need = t * _gain(A, range(A.L)) * (1 - 1e-9)   # the all-layer set itself always qualifies at t = 1
    if A.L <= exact_max_layers:
        gains = _enumerate(A)[1]
        return _to_selection(A, _best_exact(A, gains >= need, lambda g, c, n: (c, -g, n)), "exact")
    best = None
    better = lambda g1, c1, g0, c0: (g1 >= need) and (g0 < need or c1 < c0 or (c1 == c0 and g1 > g0))
    for lo in range(A.L):
        *_, (S, gain, _) = _grow(A, lo, A.L, np.inf, per_cost=True, stop_at=need)
        if gain < need:
            continue
        S = _prune(A, S, need)
        S = _swap_polish(A, S, np.inf, better)
        item = (S, _gain(A, S), _cost(A, S))
        if best is None or better(item[1], item[2], best[1], best[2]):
            best = item
    if best is None:  # cannot happen (the all-layer set qualifies); kept as a guard
        best = (list(range(A.L)), _gain(A, range(A.L)), _cost(A, range(A.L)))
    return _to_selection(A, best, "greedy")


def _prune(A: CardArrays, S: list[int], need: float) -> list[int]:
    """Drop members above min(S), most expensive first, while the gain stays ≥ need."""
    lo = min(S)
    for j in sorted((i for i in S if i != lo), key=lambda i: -A.added_cost[i]):
        rest = [i for i in S if i != j]
        if _gain(A, rest) >= need:
            S = rest
    return sorted(S)


def pareto_front(A: CardArrays, *, exact_max_layers: int = EXACT_MAX_LAYERS) -> list[Selection]:
    """Every set not dominated in (higher Q, lower cost), by ascending cost; always ends with the
    all-layer set (the maximum-Q reference, kept even when a subset ties it in gain)."""
    if A.L <= exact_max_layers:
        method = "exact"
        sets, gains, costs, _ = _enumerate(A)
    else:
        method = "greedy"
        seen, sets, gains, costs = set(), [], [], []
        for lo in range(A.L):
            for S, g, c in _grow(A, lo, A.L, np.inf):
                if tuple(S) not in seen:
                    seen.add(tuple(S))
                    sets.append(np.array(S))
                    gains.append(g)
                    costs.append(c)
        gains, costs = np.array(gains), np.array(costs)
    order = np.lexsort((-gains, costs))             # by cost, then higher gain first
    front, best_gain = [], -np.inf
    for i in order:
        if gains[i] > best_gain * (1 + 1e-12) + 1e-300:
            front.append(_to_selection(A, (sets[i], gains[i], costs[i]), method))
            best_gain = gains[i]
    all_layers = tuple(int(l) for l in A.layers)
    if front[-1].layers != all_layers:
        front.append(Selection(all_layers, _gain(A, range(A.L)), _cost(A, range(A.L)), method))
    return front


# ---------------------------------------------------------------------------------------------
# From a Layer Card
# ---------------------------------------------------------------------------------------------
def _require_coupling(card) -> None:
    if getattr(card, "coupling_k", None) is None or "b" not in card.layers.columns or card.layers["b"].isna().all():
        raise LayercardError(f"card lacks coupling (matrix K and column 'b'); {COUPLING_HINT} fills them")


def card_cost(card, layers, unit: str = "flops") -> float:
    """Predicted cost of adapting ``layers`` in ``unit`` (flops → FLOPs/token, seconds → s/step)."""
    if unit not in COST_UNITS:
        raise LayercardError(f"--budget-unit '{unit}' is not one of {sorted(COST_UNITS)}")
    try:
        from layercard.profile.cost import predicted_cost
    except ImportError:
        raise LayercardError(f"this layercard has no cost model (layercard.profile.cost); {COST_HINT} needs it") from None
    value = predicted_cost(card, list(layers))[COST_UNITS[unit]]
    if value is None or not np.isfinite(value):
        raise LayercardError(f"card has no {_UNIT_WORDS[unit]} prediction (no measured step time); "
                             f"{COST_HINT} fills column 'step_seconds'")
    return float(value)


def card_reliability(card) -> np.ndarray:
    """:func:`reliability` of every card layer, from res2, gain_adj and κ (the rank-r variant is
    documented in the module docstring and was measured worse)."""
    t = card.layers
    return reliability(t["res2"].to_numpy(), t["gain_adj"].to_numpy(), t["kappa"].to_numpy())


def resolve_model(card, model: str | None) -> str:
    """The set model to use: ``model`` as given, else the default when the card carries what it
    needs (sign-step directions for ``adam``/``coverage``), else ``newton``."""
    from layercard.select.gain_models import DEFAULT_MODEL

    if model is not None:
        return model
    if DEFAULT_MODEL != "newton" and getattr(card, "coupling_adam", None) is None:
        return "newton"
    return DEFAULT_MODEL


def arrays_from_card(card, cost_unit: str = "flops", model: str | None = None,
                     step_budget: float | None = None) -> CardArrays:
    """CardArrays of a complete card: K and b from the coupling pass, the reliability from the
    statistics columns, and the cost decomposition probed from :func:`layercard.profile.cost.predicted_cost`
    (lowest_cost[ℓ] = cost({ℓ}); added_cost[ℓ] = cost({first, ℓ}) − cost({first})). ``model``: the
    set model (:mod:`layercard.select.gain_models`; None → :func:`resolve_model`), ``step_budget``: its
    ρ = Σ lr_t (None → the default training recipe's)."""
    from layercard.select.gain_models import gain_model_from_card

    gain_model = gain_model_from_card(card, resolve_model(card, model), step_budget)
    _require_coupling(card)
    if cost_unit not in COST_UNITS:
        raise LayercardError(f"--budget-unit '{cost_unit}' is not one of {sorted(COST_UNITS)}")
    cols = ["adapter_params", "adapter_flops_per_token", "backprop_flops_per_token"]
    cols += ["step_seconds"] if cost_unit == "seconds" else []
    card.require_columns(cols, COST_HINT)
    if not card.meta.get("cost_model"):
        raise LayercardError(f"card lacks its cost model (meta 'cost_model'); {COST_HINT} fills it")
    ids = card.layer_ids
    lowest = np.array([card_cost(card, [l], cost_unit) for l in ids])
    added = np.zeros(len(ids))
    for i, l in enumerate(ids[1:], start=1):
        added[i] = card_cost(card, [ids[0], l], cost_unit) - lowest[0]
    t = card.layers
    weight = card_reliability(card)
    return CardArrays(np.asarray(ids), card.coupling_k, t["b"].to_numpy(np.float64), weight,
                      lowest, added, cost_unit, gain_model)
