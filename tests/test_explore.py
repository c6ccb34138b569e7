"""``layercard search mode=explore``. Pure (no Ray): the pool (card pick, neighbours by the card's score,
baselines, stratified random sets, deduplicated; the ablation without the card's sets), the ASHA rungs
and the step plan, the rung gate. Then real Ray: a rung eval leaves training as it was (same losses),
a real explore search on a tiny random Qwen3 (ASHA stops the worse trials at a rung, resume keeps the
finished ones, explore.json), and one under ``ray job submit`` on a test head."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layercard import explore as ex
from layercard.baselines import STRATEGIES, baseline_layers
from layercard.card import STAT_COLUMNS, LayerCard
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.search_config import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
SEARCH_YAML = ROOT / "configs" / "search-tiny.yaml"
PROFILE = ["data.num_samples=32", "coupling.probe_samples=8", "cost.steps=1"]
RANK = 4
MODULES = [("self_attn.q_proj", "q_proj", 16, 16), ("mlp.down_proj", "down_proj", 32, 16)]


def synthetic_card(L: int = 12, seed: int = 0) -> LayerCard:
    """A complete card with coupling and analytic cost: K the Gram of random directions, b in their span."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(L, 2 * L))
    K = U @ U.T
    b = U @ rng.normal(size=2 * L)
    t = pd.DataFrame({"layer": range(L), "n_tokens": 100})
    for c in STAT_COLUMNS:
        t[c] = 1.0
    t["res2"] = rng.uniform(1, 2, L)
    t["res2_rank_r"] = 0.6 * t["res2"]
    t["gain_adj"] = 0.5 * t["res2"]
    t["gain_adj_rank_r"] = 0.6 * t["gain_adj"]
    t["kappa"] = 100.0
    t["grad_norm"] = rng.uniform(1, 2, L)
    t["block_influence"] = rng.uniform(0.1, 0.3, L)
    t["b"], t["k_diag"] = b, np.diag(K)
    per_layer = sum(RANK * (a + o) for _, _, a, o in MODULES)
    t["adapter_params"] = per_layer
    t["adapter_flops_per_token"] = 6.0 * per_layer
    t["backprop_flops_per_token"] = [1e4 * (L - i) + 5e3 for i in range(L)]
    t["forward_flops_per_token"] = 1e4
    t["act_bytes_per_token"] = 1.0
    meta = {"layers_pattern": "layers", "rank": RANK, "modules": [m[0] for m in MODULES],
            "target_modules": [m[1] for m in MODULES], "weights_hash": "w" * 8, "model_id": "synthetic",
            "cost_model": {"forward_flops_per_token": 1e4 * L + 5e3, "rank": RANK, "seq_len": 16}}
    mods = pd.DataFrame([{"layer": l, "module": m, "target": tg, "d_in": a, "d_out": o, "n_tokens": 100,
                          **{c: 1.0 for c in STAT_COLUMNS}} for l in range(L) for m, tg, a, o in MODULES])
    d = np.sqrt(np.diag(K))
    return LayerCard(t, mods, K / np.outer(d, d), K, meta)


# --------------------------------------------------------------------------- the pool (pure)
def test_neighbours_are_every_one_shift_and_one_swap():
    ids = list(range(8))
    S = (1, 4, 5)
    shifts = ex.shift_neighbours(ids, S, shift_max=2)
    brute = {tuple(sorted((set(S) - {l}) | {l + d})) for l in S for d in (-2, -1, 1, 2)
             if 0 <= l + d < 8 and l + d not in S}
    assert set(shifts) == brute and len(shifts) == len(brute)
    swaps = ex.swap_neighbours(ids, S)
    assert set(swaps) == {tuple(sorted((set(S) - {l}) | {m})) for l in S for m in ids if m not in S}
    assert set(shifts) <= set(swaps) and all(len(set(s) ^ set(S)) == 2 for s in swaps)


