"""Layer-subset search: Spearman and candidates (pure), bad input (refused before Ray), per-layer
outputs from given measurements, then two real Ray Tune searches of a tiny random Qwen3 on the
``ray_local`` fixture (2 CPUs): one straight through, one interrupted after its first trial and resumed.
The card is profiled once per module."""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layercard.select.candidates import build_candidates, pareto_mask, rankdata, spearman
from layercard.card.layer_card import LayerCard
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.search.config import SearchConfig

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "configs").is_dir())   # tests/ or tests/wip/
SEARCH_YAML = ROOT / "configs" / "search-tiny.yaml"
PROFILE = ["data.num_samples=32", "coupling.probe_samples=8", "cost.steps=1"]


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    from layercard.profile.config import ProfileConfig
    from layercard.profile.run import run_profile

    card = run_profile(load_config(ProfileConfig, ROOT / "configs" / "tiny.yaml", PROFILE), progress=False)
    return card.save(tmp_path_factory.mktemp("card") / "card")


def search_cfg(card_dir, *overrides: str) -> SearchConfig:
    return load_config(SearchConfig, SEARCH_YAML, [f"card={card_dir}", *overrides])


def candidates_of(cfg: SearchConfig, card):
    return build_candidates(card, mode=cfg.mode, ks=cfg.ks, budget=cfg.budget, budget_unit=cfg.budget_unit,
                            budget_fractions=cfg.budget_fractions, targets=cfg.targets, strategies=cfg.strategies,
                            random_seeds=cfg.random_seeds)


