"""Card-guided selection: known answers on synthetic cards, greedy vs exact, bad input, the CLI."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from layercard.card.layer_card import LayerCard, STAT_COLUMNS
from layercard.profile.coupling import set_gain
from layercard.errors import LayercardError
from layercard.select.selection import (
    CardArrays,
    arrays_from_card,
    pareto_front,
    reliability,
    select_max_quality,
    select_min_cost,
    set_cost,
    set_quality,
)

RANK = 4
MODULES = [("self_attn.q_proj", "q_proj", 16, 16), ("mlp.down_proj", "down_proj", 32, 16)]


# ---------------------------------------------------------------------------------------------
# Synthetic inputs
# ---------------------------------------------------------------------------------------------
def arrays(b, K=None, *, weight=None, lowest=None, added=None, layers=None) -> CardArrays:
    b = np.asarray(b, dtype=float)
    L = len(b)
    return CardArrays(np.arange(L) if layers is None else np.asarray(layers),
                      np.eye(L) if K is None else K, b,
                      np.ones(L) if weight is None else weight,
                      np.linspace(10.0, 5.0, L) if lowest is None else lowest,
                      np.full(L, 0.1) if added is None else added)


def make_card(b, K, *, res2=None, gain_adj=None, kappa=None, cost=True, layers=None, step_fit=False,
              grad_norm=None, block_influence=None) -> LayerCard:
    """A complete synthetic card: 2 modules per layer, f = 1 and equal κ unless given, analytic cost."""
    L = len(b)
    ids = list(range(L)) if layers is None else list(layers)
    res2 = np.ones(L) if res2 is None else np.asarray(res2, float)
    t = pd.DataFrame({"layer": ids, "n_tokens": 100})
    for c in STAT_COLUMNS:
        t[c] = 1.0
    t["res2"] = res2
    t["res2_rank_r"] = 0.6 * res2
    t["gain_adj"] = 0.5 * res2 if gain_adj is None else gain_adj
    t["gain_adj_rank_r"] = 0.6 * t["gain_adj"]
    t["kappa"] = 100.0 if kappa is None else kappa
    t["grad_norm"] = np.linspace(2.0, 1.0, L) if grad_norm is None else grad_norm
    t["block_influence"] = np.linspace(0.1, 0.3, L) if block_influence is None else block_influence
    t["b"] = b
    t["k_diag"] = np.diag(K)
    meta = {"layers_pattern": "layers", "rank": RANK, "modules": [m[0] for m in MODULES],
            "target_modules": [m[1] for m in MODULES], "weights_hash": "w" * 8, "model_id": "synthetic"}
    if cost:
        per_layer = sum(RANK * (a + o) for _, _, a, o in MODULES)
        t["adapter_params"] = per_layer
        t["adapter_flops_per_token"] = 6.0 * per_layer
        t["backprop_flops_per_token"] = [1e4 * (L - i) + 5e3 for i in range(L)]
        t["forward_flops_per_token"] = 1e4
        t["act_bytes_per_token"] = 1.0
        meta["cost_model"] = {"forward_flops_per_token": 1e4 * L + 5e3, "rank": RANK, "seq_len": 16}
        if step_fit:
            meta["cost_fit"] = {"features": ["intercept", "backprop_flops_per_token", "adapter_flops_per_token"],
                                "coef": [0.01, 1e-6, 1e-6], "r2": 0.99, "n_points": 3}
            t["step_seconds"] = 0.01 + 1e-6 * t["backprop_flops_per_token"] + 1e-6 * t["adapter_flops_per_token"]
            t["peak_bytes"] = 1e6
            t["step_measured"] = [i in (0, L - 1) for i in range(L)]
    mods = pd.DataFrame([{"layer": l, "module": m, "target": tg, "d_in": a, "d_out": o, "n_tokens": 100,
                          **{c: 1.0 for c in STAT_COLUMNS}} for l in ids for m, tg, a, o in MODULES])
    d = np.sqrt(np.diag(K))
    return LayerCard(t, mods, K / np.outer(d, d), K, meta)


def random_problem(rng, L):
    """K = Gram of L random directions in R^m (some near-duplicates), b in their span."""
    m = int(rng.integers(L, 2 * L + 1))
    U = rng.normal(size=(L, m)) * rng.uniform(0.2, 2.0, size=(L, 1))
    for _ in range(int(rng.integers(0, 3))):
        i, j = rng.choice(L, 2, replace=False)
        U[j] = U[i] * rng.uniform(0.5, 2) + 0.05 * rng.normal(size=m)
    g = rng.normal(size=m)
    lowest = np.sort(rng.uniform(1.0, 10.0, size=L))[::-1]
    return CardArrays(np.arange(L), U @ U.T, U @ g, rng.uniform(0.2, 1.0, size=L), lowest,
                      rng.uniform(0.05, 0.3, size=L))


def brute_force(A: CardArrays):
    """Every non-empty set with its gain (coupling.set_gain on K̂ + E, b̂) and cost (direct formula)."""
    out = []
    for s in range(1, A.L + 1):
        for S in itertools.combinations(range(A.L), s):
            out.append((S, set_gain(A.K_eff, A.b_eff, list(S)), A.lowest_cost[S[0]] + A.added_cost[list(S[1:])].sum()))
    return out


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------
def test_additive_gains_pick_top_k_by_gain():
    gains = np.array([0.3, 2.0, 0.1, 1.5, 0.7, 1.9, 0.2, 0.05])
    A = arrays(np.sqrt(2 * gains))
    for k in range(1, 6):
        s = select_max_quality(A, k=k)
        assert set(s.layers) == set(np.argsort(-gains)[:k].tolist())
        assert s.gain == pytest.approx(np.sort(gains)[::-1][:k].sum(), rel=1e-12)
    assert set_quality(A, range(8)) == pytest.approx(gains.sum(), rel=1e-12)


def test_quality_is_the_coupling_gain_of_the_reliability_model():
    rng = np.random.default_rng(3)
    A = random_problem(rng, 7)
    r = A.weight
    K_hat = np.sqrt(np.outer(r, r)) * A.K + np.diag((1 - r) * np.diag(A.K))
    ones = CardArrays(A.layers, A.K, A.b, np.ones(7), A.lowest_cost, A.added_cost)
    for S in ([0], [1, 4], [0, 2, 3, 6], list(range(7))):
        assert set_quality(A, S) == pytest.approx(set_gain(K_hat, np.sqrt(r) * A.b, S), rel=1e-9)
        assert set_quality(ones, S) == pytest.approx(set_gain(A.K, A.b, S), rel=1e-9)   # r ≡ 1: docs/design.md §1
        assert set_quality(A, S) <= set_quality(ones, S) * (1 + 1e-9)


def test_replacing_a_field_does_not_reuse_derived_quantities():
    import dataclasses

    rng = np.random.default_rng(4)
    A = random_problem(rng, 6)
    before = set_quality(A, [0, 2, 5])                  # fills A's cache (K_eff)
    ones = dataclasses.replace(A, weight=np.ones(6))
    assert set_quality(ones, [0, 2, 5]) == pytest.approx(set_gain(A.K, A.b, [0, 2, 5]), rel=1e-9)
    assert set_quality(A, [0, 2, 5]) == before


def test_near_duplicate_layers_of_unequal_reliability_buy_no_spurious_gain():
    u = np.array([[1.0, 0.0], [1.0, 1e-4]])            # two layers, almost the same output direction
    K, b = u @ u.T, u @ np.array([1.0, 0.0])
    A = arrays(b, K, weight=np.array([1.0, 0.25]))
    assert set_quality(A, [0, 1]) <= 0.5 + 1e-9             # ≤ the unweighted gain ½‖g‖²
    assert set_quality(A, [0, 1]) == pytest.approx(set_quality(A, [0]), rel=1e-3)


def test_strongly_coupled_pair_only_one_is_chosen():
    L = 6
    K = np.eye(L)
    K[2, 5] = K[5, 2] = 0.999                       # layers 2 and 5 make nearly the same correction
    b = np.array([0.5, 0.6, 1.4, 0.4, 1.0, 1.4])
    A = arrays(b, K)
    s = select_max_quality(A, k=2)
    assert len({2, 5} & set(s.layers)) == 1 and 4 in s.layers
    # additive reasoning would have taken the pair
    assert set(np.argsort(-(b**2))[:2].tolist()) == {2, 5}


def test_ill_conditioned_early_layer_loses_to_well_conditioned_layer():
    L = 5
    K = np.eye(L)
    b = np.sqrt(2 * np.array([1.1, 0.2, 1.0, 0.3, 0.1]))   # layer 0's gain is slightly larger
    res2 = np.array([1e6, 10.0, 5.0, 3.0, 1.0])             # and its raw resnorm is huge
    kappa = np.array([1e8, 1e3, 1e3, 1e3, 1e3])
    card = make_card(b, K, res2=res2, gain_adj=0.5 * 0.99 * res2, kappa=kappa)
    assert select_max_quality(arrays_from_card(card), k=1).layers == (2,)
    w = reliability(res2, 0.5 * 0.99 * res2, kappa)
    assert w[0] < 1e-2 and np.allclose(w[1:], 0.99**2)
    # with ordinary conditioning layer 0 would have won: κ, not res2, decides
    card_ok = make_card(b, K, res2=res2, gain_adj=0.5 * 0.99 * res2, kappa=np.full(L, 1e3))
    assert select_max_quality(arrays_from_card(card_ok), k=1).layers == (0,)


def test_raw_res2_scale_does_not_change_the_choice():
    b = np.sqrt(2 * np.array([0.3, 0.9, 0.5, 0.8]))
    res2 = np.array([1.0, 2.0, 3.0, 4.0])
    base = select_max_quality(arrays_from_card(make_card(b, np.eye(4), res2=res2)), k=2)
    scaled = res2 * np.array([2000.0, 1.0, 1.0, 1e-3])     # pilot: res2 spans 2000x by depth
    assert select_max_quality(arrays_from_card(make_card(b, np.eye(4), res2=scaled)), k=2).layers == base.layers


def test_kappa_term_does_not_flatten_a_uniformly_ill_conditioned_model():
    # pilot: κ ∈ [5e4, 1.5e6] everywhere; a layer at the median keeps its full weight
    kappa = np.geomspace(5e4, 1.5e6, 30)
    w = reliability(np.ones(30), np.full(30, 0.5), kappa)
    assert w.max() == 1.0 and w.min() > 0.4


def test_noisy_layer_is_discounted_by_its_noise_share():
    w = reliability(np.array([1.0, 1.0, 1.0, 0.0]), np.array([0.5, 0.25, 0.0, 0.0]), np.full(4, 10.0))
    assert w.tolist() == [1.0, 0.25, 0.0, 0.0]


def test_budget_bounds_the_lowest_layer():
    A = arrays(np.ones(6), lowest=np.array([10.0, 9, 8, 7, 6, 5]), added=np.full(6, 0.5))
    assert select_max_quality(A, budget=8.0).layers == (3, 4, 5)      # 7 + 0.5 + 0.5
    s = select_max_quality(A, budget=7.9)                               # {3, 4, 5} no longer fits
    assert s.layers == (4, 5) and s.cost == 6.5                         # 2 layers: the cheapest pair
    s = select_max_quality(A, k=2, budget=100)
    assert s.layers == (4, 5)  # equal gains: the cheapest pair


def test_min_cost_picks_the_cheapest_set_meeting_the_target():
    A = arrays(np.sqrt(2 * np.array([1.0, 1.0, 1.0, 1.0, 5.0])))   # the top layer carries most gain
    s = select_min_cost(A, 0.5)
    assert s.layers == (4,)
    rng = np.random.default_rng(7)
    for _ in range(10):
        A = random_problem(rng, int(rng.integers(3, 8)))
        t = float(rng.uniform(0.1, 1.0))
        g_all = set_quality(A, range(A.L))
        ok = [(c, -g) for S, g, c in brute_force(A) if g >= t * g_all * (1 - 1e-9)]
        s = select_min_cost(A, t)
        assert s.gain >= t * g_all * (1 - 1e-9)
        assert s.cost == pytest.approx(min(ok)[0], rel=1e-12)


def test_pareto_is_non_dominated_complete_and_has_the_all_layer_set():
    rng = np.random.default_rng(11)
    for _ in range(5):
        A = random_problem(rng, 6)
        front = pareto_front(A)
        assert front[-1].layers == tuple(range(6))
        for p, q in itertools.permutations(front, 2):
            assert not (q.gain >= p.gain and q.cost <= p.cost and (q.gain > p.gain or q.cost < p.cost))
        for S, g, c in brute_force(A):   # every set is weakly dominated by a front member
            assert any(f.gain >= g * (1 - 1e-9) and f.cost <= c * (1 + 1e-12) for f in front)
        greedy = pareto_front(A, exact_max_layers=0)
        assert greedy[-1].layers == tuple(range(6)) and all(s.method == "greedy" for s in greedy)


def test_greedy_against_exact_enumeration_on_random_cards():
    rng = np.random.default_rng(2026)
    worst_q, worst_c = 0.0, 0.0
    for trial in range(60):
        A = random_problem(rng, int(rng.integers(3, 11)))
        k = int(rng.integers(1, A.L + 1))
        budget = None if trial % 3 == 0 else float(rng.uniform(A.lowest_cost.min(), A.lowest_cost.max() + 1.0))
        exact = select_max_quality(A, k=k, budget=budget)
        greedy = select_max_quality(A, k=k, budget=budget, exact_max_layers=0)
        assert exact.method == "exact" and greedy.method == "greedy"
        assert len(greedy.layers) <= k and (budget is None or greedy.cost <= budget)
        assert greedy.gain <= exact.gain * (1 + 1e-9)
        worst_q = max(worst_q, (exact.gain - greedy.gain) / exact.gain)
        t = float(rng.uniform(0.2, 1.0))
        e, g = select_min_cost(A, t), select_min_cost(A, t, exact_max_layers=0)
        assert g.gain >= t * set_quality(A, range(A.L)) * (1 - 1e-9)
        worst_c = max(worst_c, (g.cost - e.cost) / e.cost)
    print(f"\ngreedy vs exact over 60 random cards (L 3..10): worst relative gain gap {worst_q:.3g}, "
          f"worst relative min-cost excess {worst_c:.3g}")
    assert worst_q <= 0.05 and worst_c <= 0.05


# ---------------------------------------------------------------------------------------------
# From a card, and bad input
# ---------------------------------------------------------------------------------------------
def test_card_cost_decomposition_matches_predicted_cost():
    from layercard.profile.cost import predicted_cost

    card = make_card(np.ones(6), np.eye(6), layers=[3, 5, 8, 9, 12, 14], step_fit=True)
    for unit, key in (("flops", "flops_per_token"), ("seconds", "step_seconds")):
        A = arrays_from_card(card, unit)
        for S in ([5], [3, 9], [8, 9, 12, 14], [3, 5, 8, 9, 12, 14]):
            assert set_cost(A, S) == pytest.approx(predicted_cost(card, S)[key], rel=1e-12)


def _msg(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_input_is_a_one_line_error_naming_the_culprit():
    A = arrays(np.ones(4), lowest=np.array([8.0, 7.0, 6.0, 5.5]))
    for k in (0, -1, 5):
        with pytest.raises(LayercardError, match=rf"k={k} is out of range.*4 layers") as e:
            select_max_quality(A, k=k)
        _msg(e)
    with pytest.raises(LayercardError, match=r"budget 3 FLOPs/token is below the cheapest single layer \(layer 3: 5.5 FLOPs/token\)"):
        select_max_quality(A, budget=3.0)
    for t in (0.0, -0.1, 1.5):
        with pytest.raises(LayercardError, match=r"target .* is outside \(0, 1\]"):
            select_min_cost(A, t)


def test_card_without_coupling_or_cost_names_the_command():
    card = make_card(np.ones(3), np.eye(3))
    no_coupling = LayerCard(card.layers.drop(columns=["b"]), card.modules, card.coupling, None, card.meta)
    with pytest.raises(LayercardError, match=r"lacks coupling.*`layercard profile` \(coupling pass\) fills them") as e:
        arrays_from_card(no_coupling)
    _msg(e)
    no_cost = make_card(np.ones(3), np.eye(3), cost=False)
    with pytest.raises(LayercardError, match=r"lacks columns \['adapter_params'.*`layercard profile` with cost measurement"):
        arrays_from_card(no_cost)
    with pytest.raises(LayercardError, match=r"step_seconds.*cost measurement"):
        arrays_from_card(card, "seconds")       # analytic cost only, nothing measured


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    L = 6
    K = np.eye(L)
    K[1, 2] = K[2, 1] = 0.5
    b = np.sqrt(2 * np.array([0.2, 1.0, 0.9, 0.3, 0.8, 0.4]))
    path = tmp_path_factory.mktemp("cards") / "card"
    make_card(b, K, step_fit=True).save(path)
    return path


def test_cli_max_quality_writes_peft_config_and_selection(card_dir, tmp_path, capsys):
    from peft import LoraConfig

    from pipelines.select import main

    out = tmp_path / "sel"
    assert main([str(card_dir), "--out", str(out), "--objective", "max-quality", "--k", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "selection.json"]
    cfg = LoraConfig.from_pretrained(str(out))
    sel = json.loads((out / "selection.json").read_text())
    assert sel["layers"] == [1, 4, 5]      # not [1, 2, 4]: layers 1 and 2 overlap (ρ = 0.5)
    assert cfg.layers_to_transform == sel["layers"] and cfg.layers_pattern == "layers"
    assert set(cfg.target_modules) == {"q_proj", "down_proj"} and cfg.r == RANK
    card = LayerCard.load(card_dir)
    assert sel["card_id"] == card.card_id and sel["weights_hash"] == "w" * 8
    assert sel["objective"] == "max-quality" and sel["parameters"]["k"] == 3
    assert 0 < sel["gain_fraction"] <= 1 and 0 < sel["cost_fraction"]["flops_per_token"] <= 1
    assert sel["cost_fraction"]["step_seconds"] is not None and sel["adapted_layers"] == 3
    assert set(sel["baselines"]) >= {"top", "bottom", "mid", "uniform", "random", "grad-norm", "block-influence"}
    assert all(v["predicted_gain"] <= sel["predicted_gain"] + 1e-12
               for name, v in sel["baselines"].items() if name != "all")
    assert "layers" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp dir left


def test_cli_min_cost_pareto_strategy_and_rank_budget(card_dir, tmp_path):
    from pipelines.select import main

    main([str(card_dir), "--out", str(tmp_path / "mc"), "--objective", "min-cost", "--target", "0.5"])
    sel = json.loads((tmp_path / "mc" / "selection.json").read_text())
    assert sel["gain_fraction"] >= 0.5 - 1e-9

    main([str(card_dir), "--out", str(tmp_path / "pf"), "--objective", "pareto", "--budget-unit", "seconds"])
    pf = json.loads((tmp_path / "pf" / "pareto.json").read_text())
    assert pf["sets"][-1]["layers"] == list(range(6)) and pf["cost_unit"] == "step_seconds"
    assert json.loads((tmp_path / "pf" / "selection.json").read_text())["layers"] == list(range(6))

    main([str(card_dir), "--out", str(tmp_path / "rnd"), "--strategy", "random", "--k", "2", "--seed", "3"])
    sel = json.loads((tmp_path / "rnd" / "selection.json").read_text())
    assert sel["strategy"] == "random" and sel["parameters"]["seed"] == 3 and len(sel["layers"]) == 2

    per_layer = sum(a + o for _, _, a, o in MODULES)
    main([str(card_dir), "--out", str(tmp_path / "rb"), "--k", "3", "--rank-budget", str(10 * per_layer)])
    sel = json.loads((tmp_path / "rb" / "selection.json").read_text())
    assert sel["adapter_params"] <= 10 * per_layer and sum(sel["ranks"].values()) == 10


def test_cli_errors(card_dir, tmp_path):
    from pipelines.select import main

    out = str(tmp_path / "x")
    cases = [
        (["--k", "7"], r"k=7 is out of range"),
        (["--budget", "1"], r"budget 1 FLOPs/token is below the cheapest single layer \(layer 5: "),
        (["--objective", "min-cost", "--target", "1.2"], r"target 1.2 is outside \(0, 1\]"),
        (["--objective", "max-quality"], r"needs --k and/or --budget"),
        (["--strategy", "top", "--objective", "pareto"], r"not --strategy and --objective"),
        (["--k", "2", "--rank-budget", "10"], r"--rank-budget 10 is below one rank-1 adapter on the 2 chosen layers"),
        (["--strategy", "bogus"], r"invalid choice: 'bogus'"),
    ]
    for args, pattern in cases:
        with pytest.raises(LayercardError, match=pattern) as e:
            main([str(card_dir), "--out", out, *args])
        _msg(e)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LayercardError, match="already exists"):
        main([str(card_dir), "--out", str(tmp_path / "exists"), "--k", "1"])


def test_card_reliability_reads_the_full_rank_noise_pair():
    # f from gain_adj/res2 (0.25), not from the rank-r pair (1.0): the rank-r variant measured worse
    b, K = np.ones(3), np.eye(3)
    card = make_card(b, K, res2=np.full(3, 4.0), gain_adj=np.full(3, 0.5))
    card.layers["gain_adj_rank_r"] = 0.5 * card.layers["res2_rank_r"]
    from layercard.select.selection import card_reliability

    np.testing.assert_allclose(card_reliability(card), 0.25**2)
    np.testing.assert_allclose(arrays_from_card(card).weight, 0.25**2)
