"""benchmarks/rung_fidelity.py's bookkeeping on a synthetic finished explore search: which sets have a known
full-recipe quality (the search's and the paper table's), their truncated rung qualities, and Spearman ρ of
each fidelity against a float64 brute force."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def fid():
    return load_benchmark("rung_fidelity")


def _spearman_brute(x, y) -> float:
    """Pearson correlation of the ranks (no ties here), in float64."""
    rx = np.argsort(np.argsort(np.asarray(x, dtype=np.float64))).astype(np.float64)
    ry = np.argsort(np.argsort(np.asarray(y, dtype=np.float64))).astype(np.float64)
    return float(np.corrcoef(rx, ry)[0, 1])


def _search(tmp_path, rng):
    out = tmp_path / "explore-k3"
    (out / "explore").mkdir(parents=True)
    sets = [list(c) for c in itertools.combinations(range(6), 3)][:8]
    cands = [{"id": f"k3c{i:02d}", "layers": layers} for i, layers in enumerate(sets)]
    cands.append({"id": "all", "layers": list(range(6))})
    final = rng.uniform(0.3, 0.5, size=len(sets))
    rows, rungs = [], []
    for i, layers in enumerate(sets):
        trained = i < 5                          # the first five survive; the rest stop at step 10
        rows.append({"trial": f"k3c{i:02d}-s0", "candidate": f"k3c{i:02d}", "seed": 0,
                     "status": "trained" if trained else "stopped_early",
                     "quality": float(final[i]) if trained else None})
        for step in ((10, 30, 60) if trained else (10,)):
            rungs.append({"key": f"k3c{i:02d}-s0", "step": step, "rung_quality": float(rng.uniform(0.3, 0.6))})
    rows.append({"trial": "all-s0", "candidate": "all", "seed": 0, "status": "trained", "quality": 0.25})
    pd.DataFrame(rows).to_parquet(out / "trials.parquet")
    (out / "explore" / "rungs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rungs))
    saved = {"candidates": cands}
    table = tmp_path / "paper_table.json"
    # a set the search trained (same run: the same quality), two it stopped, one it never had, another k and seed
    table.write_text(json.dumps([
        {"task": "t", "k": 3, "seed": 0, "layers": sets[0], "quality": float(final[0])},
        {"task": "t", "k": 3, "seed": 0, "layers": sets[6][::-1], "quality": 0.41},
        {"task": "t", "k": 3, "seed": 0, "layers": sets[7], "quality": 0.33},
        {"task": "t", "k": 3, "seed": 0, "layers": [3, 4, 5], "quality": 0.39},
        {"task": "t", "k": 5, "seed": 0, "layers": [0, 1, 2, 3, 4], "quality": 0.2},
        {"task": "t", "k": 3, "seed": 1, "layers": sets[1], "quality": 0.2},
    ]))
    return out, saved, table, sets, final, rungs


def test_known_sets_and_fidelity_rows(fid, tmp_path):
    rng = np.random.default_rng(0)
    out, saved, table, sets, final, rungs = _search(tmp_path, rng)
    known = fid.known_sets(out, saved, 3, 0, table, "t")
    assert set(known) == {tuple(s) for s in sets[:5]} | {tuple(sets[6]), tuple(sets[7]), (3, 4, 5)}
    assert known[tuple(sets[0])]["paper_table_final"] == pytest.approx(final[0])
    assert known[tuple(sets[6])]["source"] == "paper_table" and known[tuple(sets[6])]["final"] == 0.41
    # a set the search stopped keeps the rung it reached; one it never had has none
    assert list(known[tuple(sets[6])]["truncated"]) == [10] and known[(3, 4, 5)]["truncated"] == {}
    assert "all" not in {v["candidate"] for v in known.values()}

    compressed = {10: {tuple(s): float(rng.uniform(0.3, 0.5)) for s in sets[:6]}}
    rows = {(r["kind"], r["steps"]): r for r in fid.fidelity_rows(known, compressed, 60)}
    assert set(rows) == {("truncated", 10), ("truncated", 30), ("truncated", 60), ("compressed", 10)}
    q = {(r["key"], r["step"]): r["rung_quality"] for r in rungs}
    with_10 = [tuple(s) for s in sets[:5]] + [tuple(sets[6]), tuple(sets[7])]
    idx = {tuple(s): i for i, s in enumerate(sets)}
    want = _spearman_brute([q[(f"k3c{idx[s]:02d}-s0", 10)] for s in with_10], [known[s]["final"] for s in with_10])
    assert rows[("truncated", 10)]["n_sets"] == 7 and rows[("truncated", 10)]["spearman"] == pytest.approx(want)
    at_60 = [tuple(s) for s in sets[:5]]
    want = _spearman_brute([q[(f"k3c{idx[s]:02d}-s0", 60)] for s in at_60], [known[s]["final"] for s in at_60])
    assert rows[("truncated", 60)]["n_sets"] == 5 and rows[("truncated", 60)]["spearman"] == pytest.approx(want)
    both = [s for s in compressed[10] if s in known]
    want = _spearman_brute([compressed[10][s] for s in both], [known[s]["final"] for s in both])
    assert rows[("compressed", 10)]["n_sets"] == len(both) == 5
    assert rows[("compressed", 10)]["spearman"] == pytest.approx(want)


def test_seed_ceiling_is_the_rank_correlation_between_seeds(fid, tmp_path):
    rng = np.random.default_rng(1)
    sets = [list(c) for c in itertools.combinations(range(7), 3)][:9]
    q = {seed: rng.uniform(0.3, 0.5, size=len(sets)) for seed in (0, 1, 2)}
    rows = [{"task": "t", "k": 3, "seed": seed, "layers": s[::-1], "quality": float(q[seed][i])}
            for seed in (0, 1, 2) for i, s in enumerate(sets) if not (seed == 2 and i == 0)]
    rows.append({"task": "u", "k": 3, "seed": 1, "layers": sets[0], "quality": 9.0})     # another task
    table = tmp_path / "paper_table.json"
    table.write_text(json.dumps(rows))
    got = fid.seed_ceiling(table, "t", 3, 0)
    assert [(r["other_seed"], r["n_sets"]) for r in got] == [(1, 9), (2, 8)]
    assert got[0]["spearman"] == pytest.approx(_spearman_brute(q[1], q[0]))
    assert got[1]["spearman"] == pytest.approx(_spearman_brute(q[2][1:], q[0][1:]))
    assert fid.seed_ceiling(tmp_path / "missing.json", "t", 3, 0) == []
