"""What ``layercard search mode=explore`` trains, and how its steps are planned and judged. Pure: no Ray, no torch.

**Pool per k.** The card's pick (max-quality at k under the budget); its best one-shift neighbours
(one layer moved up or down by 1..``shift_max`` positions) and best one-swap neighbours (one layer
swapped for any other), both ranked by the card's set score (:func:`card_score`); every baseline at
k (:mod:`layercard.select.baselines`); stratified random sets (one layer per depth bin, seeded) filling the
pool up to its size. Identical sets are trained once and keep every label that proposed them; sets
over the cost budget are left out. The ablation (``card_candidates=False``) keeps the same size and
the baselines, and fills with stratified random sets none of which is the card's pick or one of its
neighbours.

**Steps.** :func:`asha_milestones` are the rungs Ray Tune's ASHA uses; :func:`expected_asha_steps`
is a conservative estimate of what successive halving spends on a pool (the first trial at a rung
always continues, so one more than ``n / eta^i`` reaches rung i); :func:`plan_pool_size` is the
largest pool whose estimate fits the budget left after the fixed costs (the all-layer reference on
every seed, the picks on the other seeds). :func:`fixed_steps` is the cost of training the card's
pick, every baseline at k and the all-layer reference to the end on every seed (the paper table).

**Judging.** :func:`rung_spearman`: on the sets trained to the end, Spearman ρ between each rung's
quality and the final quality. :func:`gain_fractions`: (base − set) / (base − all layers), per seed.
"""
from __future__ import annotations

import math

import numpy as np

from layercard.select.candidates import Candidate, spearman
from layercard.errors import LayercardError

__all__ = ["card_score", "shift_neighbours", "swap_neighbours", "stratified_sets", "build_pool", "asha_milestones",
           "expected_asha_steps", "plan_pool_size", "fixed_steps", "rung_spearman", "gain_fractions",
           "quality_at_rungs", "make_candidates", "neighbour_sets", "RUNG_GATE"]

RUNG_GATE = 0.8      # below this Spearman ρ a rung's ranking is not to be trusted for the task and recipe


def card_score(card, budget_unit: str = "flops", arrays=None):
    """layers → the card's set score (the selection objective, :func:`layercard.select.selection.set_quality`) on
    ``arrays`` (a :class:`~layercard.select.selection.CardArrays`; None: ``arrays_from_card`` with its defaults)."""
    from layercard.select.selection import arrays_from_card, set_quality

    arrays = arrays if arrays is not None else arrays_from_card(card, budget_unit)
    return lambda layers: float(set_quality(arrays, list(layers)))


def _key(layers) -> tuple[int, ...]:
    return tuple(sorted(int(l) for l in layers))


def shift_neighbours(ids: list[int], layers, shift_max: int = 2) -> list[tuple[int, ...]]:
    """Every set that moves one layer of ``layers`` up or down by 1..shift_max positions among the card's
    layers ``ids`` (onto a layer not already in the set), distinct, in a fixed order."""
    pos = {l: i for i, l in enumerate(ids)}
    base = set(_key(layers))
    out: dict[tuple, None] = {}
    for l in sorted(base):
        for d in [s * m for m in range(1, shift_max + 1) for s in (-1, 1)]:
            j = pos[l] + d
            if 0 <= j < len(ids) and ids[j] not in base:
                out[_key((base - {l}) | {ids[j]})] = None
    return list(out)


def swap_neighbours(ids: list[int], layers) -> list[tuple[int, ...]]:
    """Every set that swaps one layer of ``layers`` for a card layer outside it, distinct, in a fixed order."""
    base = set(_key(layers))
    out: dict[tuple, None] = {}
    for l in sorted(base):
        for m in ids:
            if m not in base:
                out[_key((base - {l}) | {m})] = None
    return list(out)


def _best(sets, score, n: int, taken: set) -> list[tuple[int, ...]]:
    """The ``n`` best-scored sets not in ``taken`` (ties: the earlier one)."""
    fresh = [s for s in sets if s not in taken]
    scores = [score(s) for s in fresh]
    order = sorted(range(len(fresh)), key=lambda i: (-scores[i], i))
    return [fresh[i] for i in order[:n]]


