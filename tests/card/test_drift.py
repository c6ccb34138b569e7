"""Drift maths (layercard.card.drift): Kendall τ-b against a brute-force pair count, ranks, relative
change, the card diff and its verdicts, and the reprofile config."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from fake_cards import make_card
from layercard.config import load_config
from layercard.card.drift import (DriftSettings, ReprofileConfig, diff_cards, drift_markdown, kendall_tau, rank_positions,
                             relative_change, singleton_gain, verdict)
from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def brute_force_tau_b(x, y) -> float:
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j] if x[i] != x[j] else 0, y[i] - y[j] if y[i] != y[j] else 0
        if dx == 0:
            tied_x += 1
        if dy == 0:
            tied_y += 1
        if dx != 0 and dy != 0:
            if (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = len(x) * (len(x) - 1) // 2
    denom = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return (concordant - discordant) / denom if denom else math.nan


def test_kendall_tau_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 14))
        # small integer ranges give many ties; a few values are ±inf (κ of a singular layer)
        x = rng.integers(0, 4 if trial % 2 else 1000, n).astype(float)
        y = rng.integers(0, 4 if trial % 3 else 1000, n).astype(float)
        if trial % 5 == 0:
            x[rng.integers(n)] = np.inf
            y[rng.integers(n)] = -np.inf
        want = brute_force_tau_b(list(x), list(y))
        got = kendall_tau(x, y)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12), (x, y)


def test_kendall_tau_known_values():
    x = np.arange(6.0)
    assert kendall_tau(x, x * 3 + 1) == 1.0
    assert kendall_tau(x, -x) == -1.0
    assert kendall_tau(x, [0, 2, 1, 3, 4, 5]) == pytest.approx(1 - 2 * 1 / 15)   # one adjacent swap
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(LayercardError, match="NaN at positions"):
        kendall_tau([1, np.nan], [1, 2])


def test_ranks_relative_change_singleton_gain():
    np.testing.assert_array_equal(rank_positions([3.0, 5.0, 3.0, np.inf]), [3, 2, 4, 1])   # ties: shallower first
    rel = relative_change([1.0, 0.0, 0.0, np.inf, 2.0], [1.5, 0.0, 2.0, np.inf, 1.0])
    np.testing.assert_array_equal(rel, [0.5, 0.0, np.inf, 0.0, -0.5])
    np.testing.assert_allclose(singleton_gain([2.0, 1.0], [4.0, 0.0]), [0.5, 0.0])


def test_identical_cards_no_drift():
    card = make_card()
    report = diff_cards(card, make_card(), DriftSettings())
    assert not report["drift"] and report["changed_layers"] == [] and report["reasons"] == []
    assert report["rankings"]["gain_adj"]["kendall_tau"] == 1.0
    assert report["rankings"]["singleton_gain"]["kendall_tau"] == 1.0
    assert {"top1_gain_adj", "max_quality@k=1"} <= set(report["selections"])
    assert not any(s["changed"] for s in report["selections"].values())
    assert not any(report["changes"].values())
    assert "no drift" in drift_markdown(report)


def test_reordered_ranking_is_drift_naming_layers():
    old = make_card(n_layers=8)
    new = make_card(n_layers=8, gain=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], data_hash="d1")   # reversed
    report = diff_cards(old, new, DriftSettings(max_rel_change={"res2": None}))
    assert report["drift"] and report["changes"]["data"]
    assert report["rankings"]["gain_adj"]["kendall_tau"] == -1.0
    assert any("Kendall τ of the gain_adj ranking is -1.000" in r for r in report["reasons"])
    assert report["changed_layers"] == [0, 1, 2, 5, 6, 7]      # moved more than 2 places (3, 4 move by 1)
    md = drift_markdown(report)
    assert "**DRIFT**" in md and "Changed layers: 0, 1, 2, 5, 6, 7" in md


def test_metric_change_is_drift_only_above_its_limit():
    old = make_card()
    new = make_card(kappa=[100.0, 100.0, 350.0, 100.0])       # κ of layer 2 × 3.5
    report = diff_cards(old, new, DriftSettings())
    assert report["drift"] and report["changed_layers"] == [2]
    assert report["metrics"]["kappa"]["over_limit"] == [2]
    assert "kappa changed by more than 100% in layers [2]" in report["reasons"]
    assert report["layers"][2]["kappa_rel"] == pytest.approx(2.5)
    # the same change, with κ reported but not limited, and a loose limit
    assert not diff_cards(old, new, DriftSettings(max_rel_change={"kappa": None}))["drift"]
    assert not diff_cards(old, new, DriftSettings(max_rel_change={"kappa": 3.0}))["drift"]


def test_selection_change_verdict():
    report = {"layers_only_in_old": [], "layers_only_in_new": [], "metrics": {}, "rankings": {},
              "selections": {"max_quality@k=2": {"old": [0, 1], "new": [0, 3], "changed": True, "entered": [3],
                                                 "left": [1]}}}
    v = verdict(report, DriftSettings())     # no Q to score the sets with: any change counts
    assert v["drift"] and v["changed_layers"] == [1, 3] and "max_quality@k=2 changed" in v["reasons"][0]
    assert not verdict(report, DriftSettings(fail_on_selection_change=False))["drift"]
    report["selections"]["max_quality@k=2"]["retained_value"] = 0.97     # a near-tie: not worth acting on
    assert not verdict(report, DriftSettings())["drift"]
    assert verdict(report, DriftSettings(min_retained_value=1.0))["drift"]
    report["selections"]["max_quality@k=2"]["retained_value"] = 0.80
    v = verdict(report, DriftSettings())
    assert v["drift"] and "keeps 80.0% of the new set's value" in v["reasons"][0]


def test_retained_value_scores_the_old_set_on_the_new_card():
    old = make_card(n_layers=8)
    new = make_card(n_layers=8, gain=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    s = diff_cards(old, new, DriftSettings())["selections"]["max_quality@k=2"]
    assert s["changed"] and s["old"] == [0, 1] and s["new"] == [6, 7]
    assert 0 < s["retained_value"] < 0.5       # the old favourites are the new card's weakest layers
    assert diff_cards(old, make_card(n_layers=8), DriftSettings())["selections"]["max_quality@k=2"]["retained_value"] == 1.0


def test_layer_sets_differ_is_drift():
    report = diff_cards(make_card(n_layers=4), make_card(n_layers=5), DriftSettings())
    assert report["drift"] and report["layers_only_in_new"] == [4] and 4 in report["changed_layers"]


def test_reprofile_config():
    cfg = load_config(ReprofileConfig, TINY, ["drift.min_kendall_tau=0.9", "drift.max_rel_change.kappa=2.0"])
    assert cfg.drift.min_kendall_tau == 0.9
    assert cfg.drift.max_rel_change["kappa"] == 2.0 and cfg.drift.max_rel_change["res2"] == 0.5   # defaults kept
    assert cfg.profile_config() == load_config(ProfileConfig, TINY)
    with pytest.raises(LayercardError, match="drift.max_rel_change.foo' is unknown"):
        load_config(ReprofileConfig, TINY, ["drift.max_rel_change.foo=1"])
    with pytest.raises(LayercardError, match="drift.min_kendall_tau"):
        load_config(ReprofileConfig, TINY, ["drift.min_kendall_tau=2"])
    with pytest.raises(LayercardError, match="'drift.bogus' is unknown"):
        load_config(ReprofileConfig, TINY, ["drift.bogus=1"])


def test_retained_value_of_min_cost_is_a_cost_ratio_or_the_shortfall():
    from layercard.card.drift import retained_value
    from layercard.select.selection import CardArrays

    # three uncoupled, fully reliable layers of equal gain: Q(S) = |S| / 2; deeper layers are cheaper
    A = CardArrays(np.arange(3), np.eye(3), np.ones(3), np.ones(3), np.array([3.0, 2.0, 1.0]), np.ones(3))
    # target 0.6 · Q(all) = 0.9: any two layers reach it; {1, 2} costs 3, {0, 1} costs 4
    assert retained_value(A, "min_cost@0.6", [0, 1], [1, 2]) == pytest.approx(3 / 4)
    assert retained_value(A, "min_cost@0.6", [0], [1, 2]) == pytest.approx(0.5 / 0.9)   # misses the target
    assert retained_value(A, "max_quality@k=2", [0], [1, 2]) == pytest.approx(0.5)
    assert retained_value(None, "max_quality@k=2", [0], [1]) is None
    assert retained_value(A, "max_quality@k=2", [7], [1]) is None                         # a layer the card lacks
