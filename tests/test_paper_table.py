"""benchmarks/paper_table.py's bookkeeping on a synthetic finished search: label parsing, gain
fractions and ratios against the same seed's all-layer run, the table and the frontier plot."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.bench_scripts import load_benchmark



@pytest.fixture(scope="module")
def paper():
    """benchmarks/paper_table.py and its parts under benchmarks/paper/, as one namespace."""
    cli = load_benchmark("paper_table")          # puts the repository root on sys.path
    from benchmarks.paper import events, plots, records, rows, tables

    return SimpleNamespace(**{name: value for module in (rows, records, events, tables, plots, cli)
                              for name, value in vars(module).items() if not name.startswith("__")})


@pytest.mark.parametrize("label, want", [
    ("max-quality k=5", ("card", 5)), ("min-cost target=0.95", ("min-cost@0.95", 7)), ("top k=3", ("top", 3)),
    ("random k=8 seed=0", ("random", 8)), ("grad-norm k=5", ("grad-norm", 5)),
    ("block-influence k=3", ("block-influence", 3)), ("all", ("all", 7)), ("max-quality k=5 budget=0.5x", None),
])
def test_strategy_of(paper, label, want):
    assert paper.strategy_of(label, 7) == want


def _search_dir(tmp_path: Path) -> Path:
    cands = pd.DataFrame([
        {"candidate": "c00", "layers": [5, 6], "labels": ["max-quality k=2", "top k=2"], "predicted_gain_fraction": 0.8},
        {"candidate": "c01", "layers": [0, 1], "labels": ["bottom k=2"], "predicted_gain_fraction": 0.3},
        {"candidate": "c02", "layers": list(range(8)), "labels": ["all"], "predicted_gain_fraction": 1.0},
    ])
    trials = []
    # base quality 0.7 for every trial; all-layer quality 0.3 (seed 0) and 0.4 (seed 1)
    for seed, (q_card, q_bottom, q_all) in enumerate([(0.4, 0.6, 0.3), (0.5, 0.65, 0.4)]):
        for cand, q, step, mem in (("c00", q_card, 1.0, 2e8), ("c01", q_bottom, 3.0, 3e8), ("c02", q_all, 4.0, 4e8)):
            trials.append({"trial": f"{cand}-s{seed}", "candidate": cand, "seed": seed, "status": "trained",
                           "initial_quality": 0.7, "quality": q, "quality_name": "label_loss", "metric": 0.8,
                           "metric_name": "label_accuracy", "step_seconds": step, "peak_memory_bytes": mem})
    trials.append({**trials[0], "trial": "c01-s9", "candidate": "c01", "seed": 9, "status": "failed"})
    out = tmp_path / "search"
    out.mkdir()
    cands.to_parquet(out / "results.parquet", index=False)
    pd.DataFrame(trials).to_parquet(out / "trials.parquet", index=False)
    return out


def test_rows_are_measured_against_the_same_seeds_all_layer_run(paper, tmp_path):
    rows = paper.paper_rows("sentiment", _search_dir(tmp_path))
    by = {(r["strategy"], r["seed"]): r for r in rows}
    assert set(by) == {(s, seed) for s in ("card", "top", "bottom", "all") for seed in (0, 1)}   # failed trial dropped
    card0, card1 = by[("card", 0)], by[("card", 1)]
    assert card0["gain_fraction"] == pytest.approx((0.7 - 0.4) / (0.7 - 0.3))
    assert card1["gain_fraction"] == pytest.approx((0.7 - 0.5) / (0.7 - 0.4))
    assert card0["step_time_ratio"] == pytest.approx(0.25) and card0["peak_mem_ratio"] == pytest.approx(0.5)
    assert by[("top", 0)]["quality"] == card0["quality"] and by[("top", 0)]["k"] == 2   # one set, two labels
    assert by[("all", 1)]["gain_fraction"] == pytest.approx(1.0) and by[("all", 1)]["k"] == 8
    assert card0["accuracy"] == 0.8 and card0["layers"] == [5, 6] and card0["adapted_layers"] == 2
    keys = {"task", "strategy", "k", "seed", "layers", "quality", "gain_fraction", "accuracy", "step_time_ratio",
            "peak_mem_ratio", "adapted_layers"}
    assert all(keys <= set(r) for r in rows)
    json.dumps(rows)                                   # the JSON the benchmark writes
    # headline has no accuracy: its exact match of a whole title is ~0 for every set
    assert all(r["accuracy"] is None for r in paper.paper_rows("headline", tmp_path / "search"))

    g = {(r["strategy"]): r for r in paper.grouped(rows)}
    assert g["card"]["gain_fraction"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert g["card"]["gain_fraction_sd"] == pytest.approx(pd.Series([0.75, 2 / 3]).std())
    (tmp_path / "search" / "trial_events.jsonl").write_text(
        '{"time": 100.0, "event": "start", "key": "c00-s0"}\n{"time": 400.0, "event": "complete", "key": "c00-s0"}\n')
    minutes = paper.search_minutes(tmp_path / "search")
    assert minutes == pytest.approx(5.0)
    text = paper.markdown(rows, {"machine": "test", "runtime_min": 1.0, "search_minutes": {"sentiment": minutes}})
    assert "trials took 5 min" in text
    assert "| card (newton) | 2 | [5, 6] |" in text and "label loss" in text
    assert "| 0.800 |" in text                         # the card's predicted gain fraction beside the measured one
    # a predictor (the current card formula) replaces the fraction the search recorded
    rows = paper.paper_rows("sentiment", tmp_path / "search", predict=lambda layers: len(layers) / 8)
    assert {r["strategy"]: r["predicted_gain_fraction"] for r in rows}["bottom"] == 0.25


def test_card_predictor_is_the_selection_quality_fraction(paper, tmp_path):
    import numpy as np

    from layercard.select.selection import arrays_from_card, set_quality
    from tests.select.test_selection import make_card

    rng = np.random.default_rng(0)
    U = rng.normal(size=(5, 9))
    card = make_card(U @ rng.normal(size=9), U @ U.T, res2=rng.uniform(1, 2, 5), kappa=rng.uniform(10, 1e3, 5))
    card.save(tmp_path / "card")
    from layercard.card.layer_card import LayerCard

    loaded = LayerCard.load(tmp_path / "card", with_stats=False)
    predict = paper.card_predictor(loaded)
    A = arrays_from_card(card)
    for S in ([0], [1, 3], [0, 2, 4]):
        assert predict(S) == pytest.approx(set_quality(A, S) / set_quality(A, range(5)), rel=1e-12)
    assert predict(list(range(5))) == pytest.approx(1.0)
    rivals = paper.card_rivals(loaded)
    assert set(rivals) == {f"Σ {c}" for c in paper.RIVALS}
    for S in ([0], [1, 3], [0, 2, 4]):
        for c in paper.RIVALS:
            assert rivals[f"Σ {c}"](S) == pytest.approx(float(card.layers[c].to_numpy()[S].sum()), rel=1e-12)


def test_frontier_plot_decodes(paper, tmp_path):
    from PIL import Image

    rows = paper.paper_rows("sentiment", _search_dir(tmp_path))
    paper.plot_frontier(rows, "sentiment", tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as img:
        img.load()
        assert img.size[0] > 400


def _recipe(**over) -> dict:
    return {"config": {"train": {"steps": 60, "lr": 1e-3, "cpus_per_worker": 0.49, **over}, "ks": [2],
                       "targets": [], "strategies": ["top", "bottom", "all"], "seeds": [0, 1]}, "card_id": "card-a"}


def test_the_table_merges_every_finished_search_of_one_card_and_recipe(paper, tmp_path):
    work, archive = tmp_path / "work", tmp_path / "results" / "searches"
    task = work / "sentiment"
    task.mkdir(parents=True)
    first = _search_dir(task)
    (first / "search.json").write_text(json.dumps(_recipe()))
    # a second scope beside it: its own all-layer runs, the card set again (kept from the first), and mid
    second = task / "search-more"
    second.mkdir()
    pd.DataFrame([
        {"candidate": "c00", "layers": [5, 6], "labels": ["max-quality k=2"], "predicted_gain_fraction": 0.8},
        {"candidate": "c01", "layers": [3, 4], "labels": ["mid k=2"], "predicted_gain_fraction": 0.5},
        {"candidate": "c02", "layers": list(range(8)), "labels": ["all"], "predicted_gain_fraction": 1.0},
    ]).to_parquet(second / "results.parquet", index=False)
    pd.DataFrame([{"trial": f"{c}-s0", "candidate": c, "seed": 0, "status": "trained", "initial_quality": 0.7,
                   "quality": q, "quality_name": "label_loss", "metric": 0.8, "metric_name": "label_accuracy",
                   "step_seconds": st, "peak_memory_bytes": 1e8}
                  for c, q, st in (("c00", 0.45, 1.5), ("c01", 0.5, 2.0), ("c02", 0.3, 5.0))]
                 ).to_parquet(second / "trials.parquet", index=False)
    # a different scheduling (cpus) is the same recipe
    (second / "search.json").write_text(json.dumps(_recipe(cpus_per_worker=2.0)))
    unfinished = task / "search-stopped"
    unfinished.mkdir()
    (unfinished / "search.json").write_text(json.dumps(_recipe()))

    assert paper.finished_searches(task) == [first, second]     # "search" first; the unfinished one left out
    records = paper.search_records("sentiment", work, archive)
    assert [r["search"] for r in records] == ["search", "search-more"]
    rows = paper.merged_rows(records)
    by = {(r["strategy"], r["seed"]): r for r in rows}
    assert by[("card", 0)]["quality"] == 0.4 and by[("card", 0)]["search"] == "search"   # the first search's run
    mid = by[("mid", 0)]
    assert mid["search"] == "search-more"
    assert mid["gain_fraction"] == pytest.approx((0.7 - 0.5) / (0.7 - 0.3))
    assert mid["step_time_ratio"] == pytest.approx(2.0 / 5.0)      # against its own search's all-layer run
    assert len([r for r in rows if r["strategy"] == "all"]) == 2   # seeds 0 and 1, once each
    text = paper.markdown(rows, {"machine": "test", "runtime_min": 1.0, "search_minutes": {"sentiment": 12.0},
                                 "searches": {"sentiment": ["search", "search-more"]}})
    assert "trials took 12 min in 2 searches" in text and "| mid | 2 | [3, 4] |" in text

    # the same run again, but only the second search timed it like its reference: that row is kept
    def events(path, spans):
        path.write_text("".join(json.dumps({"time": t, "event": ev, "key": k}) + "\n"
                                for k, (a, b) in spans.items() for t, ev in ((a, "start"), (b, "complete"))))
    events(first / "trial_events.jsonl", {"c02-s0": (0, 10), "c01-s0": (0, 10), "c00-s0": (10, 20)})
    events(second / "trial_events.jsonl", {"c02-s0": (0, 10), "c00-s0": (0, 10), "c01-s0": (10, 20)})
    by = {(r["strategy"], r["seed"]): r for r in paper.merged_rows(paper.search_records("sentiment", work, archive))}
    assert by[("card", 0)]["search"] == "search-more" and by[("card", 0)]["quality"] == 0.45
    assert by[("bottom", 0)]["search"] == "search"

    (second / "search.json").write_text(json.dumps(_recipe(lr=5e-4)))
    with pytest.raises(SystemExit, match=r"search-more trained with train.lr=0.0005.*one recipe"):
        paper.search_records("sentiment", work, archive)
    (second / "search.json").write_text(json.dumps({**_recipe(), "card_id": "card-b"}))
    with pytest.raises(SystemExit, match=r"search-more searched a card with card_id='card-b'.*one card"):
        paper.search_records("sentiment", work, archive)
    with pytest.raises(SystemExit, match="no finished search of headline"):
        paper.search_records("headline", work, archive)


def test_a_finished_search_of_another_scope_is_not_silently_reused(paper, tmp_path):
    import argparse

    out = tmp_path / "sentiment" / "search"
    out.mkdir(parents=True)
    saved = paper.scope_of({**_recipe()["config"], "mode": "subsets", "random_seeds": [0]})
    (out / "search.json").write_text(json.dumps({"config": {**saved, "train": saved["train"]}}))
    args = argparse.Namespace(search_name="search", ks=[3, 5, 8], targets=[0.9], seeds=[0, 1, 2], steps=None,
                              overrides=[], records=None, results=str(tmp_path / "results"))
    with pytest.raises(SystemExit, match=r"another scope \(ks: \[2\], asked \[3, 5, 8\]\).*--search-name"):
        paper.run_search("sentiment", tmp_path / "card", tmp_path, args)


def test_missing_lists_what_no_finished_search_holds(paper, tmp_path):
    import argparse

    import numpy as np

    from tests.select.test_selection import make_card

    rng = np.random.default_rng(1)
    U = rng.normal(size=(6, 9))
    make_card(U @ rng.normal(size=9), U @ U.T, res2=rng.uniform(1, 2, 6), kappa=rng.uniform(10, 1e3, 6)).save(
        tmp_path / "card")
    args = argparse.Namespace(ks=[2, 3], targets=[], seeds=[0, 1], steps=None, overrides=["strategies=[top, all]"],
                              records=None, results=str(tmp_path / "results"))
    cfg = paper.search_config("sentiment", tmp_path / "card", args)
    # every run of the task's searches is kept in its run-record file, beside the results
    assert cfg.records == str(tmp_path / "results" / "records" / "paper_sentiment.jsonl")
    rows = [{"strategy": "top", "k": 2, "seed": 0}, {"strategy": "top", "k": 2, "seed": 1},
            {"strategy": "all", "k": 6, "seed": 1}, {"strategy": "bottom", "k": 2, "seed": 0}]   # last: not asked
    lacking, wanted = paper.missing_rows(tmp_path / "card", cfg, rows)
    assert wanted == (2 + 2 + 1) * 2                    # card k=2, 3; top k=2, 3; all — each over 2 seeds
    assert lacking == {("card", "newton", 2): [0, 1], ("card", "newton", 3): [0, 1], ("top", None, 3): [0, 1],
                       ("all", None, 6): [0]}


def _brute_shared(spans: dict[str, tuple[float, float]], key: str, dt: float = 1e-3) -> float:
    """The fraction of key's span during which another span is open, counted on a fine time grid."""
    a, b = spans[key]
    import numpy as np

    t = np.arange(a + dt / 2, b, dt)
    other = np.zeros_like(t, dtype=bool)
    for k, (c, d) in spans.items():
        if k != key:
            other |= (t > c) & (t < d)
    return float(other.mean())


