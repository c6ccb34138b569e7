"""``layercard select --layers`` and ``--from-search``: a given set, and the set a finished search measured
best (explore's pick, or the best trained set in results.parquet), written as any selection."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from layercard.card.layer_card import LayerCard
from layercard.errors import LayercardError
from tests.select.test_selection import make_card


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    U = rng.normal(size=(6, 10))
    path = tmp_path_factory.mktemp("cards") / "card"
    make_card(U @ rng.normal(size=10), U @ U.T).save(path)
    return path


def _search(tmp_path, card_id, *, explore=None, results=None):
    out = tmp_path / "search"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"config": {}, "card_id": card_id, "trials": {}}))
    if explore is not None:
        (out / "explore.json").write_text(json.dumps(explore))
    if results is not None:
        pd.DataFrame(results).to_parquet(out / "results.parquet")
    return out


def _row(cand, layers, status, quality):
    return {"candidate": cand, "layers": layers, "status": status, "quality": quality, "quality_name": "label_loss",
            "measured_gain": None if quality is None else 1.0 - quality, "n_trials": 3}


def test_given_layers_are_written_like_any_selection(card_dir, tmp_path):
    from peft import LoraConfig

    from pipelines.select import main

    out = tmp_path / "sel"
    assert main([str(card_dir), "--out", str(out), "--layers", "4,1, 2"]) == 0
    sel = json.loads((out / "selection.json").read_text())
    assert sel["layers"] == [1, 2, 4] and sel["method"] == "given" and sel["strategy"] is None
    assert sel["objective"] is None and "measured" not in sel
    assert LoraConfig.from_pretrained(str(out)).layers_to_transform == [1, 2, 4]
    assert 0 < sel["gain_fraction"] <= 1 and set(sel["baselines"]) >= {"top", "mid"}   # predicted like the rest


@pytest.mark.parametrize("args, pattern", [
    (["--layers", "1,9"], r"--layers: layer 9 is not in the card \(layers 0..5\)"),
    (["--layers", "1,1"], r"--layers: layer 1 is given twice"),
    (["--layers", "1,x"], r"expected layer numbers separated by commas, got '1,x'"),
    (["--layers", ","], r"--layers: give at least one layer"),
    (["--layers", "1", "--k", "1"], r"--k does not apply to --layers"),
    (["--layers", "1", "--strategy", "top"], r"not --strategy and --layers"),
    (["--from-search", "x", "--target", "0.5"], r"--target does not apply to --from-search"),
])
def test_bad_layers_are_one_line_errors(card_dir, tmp_path, args, pattern):
    from pipelines.select import main

    with pytest.raises(LayercardError, match=pattern) as e:
        main([str(card_dir), "--out", str(tmp_path / "x"), *args])
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_from_search_takes_explores_pick(card_dir, tmp_path):
    from pipelines.select import main

    card = LayerCard.load(card_dir, with_stats=False)
    rows = [{"k": 2, "picked_layers": [5, 0], "picked_candidate": "k2c07", "gain_fraction_mean": 0.9,
             "gain_fraction_sd": 0.02, "gain_fraction_mean_unselected": 0.88, "seeds": [0, 1, 2]},
            {"k": 3, "picked_layers": [1, 3, 4], "picked_candidate": "k3c01", "gain_fraction_mean": 0.95,
             "gain_fraction_sd": None, "seeds": [0]}]
    search = _search(tmp_path, card.card_id, explore=rows)
    out = tmp_path / "sel"
    assert main([str(card_dir), "--out", str(out), "--from-search", str(search), "--k", "2"]) == 0
    sel = json.loads((out / "selection.json").read_text())
    assert sel["layers"] == [0, 5] and sel["method"] == "measured"
    assert sel["measured"] == {"search": str(search.resolve()), "source": "explore.json", "k": 2, "candidate": "k2c07",
                               "gain_fraction_mean": 0.9, "gain_fraction_sd": 0.02,
                               "gain_fraction_mean_unselected": 0.88, "seeds": [0, 1, 2]}
    with pytest.raises(LayercardError, match=r"picked at k = \[2, 3\]; give one of them with --k"):
        main([str(card_dir), "--out", str(tmp_path / "y"), "--from-search", str(search)])
    with pytest.raises(LayercardError, match=r"picked at k = \[2, 3\]"):
        main([str(card_dir), "--out", str(tmp_path / "y"), "--from-search", str(search), "--k", "4"])


def test_from_search_takes_the_best_trained_set_of_a_fixed_search(card_dir, tmp_path):
    from layercard.select.run import run_select

    card = LayerCard.load(card_dir, with_stats=False)
    results = [_row("c00", [0, 1], "trained", 0.40), _row("c01", [2, 5], "trained", 0.30),
               _row("c02", [3, 4], "stopped", None), _row("c03", [1, 2, 3], "trained", 0.20),
               _row("c04", [0, 1, 2, 3, 4, 5], "trained", 0.10), _row("c05", [4, 5], "failed", None)]
    search = _search(tmp_path, card.card_id, results=results)
    sel = run_select(card_dir, tmp_path / "a", from_search=str(search), k=2)
    assert sel["layers"] == [2, 5] and sel["measured"]["candidate"] == "c01" and sel["measured"]["quality"] == 0.30
    sel = run_select(card_dir, tmp_path / "b", from_search=str(search))       # any k, all layers aside
    assert sel["layers"] == [1, 2, 3] and sel["measured"]["k"] == 3
    with pytest.raises(LayercardError, match="no set with 4 layers was trained to the end"):
        run_select(card_dir, tmp_path / "c", from_search=str(search), k=4)


def test_from_search_refuses_another_cards_search_and_an_unfinished_one(card_dir, tmp_path):
    from layercard.select.run import run_select

    other = _search(tmp_path, "0123456789abcdef")
    with pytest.raises(LayercardError, match="ran on card 0123456789abcdef, not on"):
        run_select(card_dir, tmp_path / "a", from_search=str(other))
    (other / "search.json").write_text(json.dumps({"card_id": LayerCard.load(card_dir, with_stats=False).card_id}))
    with pytest.raises(LayercardError, match="has no results.parquet: the search has not finished"):
        run_select(card_dir, tmp_path / "a", from_search=str(other))
    with pytest.raises(LayercardError, match="holds no search"):
        run_select(card_dir, tmp_path / "a", from_search=str(tmp_path / "nothing"))
    assert not (tmp_path / "a").exists()


def test_from_search_with_a_truncated_explore_record_is_one_line(card_dir, tmp_path):
    from layercard.select.run import run_select

    search = _search(tmp_path, LayerCard.load(card_dir, with_stats=False).card_id)
    (search / "explore.json").write_text('[{"k": 2, "picked_')              # a killed writer
    with pytest.raises(LayercardError, match="explore.json' is unreadable") as e:
        run_select(card_dir, tmp_path / "a", from_search=str(search))
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()