# --------------------------------------------------------------------------- (d) Spearman, brute force
def brute_spearman(x, y):
    """Pearson correlation of ranks counted one by one (ties: the average of the ranks they span)."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]

    def ranks(v):
        return [1 + sum(w < u for w in v) + (sum(w == u for w in v) - 1) / 2 for u in v]

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy)


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9, 30):
        for _ in range(20):
            x = rng.integers(0, 4, n).astype(float)          # small range: many ties
            y = x * rng.choice([-1.0, 1.0]) + rng.integers(0, 3, n)
            if len(set(x)) == 1 or len(set(y)) == 1:
                assert spearman(x, y) is None
                continue
            assert spearman(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-12)
    x, y = rng.normal(size=12), rng.normal(size=12)        # no ties: the textbook formula
    d = rankdata(x) - rankdata(y)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (12 * (12**2 - 1)))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, float("nan"), 4], [1, 2, 99, 3]) == pytest.approx(brute_spearman([1, 2, 4], [1, 2, 3]))
    assert spearman([1], [2]) is None


def test_pareto_mask_is_the_brute_force_front():
    rng = np.random.default_rng(1)
    cost, quality = rng.integers(0, 5, 25).astype(float), rng.integers(0, 5, 25).astype(float)
    want = [not any(cost[j] <= cost[i] and quality[j] >= quality[i] and (cost[j] < cost[i] or quality[j] > quality[i])
                    for j in range(25)) for i in range(25)]
    assert pareto_mask(cost, quality).tolist() == want
    assert pareto_mask([1.0, float("nan")], [1.0, 5.0]).tolist() == [True, False]


# --------------------------------------------------------------------------- config and candidates
@pytest.mark.parametrize("override, key", [
    ("ks=[0]", "ks[0]"),
    ("strategies=[top, best]", "strategies[1]"),
    ("budget=-1", "budget"),
    ("budget=abc", "budget"),
    ("train.selection=somewhere", "train.selection"),
    ("train.steps=0", "train.steps"),
    ("train.eval_every=null", "train.eval_every"),
    ("train.report_every=3", "train.report_every"),
    ("asha.grace_period=9", "asha.grace_period"),
    ("trial_cpus=0", "trial_cpus"),
])
def test_bad_search_config_names_the_key(override, key):
    with pytest.raises(LayercardError, match=re.escape(f"'{key}'")) as exc:
        load_config(SearchConfig, SEARCH_YAML, [override])
    assert "\n" not in str(exc.value)


def test_saved_search_config_names_local_paths_absolute(tmp_path):
    """A search saves its local paths absolute, so it resumes and is reused from any directory; cache:,
    $VAR and URI paths stay as written, and every other key is unchanged."""
    from layercard.search.run import anchored

    cfg = {"card": "card", "train": {"model": {"path": "m", "config": None}, "data": {"path": "d/t.jsonl"},
                                     "eval_data": None, "base_eval_cache": "cache:e.json", "steps": 6},
           "explore": {"paper_table": "/abs/p.json", "task": "x"}, "storage_path": "s3://bucket/t",
           "records": "~/r.jsonl", "reuse": ["a", "../b", "$RUNS/c"], "ks": [2]}
    got = anchored(cfg, tmp_path)
    assert got["card"] == str(tmp_path / "card") and got["train"]["model"]["path"] == str(tmp_path / "m")
    assert got["train"]["data"]["path"] == str(tmp_path / "d" / "t.jsonl")
    assert got["train"]["base_eval_cache"] == "cache:e.json" and got["explore"]["paper_table"] == "/abs/p.json"
    assert got["storage_path"] == "s3://bucket/t" and got["records"] == str(Path("~/r.jsonl").expanduser())
    assert got["reuse"] == [str(tmp_path / "a"), str(tmp_path.parent / "b"), "$RUNS/c"]
    assert got["train"]["eval_data"] is None and got["ks"] == [2] and got["train"]["steps"] == 6
    assert cfg["card"] == "card"                                      # the argument is left as it was
    assert anchored(got, tmp_path / "elsewhere") == got               # absolute paths stay


def test_per_layer_mode_turns_asha_off():
    assert search_cfg("x").use_asha
    assert not search_cfg("x", "mode=per-layer").use_asha
    with pytest.raises(LayercardError, match="'asha.enabled'"):
        search_cfg("x", "mode=per-layer", "asha.enabled=true")


def test_candidates_are_distinct_labelled_and_costed(card_dir):
    from layercard.profile.cost import predicted_cost
    from layercard.select.selection import arrays_from_card, set_quality

    cfg = search_cfg(card_dir)
    card = LayerCard.load(card_dir, with_stats=False)
    cands = candidates_of(cfg, card)
    sets = [tuple(c.layers) for c in cands]
    assert len(set(sets)) == len(sets) and len({c.id for c in cands}) == len(cands)
    labels = [lab for c in cands for lab in c.labels]
    for name in cfg.strategies:           # every baseline at every k (all: once)
        for k in ([None] if name == "all" else cfg.ks):
            assert any(lab.startswith(name if k is None else f"{name} k={k}") for lab in labels), (name, k)
    assert any("max-quality k=2" in c.labels and len(c.labels) > 1 for c in cands)   # deduped, labels kept
    A = arrays_from_card(card)
    for c in cands:
        assert c.cost == pytest.approx(predicted_cost(card, c.layers)["flops_per_token"])
        assert c.predicted_gain == pytest.approx(set_quality(A, c.layers))
        assert c.over_budget == (c.cost > cfg.budget)
    assert any(c.over_budget for c in cands) and sum(not c.over_budget for c in cands) >= 4
    per_layer = candidates_of(search_cfg(card_dir, "mode=per-layer"), card)
    assert [c.layers for c in per_layer] == [[l] for l in card.layer_ids]


def test_training_order_is_most_expensive_first(card_dir):
    from layercard.select.candidates import training_order

    card = LayerCard.load(card_dir, with_stats=False)
    cands = candidates_of(search_cfg(card_dir, "budget=null"), card)
    order = training_order(cands)
    assert sorted(c.id for c in order) == sorted(c.id for c in cands)
    costs = [c.cost for c in order]
    assert costs == sorted(costs, reverse=True)
    assert order[0].layers == list(card.layer_ids)              # the all-layer reference trains first
    for a, b in zip(order, order[1:]):                                   # ties keep proposal order
        if a.cost == b.cost:
            assert int(a.id[1:]) < int(b.id[1:])


# --------------------------------------------------------------------------- (c) bad input, before Ray
def test_budget_no_candidate_fits(card_dir, tmp_path, capsys):
    from pipelines.search import main

    out = tmp_path / "s"
    rc = main(["--config", str(SEARCH_YAML), "--out", str(out), f"card={card_dir}", "budget=1e5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    # the cheapest candidate is the top layer alone (backprop through one block)
    assert "budget 1e+05 FLOPs/token fits no candidate: the cheapest is" in err
    assert "(layers [3], top k=1" in err and "at 5.571e+05 FLOPs/token" in err
    assert not (out / "tune").exists()


def test_card_from_another_model_is_refused(card_dir, tmp_path):
    from layercard.search.run import run_search

    card_hash = LayerCard.load(card_dir, with_stats=False).meta["weights_hash"]
    with pytest.raises(LayercardError, match="profiled on another model") as exc:
        run_search(search_cfg(card_dir, "train.model.seed=1"), tmp_path / "s")
    msg = str(exc.value)
    assert card_hash in msg and "search's train.model has weights hash" in msg
    other = msg.rsplit("weights hash ", 1)[1].split()[0]
    assert other != card_hash and len(other) == len(card_hash)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- per-layer outputs (no Ray)
def test_per_layer_outputs_from_measurements(card_dir, tmp_path):
    """Given measured gains, the card version and summary carry them and the three Spearman ρ."""
    from layercard.search.publish import per_layer_measurements, summary_markdown, write_card_version
    from layercard.search.results import candidate_rows
    from layercard.search.setup import setup

    s = setup(search_cfg(card_dir, "mode=per-layer", "budget=null"), tmp_path)
    measured = {0: 0.05, 1: 0.12, 2: 0.30, 3: 0.20}
    trials = []
    by_id = {c.id: c for c in s.candidates}
    for key, t in s.trials.items():
        layer = by_id[t["candidate"]].layers[0]
        trials.append({"trial": key, "candidate": t["candidate"], "seed": 0, "trial_id": key, "attempts": 1,
                       "status": "trained", "steps_done": 6, "initial_eval_loss": 5.5,
                       "eval_loss": 5.5 - measured[layer], "initial_quality": 0.7, "quality": 0.7 - measured[layer],
                       "quality_name": "label_loss", "label_loss": 0.7 - measured[layer], "measured_gain": measured[layer], "metric": 0.0, "metric_name": "accuracy",
                       "step_seconds": 0.1 + layer, "peak_memory_bytes": 1e8, "train_tokens_per_s": 1e3, "error": None})
    rows = candidate_rows(s, trials)
    single, corr = per_layer_measurements(s, rows)
    card = LayerCard.load(card_dir, with_stats=False)
    ids = card.layer_ids
    pred = [next(r["predicted_gain"] for r in rows if r["layers"] == [l]) for l in ids]
    gains = [measured[l] for l in ids]
    assert corr["spearman"]["predicted_gain"] == pytest.approx(brute_spearman(pred, gains))
    assert corr["spearman"]["res2"] == pytest.approx(brute_spearman(card.layers["res2"].tolist(), gains))
    assert corr["spearman"]["depth"] == pytest.approx(brute_spearman(ids, gains))
    new_dir = write_card_version(s, rows, single, corr)
    new = LayerCard.load(new_dir)
    assert new.layers["measured_gain"].tolist() == pytest.approx(gains)
    assert new.layers["measured_eval_loss"].tolist() == pytest.approx([5.5 - g for g in gains])
    assert new.layers["measured_quality"].tolist() == pytest.approx([0.7 - g for g in gains])
    assert new.meta["search"]["quality"] == "label_loss"
    assert new.meta["search"]["per_layer"]["spearman"] == corr["spearman"]
    text = summary_markdown(s, rows, corr, new_dir)
    assert "Spearman" in text and f"{corr['spearman']['res2']:.3f}" in text

    # the card version selects with the measured gains (--model measured): the best pair by brute force
    import itertools

    from layercard.select.gain_models import adam_terms
    from pipelines.select import main as select_main

    _, H = adam_terms(new)
    sim = np.abs(H) / np.sqrt(np.outer(np.diag(H), np.diag(H)))
    q = {S: sum(gains[j] * max(sim[j, l] for l in S) for j in range(len(ids)))
         for S in itertools.combinations(range(len(ids)), 2)}
    assert select_main([str(new_dir), "--out", str(tmp_path / "sel"), "--k", "2", "--model", "measured"]) == 0
    sel = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert sel["layers"] == [ids[i] for i in max(q, key=q.get)] and sel["quality_model"] == "measured"
    assert sel["predicted_gain"] == pytest.approx(max(q.values()))
    with pytest.raises(LayercardError, match="no measured single-layer gains"):    # the profiled card has none
        select_main([str(card_dir), "--out", str(tmp_path / "no"), "--k", "2", "--model", "measured"])
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------- (a) a real search
def _max_concurrent(events: list[dict]) -> int:
    live, most = set(), 0
    for e in sorted(events, key=lambda e: e["time"]):
        (live.add if e["event"] == "start" else live.discard)(e["key"])
        most = max(most, len(live))
    return most


@pytest.fixture(scope="module")
def full_search(ray_local, card_dir, tmp_path_factory):
    """One real search, stopped after its first finished trial and resumed: (a) checks what the whole
    search wrote, (b) how the resume went. Returns (out, resume's summary, the events before resuming,
    whether results existed before resuming)."""
    from layercard.search.events import read_events
    from layercard.search.results import SearchInterrupted
    from layercard.search.run import resume_search, run_search

    out = tmp_path_factory.mktemp("search") / "s"
    # relative to the driver's directory, as a user types it (trials run in directories of their own)
    cache = os.path.relpath(out.parent / "shared" / "base_eval.json")
    with pytest.raises(SearchInterrupted, match="--resume"):
        run_search(search_cfg(card_dir, "stop_after_trials=1", f"train.base_eval_cache={cache}"), out)
    before, had_results = read_events(out), (out / "results.parquet").exists()
    return out, resume_search(out), before, had_results


@pytest.mark.slow
def test_search_trains_within_budget_and_writes_a_card_version(full_search, card_dir):
    from PIL import Image

    from layercard.search.events import read_events
    from layercard.search.results import STATUSES

    out, summary, _, _ = full_search
    cfg = search_cfg(card_dir)
    saved = json.loads((out / "search.json").read_text())
    assert saved["out"] == str(out.resolve())        # a resume elsewhere is refused (it would lose the logs)
    res = pd.read_parquet(out / "results.parquet")
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(res["candidate"]) == sorted(c["id"] for c in saved["candidates"])     # one row per candidate
    assert set(res["status"]) <= set(STATUSES) and res["status"].notna().all()
    assert len(trials) >= 4 and set(trials["candidate"]) == set(res.loc[~res["over_budget"], "candidate"])
    ran = res[res["status"] != "over_budget"]
    assert (ran["predicted_cost"] <= cfg.budget).all() and not ran["over_budget"].any()
    over = res[res["over_budget"]]
    assert len(over) >= 1 and (over["status"] == "over_budget").all() and (over["n_trials"] == 0).all()
    events = read_events(out)
    assert not set(over["candidate"]) & {e["key"].split("-")[0] for e in events}            # never started
    assert _max_concurrent(events) == 2
    ran_cost = ran.set_index("candidate")["predicted_cost"]
    first_two = [e["key"].split("-")[0] for e in sorted(events, key=lambda e: e["time"]) if e["event"] == "start"][:2]
    assert sorted(ran_cost[first_two]) == sorted(ran_cost.nlargest(2))   # Tune starts the most expensive first
    trained = res[res["status"] == "trained"]
    assert len(trained) >= 1
    for col in ("eval_loss", "measured_gain", "metric", "step_seconds", "peak_memory_bytes", "predicted_gain"):
        assert trained[col].notna().all(), col
    assert (res.loc[res["status"] == "stopped_early", "steps_done"] < cfg.train_config.steps).all()
    assert summary["trained"] == len(trained) and summary["over_budget"] == len(over)

    import ray

    deadline = time.monotonic() + 30           # stopped trials' Train workers give their CPUs back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(ray.cluster_resources()["CPU"])

    with Image.open(out / "frontier.png") as img:
        img.load()
        assert img.size[0] > 300 and img.size[1] > 200
    assert "Layer-subset search" in (out / "summary.md").read_text()

    old = LayerCard.load(card_dir)
    new = LayerCard.load(out / "card")
    assert new.card_id != old.card_id and new.meta["parent_card_id"] == old.card_id
    assert {"measured_eval_loss", "measured_quality", "measured_gain", "measured_step_seconds"} <= set(new.layers.columns)
    assert new.meta["search"]["quality"] == "eval_loss"                 # the tiny data has no label_answers
    assert (trained["quality"] == trained["eval_loss"]).all()
    assert "measured_gain" not in old.layers.columns                                        # the old version as it was
    front = pd.read_parquet(out / "card" / "frontier.parquet")
    assert sorted(front["candidate"]) == sorted(trained["candidate"]) and front["on_measured_front"].any()
    for _, r in trained[trained["k"] == 1].iterrows():
        row = new.layers[new.layers["layer"] == r["layers"][0]].iloc[0]
        assert row["measured_eval_loss"] == pytest.approx(r["eval_loss"])


# --------------------------------------------------------------------------- (b) interrupt, resume
@pytest.mark.slow
def test_relative_base_eval_cache_is_shared_by_every_trial(full_search):
    """A relative ``train.base_eval_cache`` names one file beside the driver (trials run in their own
    working directories): the first finished trial writes it, and it holds what every trial measured."""
    out = full_search[0]
    cache = json.loads((out.parent / "shared" / "base_eval.json").read_text())
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["initial_eval_loss"].notna().all()
    assert np.allclose(trials["initial_eval_loss"], cache["initial"]["initial_eval_loss"], rtol=1e-9)
    assert not list((out / "tune").rglob("base_eval.json"))   # no private copies in trial directories


@pytest.mark.slow
def test_a_finished_search_is_a_source_of_replays(full_search, card_dir, tmp_path):
    """config key reuse over a mode=subsets search: each of its trials is found by the same config, complete
    when it trained to the end, its last report the trial's result; none with another seed."""
    import dataclasses

    from layercard.search.reuse import load_sources, replays_for
    from layercard.search.setup import setup
    from layercard.search.trials import base_worker_config

    out = full_search[0]
    index = load_sources([str(out)])
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial")

    def found(*overrides):
        s = setup(search_cfg(card_dir, *overrides), tmp_path)
        data = {"train": s.plan.train, "eval": s.plan.eval, "rung_eval": None}
        return replays_for(s, base_worker_config(s).to_dict(), data, index)

    replays = found()
    assert sorted(replays) == sorted(trials.index)
    for key, r in replays.items():
        assert r.complete == (trials.loc[key, "status"] == "trained"), key
        assert r.reports[-1]["step"] == trials.loc[key, "steps_done"]
        assert r.reports[-1].get("quality", r.reports[-1].get("eval_loss")) == trials.loc[key, "quality"]
    assert not found("seeds=[1]")