def test_shared_fractions_match_a_brute_force_count(paper):
    import numpy as np

    rng = np.random.default_rng(3)
    for _ in range(5):
        spans = {}
        for i in range(5):
            a = float(rng.uniform(0, 8))
            spans[f"c{i:02d}-s0"] = (a, a + float(rng.uniform(0.5, 4)))
        events = [{"time": t, "event": ev, "key": k} for k, (a, b) in spans.items()
                  for t, ev in ((a, "start"), (b, "complete"))]
        # a restarted trial: an error, then its last start counts
        events += [{"time": -3.0, "event": "start", "key": "c00-s0"}, {"time": -2.0, "event": "error", "key": "c00-s0"}]
        got = paper.shared_fractions(events)
        assert set(got) == set(spans)
        for k in spans:
            assert got[k] == pytest.approx(_brute_shared(spans, k), abs=2e-3), k


def test_ratios_of_a_trial_and_a_reference_that_did_not_share_alike_are_marked(paper, tmp_path):
    search = _search_dir(tmp_path)
    # seed 0: all-layer (c02) first beside c00, then c01 runs alone at the end; seed 1: every trial paired
    spans = {"c02-s0": (0, 10), "c00-s0": (0, 10), "c01-s0": (10, 20),
             "c02-s1": (20, 30), "c00-s1": (20, 30), "c01-s1": (30, 40), "c99-s0": (30, 40)}
    (search / "trial_events.jsonl").write_text("".join(
        json.dumps({"time": t, "event": ev, "key": k}) + "\n"
        for k, (a, b) in spans.items() for t, ev in ((a, "start"), (b, "complete"))))
    rows = paper.paper_rows("sentiment", search)
    by = {(r["strategy"], r["seed"]): r for r in rows}
    assert by[("bottom", 0)]["shared_fraction"] == 0.0 and by[("bottom", 0)]["reference_shared_fraction"] == 1.0
    assert by[("card", 0)]["shared_fraction"] == 1.0 and not paper.uneven_sharing(by[("card", 0)])
    assert paper.uneven_sharing(by[("bottom", 0)]) and not paper.uneven_sharing(by[("bottom", 1)])
    g = {r["strategy"]: r for r in paper.grouped(rows)}
    assert g["bottom"]["step_time_ratio"] == by[("bottom", 1)]["step_time_ratio"]   # the seed that shared alike
    assert g["bottom"]["n_even_seeds"] == 1 and not g["bottom"]["uneven_sharing"]
    assert "†" not in paper.markdown(rows, {"machine": "test", "runtime_min": 1.0})
    seed0 = [r for r in rows if r["seed"] == 0]
    text = paper.markdown(seed0, {"machine": "test", "runtime_min": 1.0})
    bottom = next(line for line in text.splitlines() if line.startswith("| bottom |"))
    card = next(line for line in text.splitlines() if line.startswith("| card (newton) |"))
    assert "†" in bottom and "†" not in card and "did not share the machine alike" in text


