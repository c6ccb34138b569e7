"""What the layer-subset search trains, and how its measurements are judged. Pure: no Ray, no torch.

**Candidates.** From one card: the card-guided sets (:func:`layercard.select.selection.select_max_quality`
for each k and budget fraction, :func:`~layercard.select.selection.select_min_cost` for each target), every
baseline strategy at the same k (:mod:`layercard.select.baselines`), or — ``mode="per-layer"`` — every
layer alone. Identical layer sets are trained once and keep every label that proposed them. Each
candidate carries its predicted gain Q(S) and predicted cost; one whose predicted cost exceeds the
budget is marked ``over_budget`` and is never trained.

**Judging.** :func:`spearman` (average ranks for ties) compares predicted with measured gains;
:func:`pareto_mask` finds the measured quality/cost front.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from layercard.errors import LayercardError

__all__ = ["Candidate", "build_candidates", "training_order", "check_budget_fits", "rankdata", "spearman",
           "pareto_mask", "per_layer_correlations"]

_UNIT_WORDS = {"flops": "FLOPs/token", "seconds": "s/step"}


@dataclass
class Candidate:
    """One layer set to train. Costs are predictions; ``cost`` is in the search's budget unit."""

    id: str
    layers: list[int]
    labels: list[str]                 # every proposal that chose this set, e.g. "max-quality k=2", "top k=2"
    objectives: list[str] = field(default_factory=list)   # card-guided: "max-quality", "min-cost", "per-layer"
    strategies: list[str] = field(default_factory=list)   # baselines: "top", "random", ...
    predicted_gain: float | None = None
    predicted_gain_fraction: float | None = None            # Q(S) / Q(all layers)
    cost: float | None = None
    predicted_flops_per_token: float | None = None
    predicted_step_seconds: float | None = None
    over_budget: bool = False

    @property
    def k(self) -> int:
        return len(self.layers)

    def add_proposal(self, label: str, objective: str | None, strategy: str | None) -> None:
        """Record one more proposal that chose this set (labels kept in order, kinds once)."""
        self.labels.append(label)
        if objective and objective not in self.objectives:
            self.objectives.append(objective)
        if strategy and strategy not in self.strategies:
            self.strategies.append(strategy)

    def predict(self, card, gain: float, all_gain: float) -> None:
        """Fill the predicted gain (and its fraction of ``all_gain``) and the predicted costs."""
        from layercard.profile.cost import predicted_cost

        self.predicted_gain = gain
        self.predicted_gain_fraction = gain / all_gain if all_gain > 0 else None
        pc = predicted_cost(card, self.layers)
        self.predicted_flops_per_token, self.predicted_step_seconds = pc["flops_per_token"], pc["step_seconds"]

    @property
    def card_guided(self) -> bool:
        return bool(self.objectives)

    @property
    def baseline(self) -> bool:
        return bool(self.strategies)

    def to_dict(self) -> dict:
        return {**asdict(self), "k": self.k}


def _proposals(card, A, *, mode: str, ks, budget, budget_fractions, targets, strategies, random_seeds, sets=()):
    """(layers, label, objective or None, strategy or None), in a fixed order: card-guided first, the
    given ``sets`` last."""
    from layercard.select.baselines import baseline_layers
    from layercard.select.selection import select_max_quality, select_min_cost

    if mode == "per-layer":
        return [([l], f"layer {l}", "per-layer", None) for l in card.layer_ids]
    L = len(card.layer_ids)
    bad = [k for k in ks if not 1 <= k <= L]
    if bad:
        raise LayercardError(f"config key 'ks' has {bad}: the card has {L} layers, so every k must be in 1..{L}")
    out = []
    for k in ks:
        for f in (budget_fractions if budget is not None else [None]):
            try:
                s = select_max_quality(A, k=k, budget=None if f is None else f * budget)
            except LayercardError:        # the budget is below the cheapest single layer: nothing to propose
                continue
            tail = "" if f in (None, 1.0) else f" budget={f:g}x"
            out.append((list(s.layers), f"max-quality k={k}{tail}", "max-quality", None))
    for t in targets:
        out.append((list(select_min_cost(A, t).layers), f"min-cost target={t:g}", "min-cost", None))
    for name in strategies:
        if name == "all":
            out.append((list(card.layer_ids), "all", None, "all"))
            continue
        for k in ks:
            for seed in (random_seeds if name == "random" else [None]):
                label = f"{name} k={k}" + (f" seed={seed}" if seed is not None else "")
                out.append((baseline_layers(card, name, k, seed=seed), label, None, name))
    for layers in sets:
        out.append((check_given_set(card, layers), f"given {','.join(str(l) for l in sorted(layers))}", None, "given"))
    return out


def check_given_set(card, layers) -> list[int]:
    """A layer set given in the config (``sets``): distinct layers of the card, else a one-line error."""
    ids = set(int(l) for l in card.layer_ids)
    bad = [l for l in layers if int(l) not in ids]
    if not layers or bad or len(set(layers)) != len(layers):
        why = ("is empty" if not layers else f"names layer {bad[0]}, not in the card (layers {min(ids)}..{max(ids)})"
               if bad else "repeats a layer")
        raise LayercardError(f"config key 'sets' has {list(layers)}, which {why}")
    return [int(l) for l in layers]