def test_interrupted_search_resumes_without_rerunning_finished_trials(full_search):
    from layercard.search.events import read_events

    out, summary, before, had_results = full_search
    done = [e for e in before if e["event"] == "complete"]
    assert len(done) == 1 and not had_results                  # stopped after one trial, nothing written
    first = done[0]
    cut_short = {e["key"] for e in before if e["event"] == "start"} - {first["key"]}

    after = read_events(out)
    starts = [e for e in after if e["event"] == "start" and e["key"] == first["key"]]
    assert len(starts) == 1                                      # the finished trial was not run again
    assert [e["trial_id"] for e in after if e["key"] == first["key"]] == [first["trial_id"]] * 2
    trials = pd.read_parquet(out / "trials.parquet")
    wanted = json.loads((out / "search.json").read_text())["trials"]   # every trial within the budget
    assert len(wanted) >= 3 and sorted(trials["trial"]) == sorted(wanted)   # as an uninterrupted run
    row = trials[trials["trial"] == first["key"]].iloc[0]
    assert row["attempts"] == 1 and row["trial_id"] == first["trial_id"]
    assert cut_short and all(trials.set_index("trial").loc[k, "attempts"] == 2 for k in cut_short)  # ran again
    assert summary["trained"] + summary["stopped_early"] == len(wanted) and summary["failed"] == 0
    asha = json.loads((out / "asha.json").read_text())      # ASHA's rung records outlive the resume
    rungs = {m: rec for m, rec in asha["brackets"][0]}
    assert first["trial_id"] in rungs[4] and set(rungs[2]) == set(trials["trial_id"])


