"""``layercard search mode=explore``. Pure (no Ray): the pool (card pick, neighbours by the card's score,
baselines, stratified random sets, deduplicated; the ablation without the card's sets), the ASHA rungs
and the step plan, the rung gate. Then real Ray: a rung eval leaves training as it was (same losses),
a real explore search on a tiny random Qwen3 (ASHA stops the worse trials at a rung, resume keeps the
finished ones and ASHA's rung records, explore.json), and one under ``ray job submit`` on a test head."""
from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layercard.search import pool as ex
from layercard.select.baselines import STRATEGIES, baseline_layers
from layercard.card.layer_card import LayerCard
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.search.config import SearchConfig
from layercard.search.setup import trial_key
from tests.select.test_selection import make_card

ROOT = Path(__file__).resolve().parents[2]
SEARCH_YAML = ROOT / "configs" / "search-tiny.yaml"
PROFILE = ["data.num_samples=32", "coupling.probe_samples=8", "cost.steps=1"]


def synthetic_card(L: int = 12, seed: int = 0) -> LayerCard:
    """A complete card with coupling and analytic cost: K the Gram of random directions, b in their span."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(L, 2 * L))
    b = U @ rng.normal(size=2 * L)
    res2, grad_norm, block_influence = rng.uniform(1, 2, L), rng.uniform(1, 2, L), rng.uniform(0.1, 0.3, L)
    return make_card(b, U @ U.T, res2=res2, grad_norm=grad_norm, block_influence=block_influence)


# --------------------------------------------------------------------------- the pool (pure)
def test_unselected_mean_leaves_out_the_selection_seed():
    assert ex.unselected_mean([0.9, 0.7, 0.8], [0, 1, 2], 0) == pytest.approx(0.75)
    assert ex.unselected_mean([0.9, 0.7], [3, 5], 5) == pytest.approx(0.9)
    assert ex.unselected_mean([0.9], [0], 0) is None and ex.unselected_mean([], [], 0) is None



def test_neighbours_are_every_one_shift_and_one_swap():
    ids = list(range(8))
    S = (1, 4, 5)
    shifts = ex.shift_neighbours(ids, S, shift_max=2)
    brute = {tuple(sorted((set(S) - {l}) | {l + d})) for l in S for d in (-2, -1, 1, 2)
             if 0 <= l + d < 8 and l + d not in S}
    assert set(shifts) == brute and len(shifts) == len(brute)
    swaps = ex.swap_neighbours(ids, S)
    assert set(swaps) == {tuple(sorted((set(S) - {l}) | {m})) for l in S for m in ids if m not in S}
    assert set(shifts) <= set(swaps) and all(len(set(s) ^ set(S)) == 2 for s in swaps)


def test_stratified_sets_take_one_layer_per_depth_bin_seeded():
    ids = list(range(10, 22))
    sets = ex.stratified_sets(ids, 4, 20, seed=3)
    bins = np.array_split(np.asarray(ids), 4)
    assert len(sets) == 20 == len(set(sets))
    assert all(all(s[i] in bins[i] for i in range(4)) for s in sets)
    assert sets == ex.stratified_sets(ids, 4, 20, seed=3) and sets != ex.stratified_sets(ids, 4, 20, seed=4)
    assert len(ex.stratified_sets(ids, 12, 5, seed=0)) == 1           # one set only when every bin holds one layer
    assert ex.stratified_sets(ids, 4, 5, seed=3, avoid=set(sets[:3]))[:2] == sets[3:5]


def test_pool_is_the_card_pick_its_best_neighbours_the_baselines_then_stratified():
    from layercard.select.selection import arrays_from_card, select_max_quality, set_quality

    card = synthetic_card()
    A = arrays_from_card(card)
    k, size = 3, 16
    pool = ex.build_pool(card, k, size=size, strategies=STRATEGIES, random_seeds=[0, 1], n_shifts=2, n_swaps=3, seed=7)
    sets = [tuple(c.layers) for c in pool]
    assert len(pool) == size and len(set(sets)) == size                     # deduplicated, full
    assert [c.id for c in pool] == [f"c{i:02d}" for i in range(size)]
    pick = tuple(select_max_quality(A, k=k).layers)
    assert sets[0] == pick and pool[0].objectives == ["max-quality"]
    score = lambda s: set_quality(A, list(s))  # noqa: E731
    shifts = [c for c in pool if any(l.startswith("shift") for l in c.labels)]
    swaps = [c for c in pool if any(l.startswith("swap") for l in c.labels)]
    assert len(shifts) == 2 and len(swaps) == 3
    best_shifts = sorted((s for s in ex.shift_neighbours(card.layer_ids, pick) if s != pick), key=lambda s: -score(s))[:2]
    assert [tuple(c.layers) for c in shifts] == best_shifts
    rest = [s for s in ex.swap_neighbours(card.layer_ids, pick) if s not in best_shifts]
    assert [tuple(c.layers) for c in swaps] == sorted(rest, key=lambda s: -score(s))[:3]
    for name in ("top", "bottom", "mid", "uniform", "grad-norm", "block-influence"):
        want = tuple(baseline_layers(card, name, k))
        assert any(tuple(c.layers) == want and f"{name} k={k}" in c.labels for c in pool), name
    for seed in (0, 1):
        assert tuple(baseline_layers(card, "random", k, seed=seed)) in sets
    assert not any(c.k != k for c in pool) and tuple(card.layer_ids) not in sets     # all layers: apart
    strat = [c for c in pool if c.strategies == ["stratified"]]
    assert strat and all(c.labels[0].startswith("stratified") for c in strat)
    assert all(c.predicted_gain == pytest.approx(score(c.layers)) and c.cost > 0 for c in pool)


def test_identical_proposals_become_one_candidate_with_every_label():
    card = synthetic_card(L=6)
    # k = 6 - 1: few sets exist, so baselines and neighbours coincide
    pool = ex.build_pool(card, 5, size=50, strategies=STRATEGIES, random_seeds=[0, 1, 2])
    sets = [tuple(c.layers) for c in pool]
    assert len(sets) == len(set(sets)) <= 6                                 # C(6, 5) sets at most, each once
    labels = [l for c in pool for l in c.labels]
    assert len(labels) == len(set(labels)) > len(pool)                     # every proposal kept its label
    assert {"max-quality k=5", "top k=5", "bottom k=5"} <= set(labels)


def test_ablation_pool_holds_no_card_pick_or_neighbour_and_has_the_same_size():
    from layercard.select.selection import arrays_from_card, select_max_quality

    card = synthetic_card()
    k = 3
    pick = tuple(select_max_quality(arrays_from_card(card), k=k).layers)
    full = ex.build_pool(card, k, size=14, strategies=STRATEGIES, random_seeds=[0])
    near = {tuple(c.layers) for c in full if c.objectives}                  # the pick and its neighbours
    assert pick in near and len(near) == 1 + 2 + 2
    abl = ex.build_pool(card, k, size=14, strategies=STRATEGIES, random_seeds=[0], card_candidates=False)
    assert len(abl) == len(full) == 14
    assert not {tuple(c.layers) for c in abl} & near
    assert not any(c.objectives for c in abl)                              # nothing the card proposed
    baselines = {tuple(baseline_layers(card, s, k, seed=0)) for s in STRATEGIES if s != "all"}
    assert baselines - near <= {tuple(c.layers) for c in abl}               # baselines stay (unless a neighbour)


def test_pool_respects_the_budget():
    from layercard.select.selection import card_cost

    card = synthetic_card()
    costs = sorted(card_cost(card, list(s)) for s in itertools.combinations(card.layer_ids, 3))
    budget = costs[len(costs) // 2]
    pool = ex.build_pool(card, 3, size=20, budget=budget, strategies=STRATEGIES)
    assert pool and all(c.cost <= budget * (1 + 1e-12) and not c.over_budget for c in pool)


def test_second_round_neighbours_are_the_best_new_ones_by_the_card_or_seeded_random():
    from layercard.select.selection import arrays_from_card, set_quality

    card = synthetic_card()
    A = arrays_from_card(card)
    survivors = [[0, 4, 8], [2, 6, 10]]
    taken = {(0, 4, 8), (2, 6, 10), (1, 4, 8)}
    every = {s for S in survivors for s in ex.swap_neighbours(card.layer_ids, S)} - taken
    best = ex.neighbour_sets(card, survivors, 5, taken)
    assert best == sorted(every, key=lambda s: -set_quality(A, list(s)))[:5]
    drawn = ex.neighbour_sets(card, survivors, 5, taken, by_card=False, seed=1)
    assert len(set(drawn)) == 5 and set(drawn) <= every and drawn == ex.neighbour_sets(
        card, survivors, 5, taken, by_card=False, seed=1)


# --------------------------------------------------------------------------- steps and judging (pure)
def test_milestones_match_ray_ashas_rungs():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, eta, max_t in [(10, 3, 60), (2, 2, 6), (1, 3, 6), (5, 2, 40), (3, 4, 100)]:
        rungs = sorted(m for m, _ in _Bracket(grace, max_t, eta, 0)._rungs)
        assert ex.asha_milestones(grace, eta, max_t) == [int(m) for m in rungs if m < max_t]


def test_expected_steps_and_pool_plan():
    m = ex.asha_milestones(10, 3, 60)                                        # [10, 30]
    assert ex.expected_asha_steps(9, m, 60, 3) == 5 * 10 + 2 * 30 + 2 * 60    # 9 → 4+1 → 1+1 reach the rungs
    assert ex.expected_asha_steps(1, m, 60, 3) == 60
    n = ex.plan_pool_size(1000, m, 60, 3)
    assert ex.expected_asha_steps(n, m, 60, 3) <= 1000 < ex.expected_asha_steps(n + 1, m, 60, 3)
    assert ex.plan_pool_size(1000, m, 60, 3, cap=5) == 5
    # the fixed table: card + 7 baselines at k + all layers, 3 seeds, 60 steps
    assert ex.fixed_steps(5, 30, STRATEGIES, [0], 3, 60) == 9 * 3 * 60


def test_rung_spearman_and_gain_fractions():
    assert ex.quality_at_rungs({"2": 1.0, "4": 0.8, "6": 0.7}, [2, 3]) == [1.0, 0.8]
    rho = ex.rung_spearman([[1.0, 0.9], [2.0, 0.5], [3.0, 0.7]], [0.1, 0.2, 0.3])
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-0.5)
    assert ex.gain_fractions(1.0, {0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.5, 1: 0.5}) == pytest.approx([0.8, 0.6])


def test_explore_config_is_checked():
    base = [f"card=x", "mode=explore"]
    for override, key in [("explore.reduction_factor=1", "explore.reduction_factor"),
                          ("explore.grace_period=6", "explore.grace_period"),
                          ("explore.pool_size=1", "explore.pool_size"),
                          ("asha.enabled=true", "asha.enabled"),
                          ("records=runs.json", "records")]:
        with pytest.raises(LayercardError, match=key.replace(".", r"\.")):
            load_config(SearchConfig, SEARCH_YAML, [*base, override])
    cfg = load_config(SearchConfig, SEARCH_YAML, base)
    assert not cfg.use_asha and cfg.grace_period == 1


def test_explore_with_a_k_the_card_cannot_hold_exits_2_before_ray(card_dir, tmp_path, capsys):
    from pipelines.search import main

    rc = main(["--config", str(SEARCH_YAML), "--out", str(tmp_path / "o"), f"card={card_dir}", *EXPLORE, "ks=[4]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "config key 'ks' has [4]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_best_fixed_from_the_committed_paper_table():
    from layercard.search.explore import best_fixed_from_table

    path = ROOT / "benchmarks" / "results" / "paper_table.json"
    rows = [r for r in json.loads(path.read_text()) if r["task"] == "sentiment" and r["k"] == 5
            and r["strategy"] != "all"]
    name, gf = best_fixed_from_table(path, "sentiment", 5)
    means = {s: np.mean([r["gain_fraction"] for r in rows if r["strategy"] == s]) for s in {r["strategy"] for r in rows}}
    assert gf == pytest.approx(max(means.values())) and means[name] == pytest.approx(gf)
    assert best_fixed_from_table(path, "sentiment", 99) == (None, None)


# --------------------------------------------------------------------------- real Ray
@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    from layercard.profile.config import ProfileConfig
    from layercard.profile.run import run_profile

    card = run_profile(load_config(ProfileConfig, ROOT / "configs" / "tiny.yaml", PROFILE), progress=False)
    return card.save(tmp_path_factory.mktemp("card") / "card")


# 4 layers, k = 2: a pool of 4 sets under ASHA (rungs at steps 2 and 4 of 6), one trial at a time so
# the order the rungs fill in is the pool's; then the all-layer reference on 2 seeds and the pick on seed 1.
EXPLORE = ["mode=explore", "budget=null", "ks=[2]", "seeds=[0,1]", "explore.pool_size=4", "explore.grace_period=2",
           "explore.reduction_factor=2", "max_concurrent_trials=1", "train.warmup_steps=0"]


def explore_cfg(card_dir, *overrides: str) -> SearchConfig:
    return load_config(SearchConfig, SEARCH_YAML, [f"card={card_dir}", *EXPLORE, *overrides])


def _tiny_trainer(loop: dict, plan, rung_rows=None):
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from layercard.train.worker import train_func

    def ds(rows):
        return ray.data.from_items(rows, override_num_blocks=2)

    return TorchTrainer(train_func, train_loop_config=loop, torch_config=TorchConfig(backend="gloo"),
                        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.49}),
                        run_config=RunConfig(storage_path=loop["fault_marker"].rsplit("/", 2)[0],
                                             name=f"run-{uuid.uuid4().hex[:6]}"),
                        datasets={"train": ds(plan.train), "eval": ds(plan.eval),
                                  **({"rung_eval": ds(rung_rows)} if rung_rows else {})})


@pytest.mark.slow
def test_rung_evals_leave_training_as_it_was(ray_local, tmp_path):
    """The same run with and without a rung eval every 2 steps: the same losses, bit for bit (the rung
    eval must not draw from the RNG training uses: LoRA dropout is on here)."""
    from layercard.config import from_dict
    from layercard.train.config import TrainConfig
    from layercard.train.worker import prepare, worker_config

    t = explore_cfg(card_dir=None).train
    cfg = from_dict(TrainConfig, {**t, "strategy": "all", "lora_dropout": 0.1, "steps": 6})
    plan = prepare(cfg)
    loop = worker_config(cfg, plan, tmp_path).to_dict()
    plain = _tiny_trainer(loop, plan).fit()
    rung = _tiny_trainer({**loop, "rung_steps": [2, 4], "report_every": 1, "checkpoint_every": 1}, plan, plan.eval[:4]).fit()
    assert plain.error is None and rung.error is None
    a, b = plain.metrics, rung.metrics
    assert "rung_quality" not in a and b["rung_quality"] is not None
    assert b["train_loss_history"] == a["train_loss_history"] and b["eval_loss"] == a["eval_loss"]
    # measured at the rung steps only; every report in between (and the final one) repeats the last
    reports = rung.metrics_dataframe[["step", "rung_step", "rung_quality"]].to_dict("records")
    assert [r["step"] for r in reports] == [1, 2, 3, 4, 5, 6]
    assert [r["rung_step"] for r in reports] == [1, 2, 2, 4, 4, 4]   # step 1: none yet, measured once
    by_step = {r["step"]: r["rung_quality"] for r in reports}
    assert by_step[3] == by_step[2] and by_step[5] == by_step[6] == by_step[4]


def test_rung_log_keeps_measured_rung_qualities_only(tmp_path):
    """A report between rungs repeats the last rung quality: the log keeps the one measured at its step."""
    from types import SimpleNamespace

    from layercard.search.explore import RungLog

    path = tmp_path / "rungs.jsonl"
    log, trial = RungLog(str(path)), SimpleNamespace(config={"trial": "k5c00-s0"}, trial_id="t0")
    for result in ({"step": 10, "rung_quality": 0.5, "rung_step": 10}, {"step": 20, "rung_quality": 0.5, "rung_step": 10},
                   {"step": 30, "rung_quality": 0.4, "rung_step": 30}, {"step": 40, "eval_loss": 1.0},
                   {"step": 50, "rung_quality": 0.3}):      # no rung_step: written by an older worker, measured
        log.on_trial_result(0, [trial], trial, result)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["rung_quality"]) for r in rows] == [(10, 0.5), (30, 0.4), (50, 0.3)]
    assert {r["key"] for r in rows} == {"k5c00-s0"}


@pytest.fixture(scope="module")
def explored(ray_local, card_dir, tmp_path_factory):
    """One explore search, interrupted after its first finished trial and resumed: (out, summary, the
    events before resuming)."""
    from layercard.search.events import read_events
    from layercard.search.results import SearchInterrupted
    from layercard.search.run import resume_search, run_search

    out = tmp_path_factory.mktemp("explore") / "x"
    with pytest.raises(SearchInterrupted, match="--resume"):
        run_search(explore_cfg(card_dir, "stop_after_trials=1"), out)
    before = read_events(out)
    return out, resume_search(out), before


def _replay_asha(rung_rows: list[dict], milestones: list[int], eta: float) -> dict[str, int | None]:
    """Ray's ASHA rule (one bracket, mode min) replayed on the rung qualities in the order the driver
    saw them: trial key → the milestone it is stopped at (None: it goes on)."""
    recorded: dict[int, list[float]] = {m: [] for m in milestones}
    stopped: dict[str, int | None] = {}
    for row in rung_rows:
        key = row["key"]
        stopped.setdefault(key, None)
        if stopped[key] is not None:
            continue
        for m in reversed(milestones):            # the highest milestone this report has reached first
            if row["step"] < m or key in [k for k, _ in recorded[m]]:
                continue
            rewards = [-q for _, q in recorded[m]]
            if rewards and -row["rung_quality"] < np.nanpercentile(rewards, (1 - 1 / eta) * 100):
                stopped[key] = m
            recorded[m].append((key, row["rung_quality"]))
            break
    return stopped


@pytest.mark.slow
def test_asha_stops_the_worse_trials_at_a_rung(explored, card_dir):
    from layercard.search.explore import read_rungs

    out, _, before = explored
    cfg = explore_cfg(card_dir)
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial")
    pool = [k for k in trials.index if k.startswith("k2") and k.endswith("-s0")]
    assert len(pool) == 4
    rows = [r for r in read_rungs(out) if r["key"] in pool]
    # ASHA's rung records outlive the interruption (PersistentASHA): the resumed search stops the trials an
    # uninterrupted one stops, judged on every rung quality in the order the driver saw them
    resumed_at = max(e["time"] for e in before)
    (first,) = [e for e in before if e["event"] == "complete"]
    stops = _replay_asha(rows, [2, 4], cfg.explore.reduction_factor)
    for key in pool:
        t = trials.loc[key]
        if stops[key] is None:
            assert t["status"] == "trained" and t["steps_done"] == cfg.train_config.steps, key
        else:
            assert t["status"] == "stopped_early" and t["steps_done"] == stops[key], key
            # its quality is what it last measured on the eval split (eval loss), named so; none, no name
            if t["quality"] is None or pd.isna(t["quality"]):
                assert t["quality_name"] is None, key
            else:
                assert t["quality_name"] == "eval_loss" and t["quality"] == t["eval_loss"], key
    stopped = [k for k in pool if stops[k] is not None]
    assert 1 <= len(stopped) < len(pool)
    at = {j: {} for j in pool}                  # a trial run again after the resume is judged on its first report
    for r in rows:
        at[r["key"]].setdefault(r["step"], r["rung_quality"])
    for k in stopped:           # a stopped trial was worse than the best trial recorded at its rung
        m = stops[k]
        assert at[k][m] > min(at[j][m] for j in pool if j != k and m in at[j])
    # the records after the resume: the first report of every trial at each rung it reached, under the
    # trial id it had before the interruption (the trial finished then among them), and the stops
    ids = {k: {r["trial_id"] for r in rows if r["key"] == k} for k in pool}
    assert all(len(v) == 1 for v in ids.values()) and ids[first["key"]] == {first["trial_id"]}
    ids = {k: v.pop() for k, v in ids.items()}
    state = json.loads((out / "explore" / "asha-k2-r1.json").read_text())
    rungs = {m: rec for m, rec in state["brackets"][0]}
    assert rungs == {m: {ids[k]: -at[k][m] for k in pool if m in at[k]} for m in (2, 4)}
    assert state["stopped"] == {ids[k]: stops[k] for k in stopped}
    assert any(min(r["time"] for r in rows if r["key"] == k) > resumed_at for k in pool)   # judged after the resume
    res = pd.read_parquet(out / "results.parquet").set_index("candidate")
    for k in pool:
        c = k.split("-")[0]
        assert res.loc[c, "rung_reached"] == (3 if stops[k] is None else [2, 4].index(stops[k]) + 1)


@pytest.mark.slow
def test_explore_resumes_keeping_finished_trials(explored):
    from layercard.search.events import read_events

    out, summary, before = explored
    done = [e for e in before if e["event"] == "complete"]
    assert len(done) == 1
    first = done[0]["key"]
    after = read_events(out)
    assert sum(e["event"] == "start" and e["key"] == first for e in after) == 1      # not run again
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials.loc[trials["trial"] == first, "attempts"].item() == 1
    assert summary["failed"] == 0 and len(trials) == 4 + 3


@pytest.mark.slow
def test_explore_writes_its_rows_and_the_usual_outputs(explored, card_dir):
    out, summary, _ = explored
    (row,) = json.loads((out / "explore.json").read_text())
    keys = {"task", "k", "picked_layers", "gain_fraction_mean", "gain_fraction_sd", "best_fixed_strategy",
            "best_fixed_gain_fraction", "steps", "fixed_steps", "rung_spearman"}
    assert keys <= set(row) and row["task"] == "tiny" and row["k"] == 2 and len(row["picked_layers"]) == 2
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial")
    res = pd.read_parquet(out / "results.parquet").set_index("candidate")
    ended = [t for t in trials.index if t.startswith("k2") and t.endswith("-s0") and trials.loc[t, "status"] == "trained"]
    best = min(ended, key=lambda t: trials.loc[t, "quality"])
    assert res.loc[best.split("-")[0], "layers"].tolist() == row["picked_layers"]
    pick = best.split("-")[0]
    assert set(trials.loc[[f"{pick}-s0", f"{pick}-s1", "all-s0", "all-s1"], "status"]) == {"trained"}
    base = trials["initial_quality"].median()
    gf = [(base - trials.loc[f"{pick}-s{s}", "quality"]) / (base - trials.loc[f"all-s{s}", "quality"]) for s in (0, 1)]
    assert row["gain_fraction_mean"] == pytest.approx(np.mean(gf))
    assert row["seeds"] == [0, 1] and row["selection_seed"] == 0                 # the pick was chosen on seed 0
    assert row["gain_fraction_mean_unselected"] == pytest.approx(gf[1])
    assert row["steps"] == trials["steps_done"].sum()                       # every step the search trained
    assert row["fixed_steps"] == ex.fixed_steps(2, 4, STRATEGIES, [0], 2, 6)
    assert [g["step"] for g in row["rung_spearman"]] == [2, 4]
    assert row["rung_spearman"][1]["n_sets"] == len(ended)
    assert "rung_reached" in res.columns and res.loc["all", "rung_reached"] == 3
    text = (out / "summary.md").read_text()
    assert "## Explore" in text and ("Rung gate passed" in text or "Warning: rung gate" in text)
    assert LayerCard.load(out / "card").meta["parent_card_id"] == LayerCard.load(card_dir).card_id
    assert (out / "frontier.png").is_file() and summary["explore"][0] == row


def test_fingerprint_names_what_the_numbers_depend_on():
    from layercard.search.reuse import fingerprint

    model = {"path": "/root/.cache/layercard/models/m", "gguf_file": None, "config": None, "device": "cpu",
             "dtype": "float32", "cache_dir": "~/.cache/layercard/models"}
    base = {"lr": 0.005, "steps": 6, "rung_steps": [2, 4], "fault_marker": "/a", "initial_eval": None,
            "silent_through": 0, "lora": None, "layers": None, "seed": 0, "model": model}
    data = {"train": "t", "eval": "e", "rung_eval": None}
    trial = {"lora": {"r": 4}, "layers": [1, 2], "seed": 0}
    fp = fingerprint(base, "w", data, trial)
    # where the weights lie is not what the numbers depend on (their hash, "w", is)
    moved = {**model, "path": "/data/cache/models/m", "cache_dir": "/data/cache/models"}
    same = [({**base, "fault_marker": "/b", "initial_eval": {"x": 1}, "silent_through": 2}, "w", data, trial),
            ({**base, "model": moved}, "w", data, trial)]
    other = [({**base, "lr": 0.004}, "w", data, trial), ({**base, "rung_steps": None}, "w", data, trial),
             ({**base, "model": {**model, "dtype": "bfloat16"}}, "w", data, trial),
             ({**base, "model": {**model, "device": "cuda"}}, "w", data, trial),
             (base, "v", data, trial), (base, "w", {**data, "rung_eval": "r"}, trial),
             (base, "w", data, {**trial, "seed": 1}), (base, "w", data, {**trial, "layers": [1, 3]}),
             (base, "w", data, {**trial, "lora": {"r": 8}})]
    assert all(fingerprint(*a) == fp for a in same) and all(fingerprint(*a) != fp for a in other)


@pytest.mark.slow
def test_reuse_matches_the_same_recipe_only(explored, card_dir, tmp_path, capsys):
    """Every trial of the explored search is found again by a search with its config, in the phase it ran in;
    a search with another learning rate, or the final phase's trials looked up with rung steps, find none; a
    run recorded under another torch is not replayed."""
    import shutil

    import torch

    from layercard.search.explore import REFERENCE, _trials, setup_explore
    from layercard.search.reuse import load_sources, replays_for
    from layercard.search.trials import base_worker_config

    out, _, _ = explored
    index = load_sources([str(out)])
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(index) == len(trials) and all(r.source == str(out) for r in index.values())

    def found(cfg, rungs: bool, final: bool):
        s, p = setup_explore(cfg, tmp_path / "probe")
        pool = [*p.pools[2], p.reference] if final else p.pools[2]
        s = dataclasses.replace(s, trials=_trials(s, pool, cfg.seeds if final else cfg.seeds[:1]))
        rung_rows = s.plan.eval[:cfg.explore.rung_eval_examples] if rungs else None
        base = base_worker_config(s, {"rung_steps": p.milestones} if rungs else None).to_dict()
        return replays_for(s, base, {"train": s.plan.train, "eval": s.plan.eval, "rung_eval": rung_rows}, index)

    cfg = explore_cfg(card_dir)
    r1 = found(cfg, True, False)
    assert sorted(r1) == sorted(k for k in trials["trial"] if k.startswith("k2") and k.endswith("-s0"))
    final = found(cfg, False, True)
    assert {trial_key(REFERENCE, 0), trial_key(REFERENCE, 1)} <= set(final)
    assert all(r.complete and r.reports[-1]["step"] == 6 for r in final.values())
    assert not found(explore_cfg(card_dir, "train.lr=0.004"), True, False)
    assert not set(found(cfg, True, True)) & {trial_key(REFERENCE, 0), trial_key(REFERENCE, 1)}
    # a run trained under another torch is not replayed (the run records the versions it trained with)
    assert final[trial_key(REFERENCE, 0)].reports[-1]["library_versions"]["torch"] == torch.__version__
    src = tmp_path / "src"
    shutil.copytree(out, src)
    (result,) = [d / "result.json" for d in (src / "tune" / "search-final").glob("*trial=all-s0*") if d.is_dir()]
    rows = [json.loads(l) for l in result.read_text().splitlines()]
    rows[-1]["library_versions"]["torch"] = "0.0.1"
    result.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = load_sources([str(src)])
    assert len(index) == len(trials) - 1 and "trained with torch 0.0.1 (here" in capsys.readouterr().out
    assert trial_key(REFERENCE, 0) not in found(cfg, False, True)


def test_reuse_of_no_search_is_a_one_line_error(card_dir, tmp_path):
    from layercard.search.run import run_search

    with pytest.raises(LayercardError, match="config key 'reuse' names '.*nothing', which holds no search"):
        run_search(explore_cfg(card_dir, f"reuse=[{tmp_path / 'nothing'}]"), tmp_path / "a")
    with pytest.raises(LayercardError, match="names the search's own OUT"):
        run_search(explore_cfg(card_dir, f"reuse=[{tmp_path / 'b'}]"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_run_records_hold_what_the_search_reported(explored, tmp_path, capsys, monkeypatch):
    """A run-record file holds every run of the search, with the reports and completeness reading the
    search finds; exporting again changes nothing; a shorter run with the same fingerprint is extended,
    a run from elsewhere kept; a run under another torch is kept but not replayed."""
    from layercard.search.reuse import export_runs, load_sources, read_records

    out, _, _ = explored
    index = load_sources([str(out)])
    records = tmp_path / "runs.jsonl"
    assert export_runs([str(out)], records) == {"runs": len(index), "complete": sum(r.complete for r in index.values()),
                                                "new": len(index)}
    got = read_records(records)
    assert {fp: (r.key, r.complete, r.reports) for fp, r in got.items()} == \
        {fp: (r.key, r.complete, r.reports) for fp, r in index.items()}
    text = records.read_text()
    assert export_runs([str(out)], records)["new"] == 0 and records.read_text() == text     # idempotent
    # a cut run and a foreign run in the file: the cut one is extended, the foreign one kept
    lines = [json.loads(l) for l in text.splitlines()]
    cut = next(r for r in lines if r["complete"] and len(r["reports"]) > 1)
    cut.update(complete=False, reports=cut["reports"][:1])
    foreign = {**lines[0], "fingerprint": "f" * 64, "key": "elsewhere-s0", "source": "other"}
    records.write_text("".join(json.dumps(r) + "\n" for r in [*lines, foreign]))
    assert export_runs([str(out)], records) == {"runs": len(index) + 1, "complete": sum(r.complete for r in index.values())
                                                + foreign["complete"], "new": 1}
    assert read_records(records)[cut["fingerprint"]].reports == index[cut["fingerprint"]].reports
    # another torch: kept in the file, not replayed
    rows = [json.loads(l) for l in records.read_text().splitlines()]
    rows[0]["reports"][-1]["library_versions"]["torch"] = "0.0.1"
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_sources([str(records)])) == len(index)
    assert "trained with torch 0.0.1 (here" in capsys.readouterr().out
    assert export_runs([str(out)], records)["runs"] == len(index) + 1
    # a search whose config names its card relative to where it ran: the card's resolved path is used
    import shutil

    src = tmp_path / "src"
    shutil.copytree(out, src)
    saved = json.loads((src / "search.json").read_text())
    saved["config"]["card"] = "card"
    (src / "search.json").write_text(json.dumps(saved))
    assert not Path("card").exists() and set(load_sources([str(src)])) == set(index)
    # its data path was relative (configs/search-tiny.yaml), saved absolute: reused from another directory too
    assert Path(saved["config"]["train"]["data"]["path"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert set(load_sources([str(src)])) == set(index)


@pytest.mark.slow
def test_a_search_keeps_its_runs_when_it_is_interrupted(explored, tmp_path, capsys):
    """config key ``records``: whatever ends the search (here Ctrl+C), its runs are merged into the
    record file and the interruption stands; a record file that cannot be written is one line on stderr
    and does not hide the interruption."""
    from layercard.search.reuse import load_sources, read_records
    from layercard.search.run import recorded

    out, _, _ = explored
    records = tmp_path / "runs.jsonl"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recorded(str(records), out, interrupted)
    assert set(read_records(records)) == set(load_sources([str(out)]))
    assert f"in {records} (" in capsys.readouterr().out
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(KeyboardInterrupt):
        recorded(str(tmp_path / "dir.jsonl"), out, interrupted)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dir.jsonl" in err and "is a directory" in err
    assert recorded(None, out, lambda: 7) == 7


def test_export_runs_refuses_bad_input_and_leaves_the_file(tmp_path, capsys):
    from pipelines.cli import main

    records = tmp_path / "runs.jsonl"
    assert main(["export-runs", "--to", str(records), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing" in err and "no search" in err and not records.exists()
    records.write_text('{"fingerprint": "a", "source": "s", "key": "k"}\n')
    before = records.read_text()
    assert main(["export-runs", "--to", str(records), str(records)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{records}' line 1 is not a run record" in err
    assert records.read_text() == before
    assert main(["export-runs", "--to", str(tmp_path / "runs.json"), str(records)]) == 2
    assert "must end in .jsonl" in capsys.readouterr().err and not (tmp_path / "runs.json").exists()


@pytest.mark.slow
def test_an_ablation_replays_the_runs_it_shares_with_the_search(explored, card_dir, tmp_path, capsys):
    """The ablation with ``records`` = a run-record file of the explored search, whose directory is gone. A
    trial both ran replays the earlier reports: the
    same numbers bit for bit, and nothing trains for it. A trial the earlier search ended early (here its
    result.json cut to its first report, as when ASHA stops it at a rung) replays that report, then trains
    from the start, silent through it: the uncut run's final numbers, each step reported once."""
    import shutil

    from layercard.search.explore import read_rungs
    from layercard.search.reuse import export_runs
    from layercard.search.run import run_search

    out, _, _ = explored
    src = tmp_path / "src"
    shutil.copytree(out, src)
    (cut,) = [d for d in (src / "tune" / "search-final").glob("*trial=all-s0*") if d.is_dir()]
    lines = (cut / "result.json").read_text().splitlines()
    assert len(lines) > 1
    (cut / "result.json").write_text(lines[0] + "\n")
    records = tmp_path / "runs.jsonl"             # replayed from a run-record file of the cut copy
    export_runs([str(src)], records)
    cut_records = tmp_path / "cut.jsonl"
    shutil.copy(records, cut_records)
    shutil.rmtree(src)
    new = tmp_path / "ablation"
    # 4 layers hold 6 pairs: with one shift neighbour and no swap the card proposes 2, the ablation takes 3 others
    summary = run_search(explore_cfg(card_dir, "explore.card_candidates=false", "explore.n_shifts=1",
                                     "explore.n_swaps=0", "explore.pool_size=3", f"records={records}"), new)
    assert summary["failed"] == 0
    printed = capsys.readouterr().out
    assert "earlier runs to reuse from 1 search(es)" in printed and "(reused)" in printed

    def by_set(d):
        t = pd.read_parquet(d / "trials.parquet")
        res = pd.read_parquet(d / "results.parquet").set_index("candidate")
        rungs = {(r["key"], r["step"]): r["rung_quality"] for r in read_rungs(d)}
        return {(tuple(res.loc[r.trial.rsplit("-s", 1)[0], "layers"]), int(r.trial.rsplit("-s", 1)[1])):
                (r.trial, r.steps_done, r.quality, {s: q for (k, s), q in rungs.items() if k == r.trial})
                for r in t.itertuples()}

    old, now = by_set(out), by_set(new)
    shared = [k for k in now if k in old]
    assert len(shared) >= 3                         # the reference on both seeds and a baseline at least
    for k in shared:
        key, steps, q, rung = now[k]
        _, old_steps, old_q, old_rung = old[k]
        trained = (new / "tune").rglob(f"train_runs/{key}")
        if key == "all-s0":                         # its cut run: trained again, to the same numbers
            assert list(trained) and q == old_q and steps == 6
            reports = [json.loads(l) for l in next((new / "tune" / "search-final").glob("*trial=all-s0*"))
                       .joinpath("result.json").read_text().splitlines()]
            assert [r["step"] for r in reports] == sorted({r["step"] for r in reports})
            assert reports[0].get("reused_from") == str(src) and not reports[-1].get("reused_from")
        elif steps <= old_steps:                    # replayed: nothing trained, the same numbers
            assert not list(trained), key
            assert rung == {s: v for s, v in old_rung.items() if s <= steps}
            assert q == old_q or steps < 6
    reused = pd.read_parquet(new / "trials.parquet").set_index("trial")["reused_from"]
    assert reused["all-s1"] == str(src) and pd.isna(reused["all-s0"])
    (row,) = json.loads((new / "explore.json").read_text())
    assert row["steps_reused"] >= 6 and row["steps_reused"] <= row["steps"]
    assert "replayed from earlier searches" in (new / "summary.md").read_text()
    # the record file now also holds the ablation's runs: the cut run trained to the end, its own sets
    from layercard.search.reuse import load_sources, read_records

    kept = read_records(records)
    for fp, run in load_sources([str(new)]).items():
        assert kept[fp].reports[-1]["step"] >= run.reports[-1]["step"], run.key
    assert sum(r.complete for r in kept.values()) > sum(r.complete for r in read_records(cut_records).values())