def build_candidates(card, *, mode: str = "subsets", ks=(1, 2), budget: float | None = None,
                     budget_unit: str = "flops", budget_fractions=(1.0,), targets=(), strategies=(),
                     random_seeds=(0,), model: str | None = None, step_budget: float | None = None,
                     sets=()) -> list[Candidate]:
    """Every distinct layer set to try on ``card`` (a LayerCard with coupling and cost columns),
    with predictions; ids ``c00``, ``c01``, ... in proposal order (card-guided first, the given ``sets``
    last). ``model`` and ``step_budget``: the set model and its ρ
    (:func:`layercard.select.selection.arrays_from_card`)."""
    from layercard.select.selection import arrays_from_card, card_cost, set_quality

    A = arrays_from_card(card, budget_unit, model=model, step_budget=step_budget)
    proposals = _proposals(card, A, mode=mode, ks=list(ks), budget=budget, budget_fractions=list(budget_fractions),
                           targets=list(targets), strategies=list(strategies), random_seeds=list(random_seeds),
                           sets=[list(x) for x in sets])
    all_gain = set_quality(A, card.layer_ids)
    by_set: dict[tuple, Candidate] = {}
    for layers, label, objective, strategy in proposals:
        key = tuple(sorted(int(l) for l in layers))
        c = by_set.get(key)
        if c is None:
            c = by_set[key] = Candidate(id=f"c{len(by_set):02d}", layers=list(key), labels=[])
        c.add_proposal(label, objective, strategy)
    for c in by_set.values():
        c.predict(card, set_quality(A, c.layers), all_gain)
        c.cost = card_cost(card, c.layers, budget_unit)
        c.over_budget = budget is not None and c.cost > budget * (1 + 1e-12)
    return list(by_set.values())


def training_order(candidates: list[Candidate]) -> list[Candidate]:
    """The order to train candidates in: the most expensive (predicted cost) first, ties in proposal order.

    Trials run a few at a time on shared machines, and the last one to start often runs alone. Longest
    first keeps the all-layer reference — the set every step-time ratio divides by — among trials that
    share the machine, rather than alone at the end (where it would step faster than everything it is
    compared with), and shortens the search (the longest trials do not trail)."""
    pos = {c.id: i for i, c in enumerate(candidates)}
    return sorted(candidates, key=lambda c: (-(c.cost if c.cost is not None else 0.0), pos[c.id]))


def check_budget_fits(candidates: list[Candidate], budget: float | None, budget_unit: str) -> None:
    """Raise, naming the cheapest candidate and its cost, when every candidate is over the budget."""
    if not candidates:
        raise LayercardError("the search has no candidates (check ks, targets and strategies)")
    if budget is None or any(not c.over_budget for c in candidates):
        return
    cheapest = min(candidates, key=lambda c: c.cost)
    unit = _UNIT_WORDS[budget_unit]
    raise LayercardError(f"budget {budget:.4g} {unit} fits no candidate: the cheapest is {cheapest.id} "
                         f"(layers {cheapest.layers}, {', '.join(cheapest.labels)}) at {cheapest.cost:.4g} {unit}")


# ---------------------------------------------------------------------------------------------
# Judging measurements
# ---------------------------------------------------------------------------------------------
def rankdata(x) -> np.ndarray:
    """Ranks 1..n of ``x``; tied values share the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks, over pairs where both are
    finite. None with fewer than 2 pairs or when either side is constant (ρ is undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise LayercardError(f"spearman: x has shape {x.shape}, y {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return None
    rx, ry = rankdata(x[ok]), rankdata(y[ok])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else None


def pareto_mask(cost, quality) -> np.ndarray:
    """True where no other point is at most as costly and at least as good, and strictly better in
    one (lower cost, higher quality). Non-finite points are never on the front."""
    c, q = np.asarray(cost, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    ok = np.isfinite(c) & np.isfinite(q)
    mask = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))
        mask[i] = not dominated.any()
    return mask


def per_layer_correlations(layers, predicted_gain, res2, measured_gain) -> dict:
    """Spearman ρ of each predictor with the measured gain: the card's predicted (singleton) gain and
    two free predictors it must beat, raw ``res2`` and layer depth. ``beats_free_predictors``: ρ of the
    prediction exceeds ρ(res2) and |ρ(depth)| (depth may help either way round, so its sign is free)."""
    rho = {"predicted_gain": spearman(predicted_gain, measured_gain), "res2": spearman(res2, measured_gain),
           "depth": spearman(layers, measured_gain)}
    beats = None
    if rho["predicted_gain"] is not None:
        rivals = [rho["res2"], None if rho["depth"] is None else abs(rho["depth"])]
        beats = all(rho["predicted_gain"] > r for r in rivals if r is not None)
    n = int((np.isfinite(np.asarray(measured_gain, dtype=np.float64))).sum())
    return {"spearman": rho, "n_layers": n, "beats_free_predictors": beats}
