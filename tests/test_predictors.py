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


def _record(key, layers, quality, base=1.0, complete=True):
    import json

    reports = [{"step": 1, "rung_quality": quality + 0.5}]
    if complete:
        reports.append({"step": 2, "quality": quality, "initial_quality": base, "adapter_layers": list(layers)})
    return json.dumps({"fingerprint": key, "source": "s", "key": key, "complete": complete, "reports": reports}) + "\n"


def test_record_files_pool_their_finished_runs_like_a_search(pred, tmp_path):
    """Runs of a run-record file: trained to the end on the pooled seed, gain over the file's all-layer run
    (else the table's); a cut run and another seed are left out; a disagreement with the table is refused."""
    f = tmp_path / "runs.jsonl"
    f.write_text(_record("c0-s0", [3, 1], 0.8) + _record("c1-s0", [5, 6], 0.6) + _record("all-s0", range(8), 0.5)
                 + _record("c2-s0", [0, 7], 0.9, complete=False) + _record("c3-s1", [2, 3], 0.7))
    rows = [{"task": "t", "k": 2, "seed": 0, "strategy": "top", "layers": [6, 7], "gain_fraction": 0.3},
            {"task": "t", "k": 2, "seed": 0, "strategy": "mid", "layers": [5, 6], "gain_fraction": 0.8}]
    k, seed, got = pred.search_sets([], "t", rows, [f])
    assert (k, seed) == (2, 0)
    assert got == {(1, 3): pytest.approx(0.4), (5, 6): pytest.approx(0.8), (6, 7): 0.3}
    # no reference in the file: the table's all-layer run at that seed
    g = tmp_path / "noref.jsonl"
    g.write_text(_record("c0-s0", [3, 1], 0.8, base=1.1) + _record("c1-s0", [2, 4], 0.9, base=1.1))
    table = [*rows, {"task": "t", "k": 8, "seed": 0, "strategy": "all", "layers": list(range(8)), "quality": 0.1,
                     "gain_fraction": 1.0}]
    _, _, got = pred.search_sets([], "t", table, [g])
    assert got[(1, 3)] == pytest.approx(0.3 / 1.0) and got[(2, 4)] == pytest.approx(0.2 / 1.0)
    with pytest.raises(SystemExit, match="no all-layer reference on seed 0"):
        pred.search_sets([], "t", rows, [g])
    rows[1]["gain_fraction"] = 0.5
    with pytest.raises(SystemExit, match=r"set \[5, 6\]"):
        pred.search_sets([], "t", rows, [f])
    assert pred.search_sets([], "t", rows, []) is None


def test_update_recomputes_one_task_and_keeps_the_others(pred, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    out.mkdir()
    old = {"task": "other", "step_budget": 0.03, "sets_per_k": {"5": 3}, "per_layer": None, "pooled": None,
           "sets": {"coverage Q": {"per_k": {"5": 0.5}, "mean": 0.5, "p_value": 0.2}}}
    (out / "predictors.json").write_text(json.dumps({"meta": {"command": "old cmd", "commit": "abc", "machine": "m"},
                                                     "tasks": [old], "leave_one_task_out": []}))
    assert pred.main(["--cards", str(tmp_path / "cards"), "--tasks", "missing", "--out", str(out), "--update"]) == 2
    assert "no card for task 'missing'" in capsys.readouterr().err
    assert pred.main(["--cards", str(tmp_path), "--records", "t=nothing.jsonl", "--out", str(out)]) == 2
    assert "--records 't=nothing.jsonl' is not TASK=FILE.jsonl" in capsys.readouterr().err
    new = {**old, "task": "a", "computed": {"command": "new cmd", "commit": "def", "machine": "m"}}
    replaced = {**old, "task": "other", "computed": new["computed"]}
    assert pred.with_kept_boards([new], out / "predictors.json") == [new, {**old, "computed": {
        "command": "old cmd", "commit": "abc", "machine": "m"}}]
    assert pred.with_kept_boards([replaced], out / "predictors.json") == [replaced]     # recomputed: not kept
    assert pred.with_kept_boards([new], out / "none.json") == [new]
    md = pred.markdown(pred.with_kept_boards([new], out / "predictors.json"), new["computed"])
    assert md.count("Kept from `old cmd` at commit abc.") == 1 and "## a " in md and "## other " in md


def test_update_keeps_a_boards_pooled_sets_to_score_again(pred, tmp_path):
    """--update of a task without searches or record files re-scores the sets its earlier board pooled (the
    measured gains and who measured them are kept; the scores come from the card at hand)."""
    import json

    pooled = {"k": 5, "seed": 0, "n_sets": 2, "sets": [[0, 1, 2, 3, 4], [1, 3, 5, 7, 9]],
              "gain_fraction": [0.8, 0.9], "predictors": {"coverage Q": {"rho": 1.0, "p_value": 0.5}}}
    meta = {"command": "old cmd", "commit": "abc", "machine": "m"}
    path = tmp_path / "predictors.json"
    assert pred.kept_pooled_sets(path, "a") is None
    path.write_text(json.dumps({"meta": meta, "leave_one_task_out": [], "tasks": [
        {"task": "a", "pooled": pooled}, {"task": "b", "pooled": None}]}))
    got = pred.kept_pooled_sets(path, "a")
    assert got == {**pooled, "computed": meta}
    assert pred.kept_pooled_sets(path, "b") is None and pred.kept_pooled_sets(path, "c") is None
    board = {"task": "a", "step_budget": 0.03, "sets_per_k": {}, "sets": {}, "per_layer": None,
             "pooled": {**pooled, "measured_from": meta}}
    md = pred.markdown([board], {"command": "new cmd", "commit": "def", "machine": "m"})
    assert "as pooled by `old cmd` at commit abc; the scores are this card's" in md
    assert "| coverage Q | **+1.00** | 0.500 |" in md
