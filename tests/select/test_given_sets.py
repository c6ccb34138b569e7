"""Layer sets given in a search's config (``sets``): trained beside the proposals, each once, and checked
against the card before any work."""
from __future__ import annotations

import pytest

from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.search.config import SearchConfig
from layercard.select.candidates import build_candidates
from tests.search.test_explore import synthetic_card as make_card
from tests.search.test_search import SEARCH_YAML


def test_given_sets_join_the_proposals_once():
    card = make_card(6)
    cands = build_candidates(card, ks=[2], strategies=["top", "all"], sets=[[5, 4], [0, 2, 3], [1]])
    by_layers = {tuple(c.layers): c for c in cands}
    # [4, 5] is also top-2: one candidate with both labels; the others are new, after the proposals
    top = by_layers[(4, 5)]
    assert "top k=2" in top.labels and top.labels[-1] == "given 4,5" and top.strategies == ["top", "given"]
    assert by_layers[(0, 2, 3)].labels == ["given 0,2,3"] and not by_layers[(0, 2, 3)].card_guided
    assert [c.id for c in cands][-2:] == [by_layers[(0, 2, 3)].id, by_layers[(1,)].id]
    assert all(c.predicted_gain is not None and c.cost is not None for c in cands)
    only = build_candidates(card, ks=[], strategies=["all"], sets=[[1, 2]])
    assert [c.layers for c in only] == [list(range(6)), [1, 2]]


@pytest.mark.parametrize("bad, msg", [([7, 1], "names layer 7, not in the card (layers 0..5)"),
                                      ([1, 1], "repeats a layer"), ([], "is empty")])
def test_a_bad_given_set_is_one_line_naming_it(bad, msg):
    with pytest.raises(LayercardError, match=r"config key 'sets' has \[.*\], which " + msg.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        build_candidates(make_card(6), ks=[2], strategies=["all"], sets=[[0, 1], bad])


def test_sets_config():
    cfg = load_config(SearchConfig, SEARCH_YAML, ["card=x", "sets=[[1,2],[0,3]]", "ks=[]", "strategies=[all]"])
    assert cfg.sets == [[1, 2], [0, 3]] and cfg.ks == []
    with pytest.raises(LayercardError, match="config key 'ks' must not be empty"):
        load_config(SearchConfig, SEARCH_YAML, ["card=x", "ks=[]"])
    with pytest.raises(LayercardError, match="config key 'sets' is for mode=subsets, not mode=explore"):
        load_config(SearchConfig, SEARCH_YAML, ["card=x", "sets=[[1,2]]", "mode=explore"])