def test_the_table_keeps_every_task_with_a_finished_search_not_only_the_one_just_run(paper, tmp_path):
    work, archive = tmp_path / "work", tmp_path / "searches"
    for task in ("sentiment", "headline"):
        (work / task / "search-x").mkdir(parents=True)
    (work / "sentiment" / "search-x" / "results.parquet").write_text("")
    assert list(paper.TASKS)[:2] == ["sentiment", "headline"]
    assert paper.table_tasks(work, archive, ["headline"]) == ["sentiment", "headline"]   # the one run, the one on disk
    assert paper.table_tasks(work, archive, []) == ["sentiment"]          # headline has no finished search
    (archive / "headline").mkdir(parents=True)
    (archive / "headline" / "search-y.json").write_text("{}")
    assert paper.table_tasks(work, archive, []) == ["sentiment", "headline"]   # ... but an archived one


def test_the_table_outlives_the_work_directory_through_its_archived_search_records(paper, tmp_path):
    """A finished search's record is archived beside the table, so a fresh clone (no --work) rebuilds the same
    table and a new search on another machine merges with the archived ones."""
    import shutil

    work, results = tmp_path / "work", tmp_path / "results"
    task = work / "sentiment"
    task.mkdir(parents=True)
    first = _search_dir(task)
    (first / "search.json").write_text(json.dumps(_recipe()))
    (first / "trial_events.jsonl").write_text(
        '{"time": 0.0, "event": "start", "key": "c00-s0"}\n{"time": 120.0, "event": "complete", "key": "c00-s0"}\n')
    argv = ["--rebuild", "--tasks", "sentiment", "--work", str(work), "--results", str(results)]
    assert paper.main(argv) == 0
    table = json.loads((results / "paper_table.json").read_text())
    record = json.loads((results / "searches" / "sentiment" / "search.json").read_text())
    assert record["card_id"] == "card-a" and record["recipe"] == {"steps": 60, "lr": 1e-3}
    assert record["minutes"] == pytest.approx(2.0) and record["scope"]["ks"] == [2]
    assert [{**r, "search": "search"} for r in record["rows"]] == table

    shutil.rmtree(work)                                  # another machine: nothing under --work
    (results / "paper_table.json").unlink()
    assert paper.main(argv) == 0
    assert json.loads((results / "paper_table.json").read_text()) == table
    assert "trials took 2 min" in (results / "paper_table.md").read_text()

    # a new search there merges with the archived one (the same card and recipe) ...
    second = work / "sentiment" / "search-more"
    second.mkdir(parents=True)
    pd.DataFrame([
        {"candidate": "c01", "layers": [3, 4], "labels": ["mid k=2"], "predicted_gain_fraction": 0.5},
        {"candidate": "c02", "layers": list(range(8)), "labels": ["all"], "predicted_gain_fraction": 1.0},
    ]).to_parquet(second / "results.parquet", index=False)
    pd.DataFrame([{"trial": f"{c}-s2", "candidate": c, "seed": 2, "status": "trained", "initial_quality": 0.7,
                   "quality": q, "quality_name": "label_loss", "metric": 0.8, "metric_name": "label_accuracy",
                   "step_seconds": st, "peak_memory_bytes": 1e8} for c, q, st in (("c01", 0.5, 2.0), ("c02", 0.3, 5.0))]
                 ).to_parquet(second / "trials.parquet", index=False)
    (second / "search.json").write_text(json.dumps(_recipe()))
    assert paper.main(argv) == 0
    rows = json.loads((results / "paper_table.json").read_text())
    assert [r for r in rows if r["search"] == "search"] == table
    assert {(r["strategy"], r["seed"]) for r in rows if r["search"] == "search-more"} == {("mid", 2), ("all", 2)}
    assert (results / "searches" / "sentiment" / "search-more.json").is_file()
    meta = json.loads((results / "paper_table_meta.json").read_text())
    assert meta["searches"] == {"sentiment": ["search", "search-more"]}
    assert meta["untimed_searches"] == {"sentiment": ["search-more"]}    # it has no trial events
    assert meta["command"] == "python benchmarks/paper_table.py " + " ".join(argv) and meta["commit"]
    assert f"This run: `{meta['command']}` at commit {meta['commit']}" in (results / "paper_table.md").read_text()
    assert "(1 of them untimed)" in (results / "paper_table.md").read_text()

    # ... and one of another card is refused, leaving the archive as it was
    (second / "search.json").write_text(json.dumps({**_recipe(), "card_id": "card-b"}))
    before = (results / "searches" / "sentiment" / "search-more.json").read_text()
    with pytest.raises(SystemExit, match="search-more searched a card with card_id='card-b'"):
        paper.main(argv)
    assert (results / "searches" / "sentiment" / "search-more.json").read_text() == before