def test_stratified_sets_take_one_layer_per_depth_bin_seeded():
    ids = list(range(10, 22))
    sets = ex.stratified_sets(ids, 4, 20, seed=3)
    bins = np.array_split(np.asarray(ids), 4)
    assert len(sets) == 20 == len(set(sets))
    assert all(all(s[i] in bins[i] for i in range(4)) for s in sets)
    assert sets == ex.stratified_sets(ids, 4, 20, seed=3) and sets != ex.stratified_sets(ids, 4, 20, seed=4)
    assert len(ex.stratified_sets(ids, 12, 5, seed=0)) == 1           # one set only when every bin holds one layer
    assert ex.stratified_sets(ids, 4, 5, seed=3, avoid=set(sets[:3]))[:2] == sets[3:5]


def test_pool_is_the_card_pick_its_best_neighbours_the_baselines_then_stratified():
    from layercard.selection import arrays_from_card, select_max_quality, set_quality

    card = synthetic_card()
    A = arrays_from_card(card)
    k, size = 3, 16
    pool = ex.build_pool(card, k, size=size, strategies=STRATEGIES, random_seeds=[0, 1], n_shifts=2, n_swaps=3, seed=7)
    sets = [tuple(c.layers) for c in pool]
    assert len(pool) == size and len(set(sets)) == size                     # deduplicated, full
    assert [c.id for c in pool] == [f"c{i:02d}" for i in range(size)]
    pick = tuple(select_max_quality(A, k=k).layers)
    assert sets[0] == pick and pool[0].objectives == ["max-quality"]
    score = lambda s: set_quality(A, list(s))  # noqa: E731
    shifts = [c for c in pool if any(l.startswith("shift") for l in c.labels)]
    swaps = [c for c in pool if any(l.startswith("swap") for l in c.labels)]
    assert len(shifts) == 2 and len(swaps) == 3
    best_shifts = sorted((s for s in ex.shift_neighbours(card.layer_ids, pick) if s != pick), key=lambda s: -score(s))[:2]
    assert [tuple(c.layers) for c in shifts] == best_shifts
    rest = [s for s in ex.swap_neighbours(card.layer_ids, pick) if s not in best_shifts]
    assert [tuple(c.layers) for c in swaps] == sorted(rest, key=lambda s: -score(s))[:3]
    for name in ("top", "bottom", "mid", "uniform", "grad-norm", "block-influence"):
        want = tuple(baseline_layers(card, name, k))
        assert any(tuple(c.layers) == want and f"{name} k={k}" in c.labels for c in pool), name
    for seed in (0, 1):
        assert tuple(baseline_layers(card, "random", k, seed=seed)) in sets
    assert not any(c.k != k for c in pool) and tuple(card.layer_ids) not in sets     # all layers: apart
    strat = [c for c in pool if c.strategies == ["stratified"]]
    assert strat and all(c.labels[0].startswith("stratified") for c in strat)
    assert all(c.predicted_gain == pytest.approx(score(c.layers)) and c.cost > 0 for c in pool)


def test_identical_proposals_become_one_candidate_with_every_label():
    card = synthetic_card(L=6)
    # k = 6 - 1: few sets exist, so baselines and neighbours coincide
    pool = ex.build_pool(card, 5, size=50, strategies=STRATEGIES, random_seeds=[0, 1, 2])
    sets = [tuple(c.layers) for c in pool]
    assert len(sets) == len(set(sets)) <= 6                                 # C(6, 5) sets at most, each once
    labels = [l for c in pool for l in c.labels]
    assert len(labels) == len(set(labels)) > len(pool)                     # every proposal kept its label
    assert {"max-quality k=5", "top k=5", "bottom k=5"} <= set(labels)


def test_ablation_pool_holds_no_card_pick_or_neighbour_and_has_the_same_size():
    from layercard.selection import arrays_from_card, select_max_quality

    card = synthetic_card()
    k = 3
    pick = tuple(select_max_quality(arrays_from_card(card), k=k).layers)
    near = {pick, *ex.swap_neighbours(card.layer_ids, pick)}
    full = ex.build_pool(card, k, size=14, strategies=STRATEGIES, random_seeds=[0])
    abl = ex.build_pool(card, k, size=14, strategies=STRATEGIES, random_seeds=[0], card_candidates=False)
    assert len(abl) == len(full) == 14
    assert not {tuple(c.layers) for c in abl} & near
    assert not any(c.objectives for c in abl)                              # nothing the card proposed
    baselines = {tuple(baseline_layers(card, s, k, seed=0)) for s in STRATEGIES if s != "all"}
    assert baselines - near <= {tuple(c.layers) for c in abl}               # baselines stay (unless a neighbour)