@pytest.mark.slow
def test_explore_under_ray_job_submit(card_dir, tmp_path):
    """``layercard search mode=explore`` as a job on a real head (token auth on): it finishes and writes explore.json."""
    from ray_head import start_head, stop_head, submit_job

    head = start_head(tmp_path / "head")
    out = tmp_path / "job"
    try:
        proc = submit_job(head, ["--submission-id", f"explore-{uuid.uuid4().hex[:8]}", "--working-dir", str(ROOT),
                                 "--", sys.executable, "-m", "pipelines.search", "--config", str(SEARCH_YAML),
                                 "--out", str(out), f"card={card_dir}", *EXPLORE, "seeds=[0]", "explore.pool_size=2",
                                 "train.steps=4", "max_concurrent_trials=2"],
                          timeout=1200)     # ~90 s on an idle 2-core machine; 8 min beside other training
    finally:
        stop_head(head.temp_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "## Explore" in proc.stdout and "| k | pick |" in proc.stdout           # the result table, not JSON
    assert f"layercard search: wrote {out.resolve()}" in proc.stdout
    (row,) = json.loads((out / "explore.json").read_text())
    assert row["k"] == 2 and row["gain_fraction_mean"] is not None and row["steps"] <= 3 * 4
    assert len(pd.read_parquet(out / "trials.parquet")) == 3


@pytest.mark.slow
def test_explore_table_smoke(explored, tmp_path):
    """benchmarks/explore_table.py --smoke: the explore search and its ablation on the tiny model (replaying
    the runs the explored search made), merged into RESULTS/explore_tiny.json, every run kept in
    RESULTS/records/explore_tiny.jsonl; run again, it reuses the finished searches (nothing trains)."""
    from bench_scripts import load_benchmark

    bench = load_benchmark("explore_table")
    # the explored search's recipe (6 steps, the same rungs): the sets both pools hold replay its runs
    args = ["--smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--seeds", "0",
            "--steps", "6", "--reuse", str(explored[0])]
    assert bench.main(args) == 0
    (row,) = json.loads((tmp_path / "results" / "explore_tiny.json").read_text())
    assert {"picked_layers", "gain_fraction_mean", "steps", "fixed_steps", "rung_spearman", "ablation_gain_fraction",
            "ablation_steps", "best_fixed_strategy"} <= set(row)
    assert row["task"] == "tiny" and row["ablation_steps"] > 0 and row["card_helps"] in (True, False)
    assert 0 < row["steps_reused"] <= row["steps"]                          # runs of the explored search
    assert 6 <= row["ablation_steps_reused"] <= row["ablation_steps"]       # the reference at least: replayed
    ablation = json.loads((tmp_path / "work" / "tiny" / "explore-k2-ablation" / "search.json").read_text())
    assert not any(c["objectives"] for c in ablation["candidates"])           # no card pick, no neighbour
    stamp = (tmp_path / "work" / "tiny" / "explore-k2" / "trials.parquet").stat().st_mtime_ns
    assert bench.main([*args, "--resume"]) == 0
    assert (tmp_path / "work" / "tiny" / "explore-k2" / "trials.parquet").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "results" / "explore_tiny.json").read_text()) == [row]
    meta = json.loads((tmp_path / "results" / "explore_tiny_meta.json").read_text())
    assert meta["command"].startswith("python benchmarks/explore_table.py --smoke") and meta["machine"]
    assert set(meta["searches"]) == {str(tmp_path / "work" / "tiny" / n) for n in ("explore-k2", "explore-k2-ablation")}
    assert all(m > 0 for m in meta["searches"].values())
    # every run is kept in the run-record file (replayed with its search gone: the ablation test above)
    from layercard.search.reuse import load_sources, read_records

    records = read_records(tmp_path / "results" / "records" / "explore_tiny.jsonl")
    for name in ("explore-k2", "explore-k2-ablation"):       # each run, or a longer one of the same set
        for fp, run in load_sources([str(tmp_path / "work" / "tiny" / name)]).items():
            assert records[fp].reports[-1]["step"] >= run.reports[-1]["step"], (name, run.key)