def test_cards_of_one_source_merge_and_another_source_or_another_set_is_refused(paper, tmp_path):
    """Re-profiling on another CPU gives a card equal up to rounding (another card_id): its searches join the
    table; a card of other calibration data does not, nor a search whose strategy picked other layers."""
    import numpy as np

    from tests.select.test_selection import make_card

    rng = np.random.default_rng(2)
    U = rng.normal(size=(8, 9))
    b, K = U @ rng.normal(size=9), U @ U.T

    def card(name, data_hash, eps=0.0, path="/root/.cache/calibration.jsonl", actors=2):
        c = make_card(b * (1 + eps), K)
        c.meta.update(data_hash=data_hash, config={"loss": "label", "data": {"path": path, "max_seq_len": 64},
                                                   "ray": {"num_actors": actors}})
        c.save(tmp_path / name)
        return tmp_path / name

    work, archive = tmp_path / "work", tmp_path / "searches"
    task = work / "sentiment"
    task.mkdir(parents=True)
    first = _search_dir(task)
    (task / "more").mkdir()
    second = _search_dir(task / "more").rename(task / "search-more")

    def search_json(d, card_dir):
        ident = json.loads((card_dir / "card.json").read_text())
        d.joinpath("search.json").write_text(json.dumps({**_recipe(), "card": str(card_dir),
                                                         "card_id": ident["card_id"]}))

    search_json(first, card("card", "d1"))
    # the same source profiled elsewhere: rounding apart, its data in another home, on another Ray layout
    search_json(second, card("card-again", "d1", eps=1e-7, path="/home/me/.cache/calibration.jsonl", actors=4))
    records = paper.search_records("sentiment", work, archive)
    assert records[0]["card_id"] != records[1]["card_id"] and records[0]["card"] == records[1]["card"]
    assert records[0]["card"]["data_hash"] == "d1" and records[0]["card"]["n_layers"] == 8

    search_json(second, card("card-other", "d2"))
    with pytest.raises(SystemExit, match=r"search-more searched a card with data_hash='d2', search one with 'd1'"):
        paper.search_records("sentiment", work, archive)

    search_json(second, tmp_path / "card-again")
    cands = pd.read_parquet(second / "results.parquet")
    cands.at[0, "layers"] = [4, 6]                                   # the card's k = 2 set, picked differently
    cands.to_parquet(second / "results.parquet", index=False)
    with pytest.raises(SystemExit, match=r"card k=2 is layers \[4, 6\] in search-more but \[5, 6\] in search:"):
        paper.search_records("sentiment", work, archive)