@pytest.mark.slow
def test_resume_trains_again_the_trials_that_failed(ray_local, card_dir, tmp_path):
    """A trial whose worker died (the machine, not the recipe) is failed in the search's results; --resume
    trains it again from the start, and the results are those of a search where nothing failed."""
    from layercard.search.run import resume_search, run_search

    out = tmp_path / "s"
    # every trial's worker dies once at step 2 (a marker per trial) and the search allows no restart
    cfg = search_cfg(card_dir, "budget=null", "ks=[1]", "targets=[]", "strategies=[all]", "train.steps=4",
                     "asha.enabled=false", "train.fail_at_step=2", "train.max_failures=0")
    first = run_search(cfg, out)
    failed = pd.read_parquet(out / "trials.parquet")
    assert first["failed"] == first["candidates"] >= 2 and first["trained"] == 0
    assert (failed["status"] == "failed").all() and failed["quality"].isna().all()
    second = resume_search(out)
    trials = pd.read_parquet(out / "trials.parquet")
    assert second["failed"] == 0 and second["trained"] == second["candidates"] == first["candidates"]
    assert sorted(trials["trial"]) == sorted(failed["trial"]) and (trials["status"] == "trained").all()
    assert (trials["steps_done"] == cfg.train_config.steps).all() and trials["quality"].notna().all()
    assert (trials["attempts"] == 2).all()


