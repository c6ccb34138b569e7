"""Baseline strategies: k distinct valid layers, the documented choices, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from layercard.select.baselines import STRATEGIES, baseline_layers, baseline_positions
from layercard.card.layer_card import LayerCard, STAT_COLUMNS
from layercard.errors import LayercardError


def card_with(ids, grad_norm, block_influence=None) -> LayerCard:
    t = pd.DataFrame({"layer": ids, "n_tokens": 10, **{c: 1.0 for c in STAT_COLUMNS}})
    t["grad_norm"] = grad_norm
    if block_influence is not None:
        t["block_influence"] = block_influence
    mods = pd.DataFrame(columns=["layer", "module", "target", "d_in", "d_out", "n_tokens", *STAT_COLUMNS])
    return LayerCard(t, mods, np.zeros((len(ids), len(ids))), None, {})


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "all"])
def test_every_strategy_returns_k_distinct_valid_layers(strategy):
    rng = np.random.default_rng(0)
    for L in (1, 2, 3, 7, 10, 36):
        scores = rng.random(L)
        for k in range(1, L + 1):
            pos = baseline_positions(strategy, L, k, seed=5, scores=scores)
            assert len(pos) == k and len(set(pos)) == k and pos == sorted(pos)
            assert all(isinstance(p, int) and 0 <= p < L for p in pos)


def test_documented_choices():
    assert baseline_positions("all", 5, None) == [0, 1, 2, 3, 4]
    assert baseline_positions("top", 10, 3) == [7, 8, 9]
    assert baseline_positions("bottom", 10, 3) == [0, 1, 2]
    assert baseline_positions("mid", 10, 4) == [3, 4, 5, 6]
    assert baseline_positions("mid", 9, 3) == [3, 4, 5]
    assert baseline_positions("uniform", 10, 4) == [0, 3, 6, 9]
    assert baseline_positions("uniform", 30, 5) == [0, 7, 15, 22, 29]
    assert baseline_positions("uniform", 10, 1) == [4]
    assert baseline_positions("random", 30, 5, seed=1) == baseline_positions("random", 30, 5, seed=1)
    assert baseline_positions("random", 30, 5, seed=1) != baseline_positions("random", 30, 5, seed=2)
    assert baseline_positions("grad-norm", 5, 2, scores=np.array([1.0, 5.0, 2.0, 4.0, 3.0])) == [1, 3]


def test_card_strategies_map_positions_to_layer_ids():
    card = card_with([2, 5, 7, 9, 11], grad_norm=[5.0, 1.0, 4.0, 2.0, 3.0], block_influence=[0.1, 0.5, 0.2, 0.4, 0.3])
    assert baseline_layers(card, "top", 2) == [9, 11]
    assert baseline_layers(card, "bottom", 2) == [2, 5]
    assert baseline_layers(card, "grad-norm", 2) == [2, 7]
    assert baseline_layers(card, "block-influence", 2) == [5, 9]
    assert baseline_layers(card, "all", None) == [2, 5, 7, 9, 11]


def test_bad_input_names_the_culprit():
    for k in (0, -2, 11):
        with pytest.raises(LayercardError, match=rf"k={k} is out of range: the card has 10 layers"):
            baseline_positions("top", 10, k)
    with pytest.raises(LayercardError, match="strategy 'best' is not one of"):
        baseline_positions("best", 10, 2)
    with pytest.raises(LayercardError, match="needs --k"):
        baseline_positions("mid", 10, None)
    card = card_with([0, 1, 2], grad_norm=[1.0, np.nan, 2.0])
    with pytest.raises(LayercardError, match="needs card column 'block_influence'"):
        baseline_layers(card, "block-influence", 1)
    with pytest.raises(LayercardError, match="'grad_norm' is missing or not finite"):
        baseline_layers(card, "grad-norm", 1)