def stratified_sets(ids: list[int], k: int, n: int, seed: int, avoid: set = frozenset(),
                    max_draws: int = 10_000) -> list[tuple[int, ...]]:
    """``n`` distinct sets of one layer per depth bin (the card's layers cut into k contiguous bins of
    near-equal size), drawn uniformly within each bin by ``numpy.random.default_rng(seed)``; sets in
    ``avoid`` are skipped. Fewer when the bins hold fewer distinct sets."""
    if not 1 <= k <= len(ids):
        raise LayercardError(f"k={k} is out of range: the card has {len(ids)} layers")
    bins = np.array_split(np.asarray(ids), k)
    rng = np.random.default_rng(seed)
    out: dict[tuple, None] = {}
    draws = 0
    while len(out) < n and draws < max_draws:
        draws += 1
        s = _key(int(b[rng.integers(len(b))]) for b in bins)
        if s not in avoid and s not in out:
            out[s] = None
    return list(out)


def build_pool(card, k: int, *, size: int, budget: float | None = None, budget_unit: str = "flops",
               strategies=(), random_seeds=(0,), n_shifts: int = 2, n_swaps: int = 2, shift_max: int = 2,
               seed: int = 0, card_candidates: bool = True, prefix: str = "", arrays=None) -> list[Candidate]:
    """The explore pool at set size ``k`` (see the module doc): at most ``size`` distinct candidates
    within the budget (fewer only when the card has too few distinct sets), ids ``{prefix}c00``, ...
    The all-layer strategy is not in the pool (the search trains it to the end apart). ``arrays``: the
    selection inputs the pick and the scores come from (None: the card's defaults)."""
    from layercard.select.baselines import baseline_layers
    from layercard.select.selection import arrays_from_card, select_max_quality

    ids = [int(l) for l in card.layer_ids]
    if not 1 <= k <= len(ids):
        raise LayercardError(f"config key 'ks' has {k}: the card has {len(ids)} layers, so every k must be in "
                             f"1..{len(ids)}")
    A = arrays if arrays is not None else arrays_from_card(card, budget_unit)
    score = card_score(card, budget_unit, A)
    fits = _fits(card, budget, budget_unit)
    proposals: list[tuple[tuple, str, str | None, str | None]] = []   # (set, label, objective, strategy)
    pick = None
    try:
        pick = _key(select_max_quality(A, k=k, budget=budget).layers)
    except LayercardError:          # the budget is below the cheapest set of size <= k
        pass
    near = set()              # what the card proposes: its pick and the pick's best neighbours
    if pick is not None:
        shifts = _best([s for s in shift_neighbours(ids, pick, shift_max) if fits(s)], score, n_shifts, {pick})
        swaps = _best([s for s in swap_neighbours(ids, pick) if fits(s)], score, n_swaps, {pick, *shifts})
        near = {pick, *shifts, *swaps}
        if card_candidates:
            proposals.append((pick, f"max-quality k={k}", "max-quality", None))
            proposals += [(s, f"shift k={k} #{i + 1}", "neighbour", None) for i, s in enumerate(shifts)]
            proposals += [(s, f"swap k={k} #{i + 1}", "neighbour", None) for i, s in enumerate(swaps)]
    for name in strategies:
        if name == "all":
            continue
        for rs in (random_seeds if name == "random" else [None]):
            s = _key(baseline_layers(card, name, k, seed=rs))
            if fits(s) and (card_candidates or s not in near):
                proposals.append((s, f"{name} k={k}" + (f" seed={rs}" if rs is not None else ""), None, name))
    distinct = list(dict.fromkeys(p[0] for p in proposals))[:size]
    avoid = set(distinct) | (set() if card_candidates else near)
    fill = [s for s in stratified_sets(ids, k, 4 * size, seed, avoid) if fits(s)][:size - len(distinct)]
    proposals += [(s, f"stratified k={k} #{i + 1}", None, "stratified") for i, s in enumerate(fill)]
    return make_candidates(card, proposals, size, budget, budget_unit, prefix, A)


def _fits(card, budget, budget_unit):
    from layercard.select.selection import card_cost

    if budget is None:
        return lambda layers: True
    return lambda layers: card_cost(card, list(layers), budget_unit) <= budget * (1 + 1e-12)


def make_candidates(card, proposals, size, budget, budget_unit, prefix, arrays=None) -> list[Candidate]:
    """Distinct sets in proposal order (each keeps every label), at most ``size``, with predictions."""
    from layercard.select.selection import card_cost

    score = card_score(card, budget_unit, arrays)
    all_gain = score(card.layer_ids)
    by_set: dict[tuple, Candidate] = {}
    for layers, label, objective, strategy in proposals:
        c = by_set.get(layers)
        if c is None:
            if len(by_set) >= size:
                continue
            c = by_set[layers] = Candidate(id=f"{prefix}c{len(by_set):02d}", layers=list(layers), labels=[])
        c.add_proposal(label, objective, strategy)
    for c in by_set.values():
        c.predict(card, score(c.layers), all_gain)
        c.cost = card_cost(card, c.layers, budget_unit)
        c.over_budget = budget is not None and c.cost > budget * (1 + 1e-12)
    return list(by_set.values())


