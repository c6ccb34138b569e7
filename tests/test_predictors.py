"""benchmarks/predictors.py: the within-k Spearman and its permutation p-value against exact enumeration,
the measured sets read from paper-table rows, and the leave-one-task-out choice against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def pred():
    return load_benchmark("predictors")


def _rho(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    n = len(x)
    return 1.0 - 6.0 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))


def test_within_k_matches_exact_enumeration(pred):
    rng = np.random.default_rng(3)
    scores = {3: rng.normal(size=4), 5: rng.normal(size=4)}
    measured = {3: rng.normal(size=4), 5: rng.normal(size=4)}
    got = pred.within_k(scores, measured, perms=4000, seed=1)
    for k in scores:
        assert got["per_k"][str(k)] == pytest.approx(_rho(scores[k], measured[k]), abs=1e-12)
    mean = np.mean([_rho(scores[k], measured[k]) for k in scores])
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    # the exact one-sided p: every pair of within-k permutations, equally likely
    perms = list(itertools.permutations(range(4)))
    hits = sum(np.mean([_rho(scores[3], measured[3][list(a)]), _rho(scores[5], measured[5][list(b)])]) >= mean - 1e-12
               for a in perms for b in perms)
    assert got["p_value"] == pytest.approx(hits / len(perms) ** 2, abs=0.03)


def test_measured_sets_average_seeds_and_skip_reference_and_min_cost(pred):
    rows = [{"task": "t", "k": 3, "strategy": "top", "layers": [5, 6, 7], "gain_fraction": 0.5},
            {"task": "t", "k": 3, "strategy": "top", "layers": [5, 6, 7], "gain_fraction": 0.7},
            {"task": "t", "k": 3, "strategy": "card", "layers": [0, 3, 6], "gain_fraction": 0.9},
            {"task": "t", "k": 3, "strategy": "min-cost@0.9", "layers": [1, 2, 3], "gain_fraction": 0.1},
            {"task": "t", "k": 8, "strategy": "all", "layers": list(range(8)), "gain_fraction": 1.0},
            {"task": "u", "k": 3, "strategy": "top", "layers": [5, 6, 7], "gain_fraction": 0.0},
            {"task": "t", "k": 4, "strategy": "top", "layers": [4, 5, 6, 7], "gain_fraction": 0.3}]
    assert pred.measured_sets(rows, "t") == {3: [((0, 3, 6), 0.9), ((5, 6, 7), pytest.approx(0.6))]}


def _board(task, means):
    return {"task": task, "sets": {n: {"mean": m} for n, m in means.items()}}


def test_leave_one_task_out_against_brute_force(pred):
    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(6)]
    boards = [_board(t, dict(zip(names, rng.uniform(-1, 1, len(names))))) for t in ("a", "b", "c", "d")]
    rows = pred.leave_one_task_out(boards)
    assert [r["held_out"] for r in rows] == ["a", "b", "c", "d"]
    for held, r in zip(boards, rows):
        others = [b for b in boards if b is not held]
        best = max(names, key=lambda n: sum(b["sets"][n]["mean"] for b in others))
        assert r["chosen"] == best and r["chosen_on"] == [b["task"] for b in others]
        assert r["chosen_rho_on_others"] == pytest.approx(np.mean([b["sets"][best]["mean"] for b in others]))
        held_means = {n: held["sets"][n]["mean"] for n in names}
        assert r["held_out_rho"] == held_means[best]
        assert r["held_out_rank"] == 1 + sum(v > held_means[best] for v in held_means.values())
        assert r["held_out_best_rho"] == max(held_means.values()) and r["of"] == len(names)


def test_leave_one_task_out_uses_only_predictors_every_task_has(pred):
    boards = [_board("a", {"x": 0.1, "only_a": 0.9}), _board("b", {"x": 0.2, "only_a_missing": 0.0})]
    rows = pred.leave_one_task_out(boards)
    assert [r["chosen"] for r in rows] == ["x", "x"]
    assert pred.leave_one_task_out(boards[:1]) == []
    md = pred.markdown([], {"command": "c", "commit": "h", "machine": "m"}, rows)
    assert "| a | b | x | +0.20 | **+0.10** | 1 of 1 |" in md


def _search(d, task, k, seeds, candidates, trials):
    """A finished search's two files as `layercard search` writes them (the columns search_sets reads)."""
    import json

    import pandas as pd

    d.mkdir()
    (d / "search.json").write_text(json.dumps({
        "config": {"ks": [k], "seeds": seeds, "explore": {"task": task}, "train": {"data": {"path": f"{task}.jsonl"}}},
        "candidates": [{"id": c, "layers": ls} for c, ls in candidates.items()]}))
    pd.DataFrame([{"candidate": c, "seed": s, "status": st, "measured_gain": g} for c, s, st, g in trials]
                 ).to_parquet(d / "trials.parquet")
    return d


def test_search_sets_pool_trained_sets_with_the_table_on_the_first_seed(pred, tmp_path):
    all8 = list(range(8))
    a = _search(tmp_path / "a", "t", 2, [0, 1], {"c0": [3, 1], "c1": [5, 6], "c2": [0, 7], "all": all8},
                [("c0", 0, "trained", 0.05), ("c1", 0, "stopped_early", 0.20), ("c2", 1, "trained", 0.30),
                 ("all", 0, "trained", 0.10), ("all", 1, "trained", 0.50)])
    b = _search(tmp_path / "b", "t", 2, [0], {"d0": [1, 3], "d1": [2, 4], "all": all8},
                [("d0", 0, "trained", 0.05), ("d1", 0, "trained", 0.12), ("all", 0, "trained", 0.10)])
    other = _search(tmp_path / "o", "u", 2, [0], {"e0": [0, 1], "all": all8},
                    [("e0", 0, "trained", 9.0), ("all", 0, "trained", 1.0)])
    rows = [{"task": "t", "k": 2, "seed": 0, "strategy": "top", "layers": [6, 7], "gain_fraction": 0.8},
            {"task": "t", "k": 2, "seed": 0, "strategy": "bottom", "layers": [2, 4], "gain_fraction": 1.2},
            {"task": "t", "k": 2, "seed": 1, "strategy": "mid", "layers": [3, 4], "gain_fraction": 0.1},
            {"task": "t", "k": 3, "seed": 0, "strategy": "top", "layers": [5, 6, 7], "gain_fraction": 0.1},
            {"task": "u", "k": 2, "seed": 0, "strategy": "top", "layers": [6, 7], "gain_fraction": 0.5}]
    k, seed, got = pred.search_sets([a, b, other], "t", rows)
    # trained on seed 0 only, gain over the same seed's all-layer gain; a set in two sources counted once
    assert (k, seed) == (2, 0)
    assert got == {(1, 3): pytest.approx(0.5), (2, 4): pytest.approx(1.2), (6, 7): 0.8}
    assert pred.search_sets([other], "t", rows) is None
    rows[1]["gain_fraction"] = 1.0   # the same set and seed, another result: not the same recipe
    with pytest.raises(SystemExit, match=r"set \[2, 4\]"):
        pred.search_sets([a, b], "t", rows)