def test_prediction_agreement_matches_a_brute_force_rank_correlation(paper):
    import numpy as np

    rng = np.random.default_rng(11)
    groups = []
    for k in (3, 5, 8):
        for i in range(6):
            layers = sorted(int(x) for x in rng.choice(30, size=k, replace=False))   # distinct sets: no ties
            groups.append({"strategy": f"s{i}", "k": k, "layers": layers,
                           "predicted_gain_fraction": float(rng.uniform()), "gain_fraction": float(rng.uniform(0, 1.3))})
    groups.append({"strategy": "min-cost@0.9", "k": 12, "layers": list(range(12, 24)),
                   "predicted_gain_fraction": 0.9, "gain_fraction": 1.1})
    groups.append({"strategy": "all", "k": 30, "layers": list(range(30)), "predicted_gain_fraction": 1.0,
                   "gain_fraction": 1.0})
    groups.append({"strategy": "s9", "k": 3, "layers": [0, 1, 2], "predicted_gain_fraction": None,
                   "gain_fraction": 0.5})   # no prediction: left out

    def brute(gs):   # no ties among continuous draws: ρ = 1 − 6 Σ d² / (n (n² − 1))
        p = np.argsort(np.argsort([g["predicted_gain_fraction"] for g in gs])).astype(np.float64)
        m = np.argsort(np.argsort([g["gain_fraction"] for g in gs])).astype(np.float64)
        n = len(gs)
        return 1.0 - 6.0 * ((p - m) ** 2).sum() / (n * (n * n - 1))

    sets = [g for g in groups if g["strategy"] not in ("all", "s9")]
    got = paper.prediction_agreement(groups)
    assert got["all"]["n_sets"] == 19 and got["all"]["spearman"] == pytest.approx(brute(sets), abs=1e-12)
    assert set(got["by_k"]) == {3, 5, 8}   # the lone k = 12 set has no within-k correlation
    for k in (3, 5, 8):
        assert got["by_k"][k]["spearman"] == pytest.approx(brute([g for g in sets if g["k"] == k]), abs=1e-12)
    low = [g for g in sets if min(g["layers"]) <= 2]
    assert got["above_prediction"] == {"n_above": sum(g["gain_fraction"] > g["predicted_gain_fraction"] for g in sets),
                                       "n_sets": 19}
    assert got["above_prediction_low"]["n_sets"] == len(low) > 0
    assert got["above_prediction_low"]["n_above"] == sum(g["gain_fraction"] > g["predicted_gain_fraction"] for g in low)
    line = paper.agreement_line(got)
    assert f"{got['all']['spearman']:+.2f} over 19 sets" in line and "k = 5:" in line and "k = 12" not in line
    assert got["rivals"] == {} and "Free predictors" not in line
    w = rng.uniform(size=30)   # a column summed over the set: continuous, so no ties
    with_rival = paper.prediction_agreement(groups, {"Σ w": lambda layers: float(w[list(layers)].sum())})
    want = brute([{**g, "predicted_gain_fraction": float(w[g["layers"]].sum())} for g in sets])
    assert with_rival["rivals"]["Σ w"]["n_sets"] == 19
    assert with_rival["rivals"]["Σ w"]["spearman"] == pytest.approx(want, abs=1e-12)
    assert with_rival["all"] == got["all"] and "Free predictors" in paper.agreement_line(with_rival)


def test_sampled_and_whole_file_weights_hashes_are_compared_on_one_kind(paper):
    """An archived record (weights hash of sizes + first/last MiB, no kind) merges with a newer card of
    the same weights through the sampled fingerprint the newer card keeps — and not with other weights."""
    old = {"weights_hash": "2e13074395d67211", "data_hash": "d", "config_hash": "c", "n_layers": 30}
    new = {"weights_hash": "0123456789abcdef", "weights_hash_kind": "sha256", "weights_hash_sampled": "2e13074395d67211",
           "data_hash": "d", "config_hash": "c", "n_layers": 30}
    assert paper.first_difference(*paper.comparable_sources(old, new)) is None
    assert paper.first_difference(*paper.comparable_sources(new, new)) is None
    other = {**new, "weights_hash_sampled": "ffffffffffffffff"}
    assert paper.first_difference(*paper.comparable_sources(old, other)) == "weights_hash"
    assert paper.first_difference(*paper.comparable_sources(new, {**new, "weights_hash": "1" * 16})) == "weights_hash"