def test_resume_of_a_truncated_search_record_is_one_line(tmp_path, capsys):
    from layercard.search.run import SEARCH_FILE
    from pipelines import search

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / SEARCH_FILE).write_text('{"config": {"card": "x"}, "card_id": "ab')   # a killed writer
    assert search.main(["--resume", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "search.json' is unreadable" in err and err.count("\n") == 1


def test_resume_from_storage_others_can_write_is_refused(tmp_path, capsys):
    """Restoring unpickles Tune's state: OUT/tune writable by group or others is refused before anything runs."""
    import os

    from layercard.search.run import SEARCH_FILE
    from pipelines import search

    out = tmp_path / "s"
    (out / "tune").mkdir(parents=True)
    (out / SEARCH_FILE).write_text(json.dumps({"config": {}, "card_id": "ab", "trials": {}}))
    os.chmod(out / "tune", 0o777)
    assert search.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume from search storage" in err and str(out / "tune") in err and err.count("\n") == 1


def test_resume_of_a_moved_search_is_refused(tmp_path, capsys):
    """Tune's saved state and the driver's logs name files under the OUT a search started in."""
    from layercard.search.run import SEARCH_FILE
    from pipelines import search

    out = tmp_path / "moved"
    (out / "tune").mkdir(parents=True, mode=0o700)
    (out / SEARCH_FILE).write_text(json.dumps({"config": {}, "out": str(tmp_path / "s"), "card_id": "ab", "trials": {}}))
    assert search.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"'{out}' was started as '{tmp_path / 's'}' and has moved" in err and err.count("\n") == 1