def neighbour_sets(card, survivors: list[list[int]], n: int, taken: set, *, budget=None, budget_unit: str = "flops",
                   shift_max: int = 2, by_card: bool = True, seed: int = 0, arrays=None) -> list[tuple[int, ...]]:
    """Second round: ``n`` one-shift / one-swap neighbours of the survivors not in ``taken`` and within the
    budget — the best by the card's score (``by_card``), else a seeded random draw."""
    ids = [int(l) for l in card.layer_ids]
    fits = _fits(card, budget, budget_unit)
    sets = list(dict.fromkeys(s for layers in survivors
                              for s in [*shift_neighbours(ids, layers, shift_max), *swap_neighbours(ids, layers)]
                              if s not in taken and fits(s)))
    if by_card:
        return _best(sets, card_score(card, budget_unit, arrays), n, set())
    rng = np.random.default_rng(seed)
    return [sets[i] for i in sorted(rng.permutation(len(sets))[:n])]


# --------------------------------------------------------------------------- steps
def asha_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The rungs (steps) at which Ray Tune's ASHA (one bracket) compares trials, ascending; those at
    ``max_t`` or beyond are dropped (a trial there has finished)."""
    n = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return [m for m in sorted(int(round(grace_period * reduction_factor ** i)) for i in range(n)) if m < max_t]


def expected_asha_steps(n: int, milestones: list[int], max_t: int, reduction_factor: float) -> int:
    """Training steps successive halving spends on ``n`` trials: ``min(n, ceil(n / eta^i) + 1)`` reach
    rung i ≥ 1 (asynchronous halving lets the first arrival at a rung through), the rest stop there."""
    reach = [n] + [min(n, math.ceil(n / reduction_factor ** i) + 1) for i in range(1, len(milestones) + 1)]
    stops = [milestones[i] * (reach[i] - reach[i + 1]) for i in range(len(milestones))]
    return int(sum(stops) + reach[-1] * max_t)


def plan_pool_size(available_steps: float, milestones: list[int], max_t: int, reduction_factor: float,
                   cap: int | None = None) -> int:
    """The largest pool whose :func:`expected_asha_steps` fits ``available_steps`` (at most ``cap``)."""
    n = 0
    while (cap is None or n < cap) and expected_asha_steps(n + 1, milestones, max_t, reduction_factor) <= available_steps:
        n += 1
    return n


def fixed_steps(k: int, n_layers: int, strategies, random_seeds, n_seeds: int, steps: int) -> int:
    """Steps of the fixed table at k: the card's pick, every baseline at k (one per random seed) and the
    all-layer reference, each trained to the end on every seed."""
    sets = 1 + sum(len(random_seeds) if s == "random" else 1 for s in strategies if s != "all") + 1
    return sets * n_seeds * steps


# --------------------------------------------------------------------------- judging
def quality_at_rungs(history: dict, milestones: list[int]) -> list[float | None]:
    """A trial's rung quality at each milestone: the first one reported at or after it (history: step →
    quality; keys may be strings, as JSON keeps them)."""
    h = sorted((int(s), q) for s, q in history.items())
    return [next((q for s, q in h if s >= m), None) for m in milestones]


def rung_spearman(rung_qualities: list[list[float | None]], final: list[float]) -> list[float | None]:
    """Per rung: Spearman ρ between the rung qualities and the final qualities of the sets trained to
    the end (None where fewer than 2 pairs or no spread)."""
    if not rung_qualities:
        return []
    n_rungs = len(rung_qualities[0])
    nan = float("nan")
    return [spearman([nan if r[i] is None else r[i] for r in rung_qualities], final) for i in range(n_rungs)]


def unselected_mean(gain_fractions: list[float], seeds: list[int], selection_seed: int) -> float | None:
    """Mean gain fraction over the seeds the pick was *not* chosen on: the pick is the best of many sets on
    ``selection_seed``, so its result there is biased upwards (winner's curse); the other seeds are not."""
    rest = [g for g, s in zip(gain_fractions, seeds) if s != selection_seed]
    return sum(rest) / len(rest) if rest else None


def gain_fractions(base: float, set_quality: dict[int, float], all_quality: dict[int, float]) -> list[float]:
    """(base − set) / (base − all layers) per seed both were trained with (same seed: same data order)."""
    return [(base - set_quality[s]) / (base - all_quality[s]) for s in sorted(set_quality)
            if s in all_quality and base != all_quality[s]]