def test_pool_respects_the_budget():
    from layercard.selection import card_cost

    card = synthetic_card()
    costs = sorted(card_cost(card, list(s)) for s in itertools.combinations(card.layer_ids, 3))
    budget = costs[len(costs) // 2]
    pool = ex.build_pool(card, 3, size=20, budget=budget, strategies=STRATEGIES)
    assert pool and all(c.cost <= budget * (1 + 1e-12) and not c.over_budget for c in pool)


# --------------------------------------------------------------------------- steps and judging (pure)
def test_milestones_match_ray_ashas_rungs():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, eta, max_t in [(10, 3, 60), (2, 2, 6), (1, 3, 6), (5, 2, 40), (3, 4, 100)]:
        rungs = sorted(m for m, _ in _Bracket(grace, max_t, eta, 0)._rungs)
        assert ex.asha_milestones(grace, eta, max_t) == [int(m) for m in rungs if m < max_t]


def test_expected_steps_and_pool_plan():
    m = ex.asha_milestones(10, 3, 60)                                        # [10, 30]
    assert ex.expected_asha_steps(9, m, 60, 3) == 5 * 10 + 2 * 30 + 2 * 60    # 9 → 4+1 → 1+1 reach the rungs
    assert ex.expected_asha_steps(1, m, 60, 3) == 60
    n = ex.plan_pool_size(1000, m, 60, 3)
    assert ex.expected_asha_steps(n, m, 60, 3) <= 1000 < ex.expected_asha_steps(n + 1, m, 60, 3)
    assert ex.plan_pool_size(1000, m, 60, 3, cap=5) == 5
    # the fixed table: card + 7 baselines at k + all layers, 3 seeds, 60 steps
    assert ex.fixed_steps(5, 30, STRATEGIES, [0], 3, 60) == 9 * 3 * 60


def test_rung_spearman_and_gain_fractions():
    assert ex.quality_at_rungs({"2": 1.0, "4": 0.8, "6": 0.7}, [2, 3]) == [1.0, 0.8]
    rho = ex.rung_spearman([[1.0, 0.9], [2.0, 0.5], [3.0, 0.7]], [0.1, 0.2, 0.3])
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-0.5)
    assert ex.gain_fractions(1.0, {0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.5, 1: 0.5}) == pytest.approx([0.8, 0.6])


def test_explore_config_is_checked():
    base = [f"card=x", "mode=explore"]
    for override, key in [("explore.reduction_factor=1", "explore.reduction_factor"),
                          ("explore.grace_period=6", "explore.grace_period"),
                          ("explore.pool_size=1", "explore.pool_size"),
                          ("asha.enabled=true", "asha.enabled")]:
        with pytest.raises(LayercardError, match=key.replace(".", r"\.")):
            load_config(SearchConfig, SEARCH_YAML, [*base, override])
    cfg = load_config(SearchConfig, SEARCH_YAML, base)
    assert not cfg.use_asha and cfg.grace_period == 1


def test_best_fixed_from_the_committed_paper_table():
    from pipelines.explore import best_fixed_from_table

    path = ROOT / "benchmarks" / "results" / "paper_table.json"
    rows = [r for r in json.loads(path.read_text()) if r["task"] == "sentiment" and r["k"] == 5
            and r["strategy"] != "all"]
    name, gf = best_fixed_from_table(path, "sentiment", 5)
    means = {s: np.mean([r["gain_fraction"] for r in rows if r["strategy"] == s]) for s in {r["strategy"] for r in rows}}
    assert gf == pytest.approx(max(means.values())) and means[name] == pytest.approx(gf)
    assert best_fixed_from_table(path, "sentiment", 99) == (None, None)