def test_explore_table_verdicts():
    """merge: the budget, best-fixed and card verdicts, on all seeds and on the seeds the pick was not chosen on
    (computed for rows written before ``gain_fraction_mean_unselected`` existed)."""
    from bench_scripts import load_benchmark

    bench = load_benchmark("explore_table")
    row = {"k": 5, "gain_fraction_mean": 0.9, "gain_fraction_sd": 0.05, "gain_fractions": [1.0, 0.85, 0.85],
           "seeds": [0, 1, 2], "best_fixed_gain_fraction": 0.92, "steps": 1100, "fixed_steps": 1000,
           "picked_labels": ["mid k=5"]}
    ablation = {"k": 5, "gain_fraction_mean": 0.8, "gain_fraction_sd": 0.01, "steps": 1000, "picked_layers": [1]}
    (m,) = bench.merge([row], [ablation])
    assert m["selection_seed"] == 0 and m["gain_fraction_mean_unselected"] == pytest.approx(0.85)
    assert m["within_budget"] and m["meets_best_fixed"]                        # 0.9 ≥ 0.92 − 0.05
    assert m["meets_best_fixed_unselected"] is False                          # 0.85 < 0.87
    assert m["card_helps"] and m["ablation_gain_fraction"] == 0.8             # 0.8 ≤ 0.9 − 0.05
    assert m["pick_proposed_by_card"] is False                                # a baseline, in both pools
    for labels, want in ((["swap k=5 #1"], True), (["top k=5", "max-quality k=5"], True), (["stratified k=5 #2"], False)):
        assert bench.merge([{**row, "picked_labels": labels}], [ablation])[0]["pick_proposed_by_card"] is want
    (m,) = bench.merge([{**row, "steps": 1101, "gain_fraction_mean_unselected": 0.88}], [])
    assert not m["within_budget"] and m["meets_best_fixed_unselected"] and m["card_helps"] is None
