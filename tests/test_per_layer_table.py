"""benchmarks/per_layer_table.py: the per-layer predictors and their rank agreement with single-layer
trainings, checked against float64 brute force on a synthetic card, and the script end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.bench_scripts import load_benchmark
from tests.select.test_selection import make_card



@pytest.fixture(scope="module")
def plt_mod():
    return load_benchmark("per_layer_table")


def _card(L=7, seed=0):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(L, 12))
    return make_card(U @ rng.normal(size=12), U @ U.T, res2=rng.uniform(1, 2, L), kappa=rng.uniform(10, 1e3, L))


def _rho_closed_form(x, y):
    """Spearman for tie-free data: 1 − 6 Σ d² / (n (n² − 1))."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    n = len(x)
    return 1.0 - 6.0 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))


def _rho_with_ties(x, y):
    """Spearman by brute force when values tie: Pearson of the average ranks, rank_i = #{x < x_i} +
    (#{x = x_i} + 1) / 2, counted pairwise."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        return np.array([(v < a).sum() + ((v == a).sum() + 1) / 2.0 for a in v])

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))


def test_predictors_are_the_card_terms(plt_mod):
    from layercard.select import selection as sel

    card = _card()
    p = plt_mod.layer_predictors(card)
    b, K = card.layers["b"].to_numpy(), card.coupling_k
    one_step = b**2 / (2.0 * np.diag(K))
    r = sel.card_reliability(card)
    np.testing.assert_allclose(p["b²/2K (no reliability)"], one_step, rtol=1e-12)
    np.testing.assert_allclose(p["reliability r"], r, rtol=1e-12)
    # Q({ℓ}) is the card's set quality of the singleton, which is r · b²/2K
    A = sel.arrays_from_card(card)
    want = [sel.set_quality(A, [l]) for l in card.layer_ids]
    np.testing.assert_allclose(p[plt_mod.NEWTON], want, rtol=1e-9)
    np.testing.assert_allclose(p[plt_mod.NEWTON], r * one_step, rtol=1e-9)
    assert "coverage Q({ℓ})" not in p                   # no sign-step columns on this card
    np.testing.assert_array_equal(p["depth"], np.arange(7))
    np.testing.assert_array_equal(p["grad_norm"], card.layers["grad_norm"].to_numpy())


def test_sign_step_models_singletons_where_the_card_has_their_columns(plt_mod):
    """adam and coverage Q({ℓ}) at the recipe's step budget, written out: the trust-region gain of layer ℓ's
    sign step alone, and Σ_j G_j·|ρ_jℓ| over every layer j."""
    from layercard.profile.adam_step import trust_region_gain

    card = _card()
    rng = np.random.default_rng(5)
    U = rng.normal(size=(7, 4)) + 0.5 * rng.normal(size=(1, 4))
    H = U @ U.T
    card.layers["adam_b"] = rng.uniform(1.0, 3.0, 7) * 9.0
    card.coupling_adam = H * 9.0
    card.meta["coupling_tokens"] = 9
    p = plt_mod.layer_predictors(card, step_budget=0.05)
    s = card.layers["adam_b"].to_numpy() / 9.0
    G = trust_region_gain(s, np.diag(H), 0.05)
    np.testing.assert_allclose(p["adam Q({ℓ})"], G, rtol=1e-9)
    sim = np.abs(H) / np.sqrt(np.outer(np.diag(H), np.diag(H)))
    np.testing.assert_allclose(p["coverage Q({ℓ})"], [sum(G[j] * sim[j, l] for j in range(7)) for l in range(7)],
                               rtol=1e-9)


def test_agreement_matches_closed_form_spearman_and_skips_unmeasured(plt_mod):
    rng = np.random.default_rng(3)
    for n in (5, 12, 30):
        preds = {"a": rng.normal(size=n), "b": rng.normal(size=n)}
        y = rng.normal(size=n)
        rho = plt_mod.agreement(preds, y)
        for k, x in preds.items():
            assert rho[k] == pytest.approx(_rho_closed_form(x, y), abs=1e-12)
    # an unmeasured layer (NaN) is left out of the ranking, not ranked last
    x, y = rng.normal(size=9), rng.normal(size=9)
    y_nan = y.copy()
    y_nan[4] = np.nan
    keep = np.arange(9) != 4
    assert plt_mod.agreement({"x": x}, y_nan)["x"] == pytest.approx(_rho_closed_form(x[keep], y[keep]), abs=1e-12)
    assert plt_mod.agreement({"flat": np.ones(9)}, y)["flat"] is None
    tied = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.5, 2.0, 4.0])   # reliability r ties at 1 on real cards
    assert plt_mod.agreement({"t": tied}, y)["t"] == pytest.approx(_rho_with_ties(tied, y), abs=1e-12)
    assert _rho_with_ties(x, y) == pytest.approx(_rho_closed_form(x, y), abs=1e-12)


def test_top_overlap_counts_shared_best_layers(plt_mod):
    measured = np.array([5.0, 1.0, 4.0, np.nan, 3.0, 0.0])
    assert plt_mod.top_overlap(measured, measured, 3) == 3
    assert plt_mod.top_overlap(-measured, measured, 2) == 0
    # predictor's top 2 are layers 1 and 4; measured top 2 are 0 and 2 → none; top 3 adds 4 to measured
    pred = np.array([0.0, 9.0, 1.0, 100.0, 8.0, 2.0])   # layer 3 is unmeasured: not counted even if ranked first
    assert plt_mod.top_overlap(pred, measured, 2) == 0
    assert plt_mod.top_overlap(pred, measured, 3) == 1


def _per_layer_search(tmp_path, card, measured, mode="per-layer"):
    card.layers["measured_gain"] = measured
    card.meta.update({"parent_card_id": "abc123", "search": {"mode": mode, "steps": 60, "batch_size": 4,
                                                             "lr": 1e-3, "seeds": [0], "quality": "eval_loss"}})
    out = tmp_path / "search"
    card.save(out / "card")
    return out


def test_script_writes_table_json_and_plot(plt_mod, tmp_path):
    from PIL import Image

    card = _card()
    measured = np.random.default_rng(1).normal(size=7)
    measured[2] = np.nan
    search = _per_layer_search(tmp_path, card, measured)
    res = tmp_path / "results"
    assert plt_mod.main(["--search", str(search), "--name", "t", "--top", "3", "--results", str(res)]) == 0
    doc = json.loads((res / "per_layer_t.json").read_text())
    preds = plt_mod.layer_predictors(card)
    keep = np.isfinite(measured)
    for k, v in preds.items():
        want = None if np.ptp(v[keep]) == 0 else _rho_with_ties(v[keep], measured[keep])
        assert doc["spearman"][k] == (None if want is None else pytest.approx(want, abs=1e-12))
    assert doc["card_id"] == "abc123" and doc["top"] == 3
    md = (res / "per_layer_t.md").read_text()
    assert f"| {plt_mod.NEWTON} |" in md and md.count("\n| ") >= 7 + len(preds)
    assert Image.open(res / "per_layer_t.png").size[0] > 500


def test_script_refuses_a_subsets_search_and_writes_nothing(plt_mod, tmp_path):
    search = _per_layer_search(tmp_path, _card(), np.arange(7.0), mode="subsets")
    res = tmp_path / "results"
    with pytest.raises(SystemExit, match="not the card of a finished mode=per-layer search"):
        plt_mod.main(["--search", str(search), "--name", "t", "--results", str(res)])
    with pytest.raises(SystemExit, match="holds no card"):
        plt_mod.main(["--search", str(tmp_path / "nowhere"), "--name", "t", "--results", str(res)])
    assert not res.exists()
