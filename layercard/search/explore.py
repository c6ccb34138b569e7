"""``layercard search mode=explore``: a layer-subset search that explores, under a training-step budget.

    layercard search --config configs/search-tiny.yaml --out runs/explore card=runs/tiny-card mode=explore ks=[2]
    layercard search --config configs/search-tiny.yaml --out runs/ablation card=runs/tiny-card mode=explore \\
        ks=[2] explore.card_candidates=false
    layercard search --resume runs/explore

Phases, each one Ray Tune experiment under the search's storage (``NAME-<phase>``), run in order:

1. ``k<K>-r1`` per k: the pool of :func:`layercard.search.pool.build_pool` on the first seed under ASHA
   (``time_attr="step"``, metric ``rung_quality``: the label loss, else the eval loss, on the first
   ``explore.rung_eval_examples`` eval examples, evaluated at each rung's step only, without touching
   the training RNG). Survivors of the last rung train to ``train.steps``.
2. ``k<K>-r2`` per k (``explore.second_round``): neighbours of the sets trained to the end, as many as
   the remaining step budget allows, under the same schedule.
3. ``final``: the all-layer reference on every seed and each k's pick (the set trained to the end with
   the best final quality) on the other seeds, all to the end (no early stopping).

A finished phase is kept in ``OUT/explore/<phase>.json``; ``--resume`` skips finished phases and
restores the interrupted one (``Tuner.restore``: finished trials are kept; ASHA's rung records, kept in
``OUT/explore/asha-<phase>.json`` by :class:`layercard.search.asha.PersistentASHA`, carry over, so the
resumed phase stops the trials an uninterrupted one would). Outputs: those of every
search (results.parquet with ``rung_reached``, trials.parquet, frontier.png, summary.md, card/) plus
``explore.json``, one row per k (see :func:`explore_rows`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.tune import Callback

from layercard.atomic import atomic_write_json, private_dir
from layercard.config import from_dict
from layercard.errors import LayercardError
from layercard.runtime import alive_nodes, check_storage_reachable, connect_ray
from layercard.search import pool as ex
from layercard.search.config import SearchConfig
from layercard.search.events import EVENTS_FILE, STOP_FILE, read_events
from layercard.search.publish import write_outputs
from layercard.search.results import SearchInterrupted
from layercard.search.run import check_resumed, read_saved_search, resumed_config, save_search, with_replays
from layercard.search.setup import Setup, setup, trial_key, trial_lora
from layercard.search.trials import TrialLog, check_trial_fits, settle, trial_base_eval, tune_trainable
from layercard.select.candidates import Candidate

EXPLORE_DIR = "explore"          # OUT/explore: one JSON per finished phase, the rung log, ASHA's records per phase
RUNG_LOG = "rungs.jsonl"         # every rung quality a trial reported, in the order the driver saw them
EXPLORE_FILE = "explore.json"
REFERENCE = "all"                # the all-layer reference's candidate id


# --------------------------------------------------------------------------- what to train (no Ray)
@dataclass
class ExplorePlan:
    milestones: list[int]        # ASHA rungs (steps), ascending, below train.steps
    grace: int
    pools: dict[int, list[Candidate]]
    reference: Candidate
    fixed_steps: dict[int, int]  # k → steps of the fixed table at k
    cap_steps: dict[int, float]  # k → budget_factor x fixed_steps
    pool_size: dict[int, int]


# What a failed rung gate means for the pick, and what to do about it.
GATE_ADVICE = ("the pick is the best set that survived the rungs, not necessarily the pool's best: train it beside "
               "the baselines on more seeds (mode=subsets sets=[[...]] seeds=[0,1,2]) before relying on it")


def plan_explore(cfg: SearchConfig, card) -> ExplorePlan:
    """The rungs, the round-1 pool per k and the step budget, from the config and card alone."""
    from layercard.profile.adam_step import step_budget
    from layercard.select.selection import arrays_from_card

    arrays = arrays_from_card(card, cfg.budget_unit, model=cfg.model, step_budget=step_budget(
        cfg.train_config.lr, cfg.train_config.steps, cfg.train_config.warmup_steps))   # the card's set model
    t, e = cfg.train_config, cfg.explore
    ids = list(card.layer_ids)
    bad = [k for k in cfg.ks if not 1 <= k < len(ids)]
    if bad:
        raise LayercardError(f"config key 'ks' has {bad}: with mode=explore every k must be in 1..{len(ids) - 1} "
                             f"(the card has {len(ids)} layers; all of them is the reference)")
    grace = cfg.grace_period
    milestones = ex.asha_milestones(grace, e.reduction_factor, t.steps)
    n_seeds = len(cfg.seeds)
    pools, fixed, cap, sizes = {}, {}, {}, {}
    for k in cfg.ks:
        fixed[k] = ex.fixed_steps(k, len(ids), cfg.strategies, cfg.random_seeds, n_seeds, t.steps)
        cap[k] = e.budget_factor * fixed[k]
        # fixed costs: the reference on every seed, the pick on the seeds after the first
        available = cap[k] - (2 * n_seeds - 1) * t.steps
        if e.second_round:
            available /= 2          # the other half is the second round's
        sizes[k] = e.pool_size or ex.plan_pool_size(available, milestones, t.steps, e.reduction_factor, cap=e.max_pool)
        if sizes[k] < 2:
            raise LayercardError(f"explore.budget_factor={e.budget_factor:g} leaves room for {sizes[k]} candidate(s) "
                                 f"at k={k} ({fixed[k]} fixed-table steps, {t.steps} steps a run, {n_seeds} seeds); "
                                 "raise it or set explore.pool_size")
        pools[k] = ex.build_pool(card, k, size=sizes[k], budget=cfg.budget, budget_unit=cfg.budget_unit,
                                 strategies=cfg.strategies, random_seeds=cfg.random_seeds, n_shifts=e.n_shifts,
                                 n_swaps=e.n_swaps, shift_max=e.shift_max, seed=e.seed,
                                 card_candidates=e.card_candidates, prefix=f"k{k}", arrays=arrays)
        if len(pools[k]) < 2:
            raise LayercardError(f"the explore pool at k={k} has {len(pools[k])} set(s) within the budget "
                                 f"{cfg.budget}: raise the budget or choose another k")
    ref = ex.make_candidates(card, [(tuple(ids), "all", None, "all")], 1, None, cfg.budget_unit, "")[0]
    ref.id = REFERENCE
    return ExplorePlan(milestones, grace, pools, ref, fixed, cap, sizes)


def _trials(s: Setup, candidates: list[Candidate], seeds: list[int]) -> dict[str, dict]:
    out = {}
    for c in candidates:
        lora, layers = trial_lora(s.card, c.layers, s.cfg)
        for seed in seeds:
            out[trial_key(c.id, seed)] = {"candidate": c.id, "seed": seed, "layers": layers, "lora": lora}
    return out


def setup_explore(cfg: SearchConfig, out: Path) -> tuple[Setup, ExplorePlan]:
    """Every input check of :func:`layercard.search.setup.setup` (card, model, data) and the explore plan."""
    probe = from_dict(SearchConfig, {**cfg.to_dict(), "mode": "subsets", "ks": [1], "strategies": ["all"],
                                     "targets": [], "budget": None, "asha": {"enabled": False}})
    s = dataclasses.replace(setup(probe, out), cfg=cfg)
    p = plan_explore(cfg, s.card)
    first = [c for k in cfg.ks for c in p.pools[k]]
    s = dataclasses.replace(s, candidates=[*first, p.reference], trials=_trials(s, first, cfg.seeds[:1]),
                            rungs=p.milestones)
    return s, p


# --------------------------------------------------------------------------- phases on Ray Tune
@dataclass
class PhaseResult:
    """A finished trial as the results code reads it (the shape of a Tune ``Result``), kept as JSON."""

    config: dict
    metrics: dict
    error: str | None

    def to_dict(self) -> dict:
        return {"trial": self.config["trial"], "metrics": self.metrics, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseResult":
        return cls({"trial": d["trial"]}, d["metrics"], d["error"])


class RungLog(Callback):
    """Driver-side: appends every reported rung quality to ``OUT/explore/rungs.jsonl``, in arrival order
    (the order ASHA decided in)."""

    def __init__(self, path: str):
        self.path = path

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("rung_quality") is None or result.get("rung_step", result.get("step")) != result.get("step"):
            return              # none, or the last rung's repeated by a report between rungs
        row = {"time": time.time(), "key": trial.config.get("trial"), "trial_id": trial.trial_id,
               "step": result.get("step"), "rung_quality": result["rung_quality"]}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_rungs(out: Path) -> list[dict]:
    path = out / EXPLORE_DIR / RUNG_LOG
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def _jsonable(metrics: dict | None) -> dict:
    return json.loads(json.dumps(dict(metrics or {}), default=str))


def run_phase(s: Setup, p: ExplorePlan, name: str, trials: dict, asha: bool) -> list[PhaseResult]:
    """One phase: its trials on Ray Tune (restored when an interrupted run left its experiment), kept in
    ``OUT/explore/NAME.json`` once every trial finished; raises SearchInterrupted otherwise."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from layercard.search.asha import PersistentASHA

    path = s.out / EXPLORE_DIR / f"{name}.json"
    if path.is_file():
        return [PhaseResult.from_dict(d) for d in json.loads(path.read_text())["results"]]
    if not trials:
        return []
    sp = dataclasses.replace(s, trials=trials)
    experiment = f"{s.storage.rstrip('/')}/{s.cfg.name}-{name}"
    base_eval = trial_base_eval(sp)
    # rung evals where ASHA decides; the final phase (no early stopping) needs none
    rung_rows = s.plan.eval[:s.cfg.explore.rung_eval_examples] if asha else None
    trainable = tune_trainable(sp, base_eval, loop={"rung_steps": p.milestones} if asha else None,
                               rung_eval=rung_rows)
    if tune.Tuner.can_restore(experiment):      # an interrupted run of this phase saved its state
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=True)
    else:
        t = s.cfg.train_config
        # its rung records outlive an interruption: the restored phase prunes as an uninterrupted one would
        scheduler = (PersistentASHA(s.out / EXPLORE_DIR / f"asha-{name}.json", time_attr="step",
                                    metric="rung_quality", mode="min", max_t=t.steps, grace_period=p.grace,
                                    reduction_factor=s.cfg.explore.reduction_factor)
                     if asha else FIFOScheduler())
        callbacks = [TrialLog(str(s.out), base_eval, len(trials)), RungLog(str(s.out / EXPLORE_DIR / RUNG_LOG))]
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(list(trials))},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=s.cfg.max_concurrent_trials,
                                        reuse_actors=False),
            run_config=tune.RunConfig(name=f"{s.cfg.name}-{name}", storage_path=s.storage, callbacks=callbacks,
                                      verbose=0))
    print(f"layercard search: explore phase {name}: {len(trials)} trials", flush=True)
    try:
        grid = tuner.fit()
    finally:
        settle()
    done = {e["key"] for e in read_events(s.out) if e["event"] in ("complete", "error")}
    missing = [k for k in trials if k not in done]
    if missing:
        raise SearchInterrupted(f"search interrupted in explore phase {name} with {len(trials) - len(missing)} "
                                       f"of {len(trials)} trials finished; resume with "
                                       f"`layercard search --resume {s.out}`")
    results = [PhaseResult({"trial": r.config["trial"]}, _jsonable(r.metrics),
                           None if r.error is None else str(r.error).splitlines()[0][:500]) for r in grid]
    atomic_write_json(path, {"phase": name, "results": [r.to_dict() for r in results]}, indent=1)
    return results


# --------------------------------------------------------------------------- the search
def _final_quality(results: list[PhaseResult], steps: int) -> dict[str, float]:
    """trial key → final quality of the trials that trained to the end without error."""
    return {r.config["trial"]: r.metrics.get("quality", r.metrics.get("eval_loss")) for r in results
            if r.error is None and r.metrics.get("step") == steps and r.metrics.get("median_step_s") is not None}


def _steps_done(results: list[PhaseResult]) -> dict[str, int]:
    return {r.config["trial"]: int(r.metrics.get("step") or 0) for r in results}


def _steps_reused(results: list[PhaseResult]) -> dict[str, int]:
    """trial key → the steps an earlier search trained for it (config key ``reuse``): its reports were
    replayed, none of those steps was trained again."""
    return {r.config["trial"]: int(r.metrics.get("step") or 0) for r in results if r.metrics.get("reused_from")}


def execute(s: Setup, p: ExplorePlan) -> dict:
    """Run (or continue) every phase, then write the outputs."""
    cfg, t = s.cfg, s.cfg.train_config
    (s.out / EXPLORE_DIR).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")   # each report waits for one (NOTES)
    connect_ray(t.address)
    check_storage_reachable(s.storage, alive_nodes(), "storage_path")
    check_trial_fits(cfg)
    stop = s.out / STOP_FILE
    if cfg.stop_after_trials:
        stop.write_text(str(cfg.stop_after_trials))
    elif stop.exists():
        stop.unlink()
    seed0 = cfg.seeds[0]
    candidates: dict[str, Candidate] = {c.id: c for k in cfg.ks for c in p.pools[k]}
    trials, results = {}, []
    by_k: dict[int, list[str]] = {k: [c.id for c in p.pools[k]] for k in cfg.ks}
    for k in cfg.ks:
        phase = _trials(s, p.pools[k], [seed0])
        trials.update(phase)
        results += run_phase(s, p, f"k{k}-r1", phase, asha=True)
    if cfg.explore.second_round:
        for k in cfg.ks:
            new = _second_round(s, p, k, by_k[k], results, set(map(tuple, (candidates[i].layers for i in by_k[k]))))
            candidates.update({c.id: c for c in new})
            by_k[k] += [c.id for c in new]
            phase = _trials(s, new, [seed0])
            trials.update(phase)
            results += run_phase(s, p, f"k{k}-r2", phase, asha=True)
    final_q = _final_quality(results, t.steps)
    picks = {}
    for k in cfg.ks:
        done = [(final_q[trial_key(c, seed0)], i, c) for i, c in enumerate(by_k[k])
                if trial_key(c, seed0) in final_q]
        if not done:
            raise LayercardError(f"no set at k={k} trained to the end (every trial failed?); see "
                                 f"{s.out / EVENTS_FILE}")
        picks[k] = min(done)[2]
    final = _trials(s, [p.reference], cfg.seeds)
    for k in cfg.ks:
        final.update(_trials(s, [candidates[picks[k]]], cfg.seeds[1:]))
    trials.update(final)
    results += run_phase(s, p, "final", final, asha=False)
    candidates[REFERENCE] = p.reference
    rows = explore_rows(s, p, candidates, by_k, picks, results)
    whole = dataclasses.replace(s, candidates=list(candidates.values()), trials=trials, rungs=p.milestones,
                                extra_summary=summary_lines(rows, p))
    summary = write_outputs(whole, results)
    atomic_write_json(s.out / EXPLORE_FILE, rows, indent=2)
    for r in rows:
        for g in r["rung_spearman"]:
            if g["spearman"] is None or g["spearman"] < ex.RUNG_GATE:
                print(f"layercard search: warning: at k={r['k']} rung {g['rung']} (step {g['step']}) ranks the sets "
                      f"trained to the end with Spearman ρ {_rho(g['spearman'])} < {ex.RUNG_GATE}: the schedule is not "
                      f"to be trusted for this task and recipe; {GATE_ADVICE}", file=sys.stderr, flush=True)
    return {**summary, "explore": rows}


def _second_round(s, p, k, ids, results, taken) -> list[Candidate]:
    """Neighbours of the sets trained to the end at k, as many as the remaining step budget allows."""
    cfg, t, e = s.cfg, s.cfg.train_config, s.cfg.explore
    seed0 = cfg.seeds[0]
    spent = _steps_done(results)
    used = sum(spent.get(trial_key(c, seed0), 0) for c in ids)
    left = p.cap_steps[k] - used - (2 * len(cfg.seeds) - 1) * t.steps
    n = ex.plan_pool_size(left, p.milestones, t.steps, e.reduction_factor, cap=e.second_round_max)
    final_q = _final_quality(results, t.steps)
    survivors = [c.layers for c in p.pools[k] if trial_key(c.id, seed0) in final_q]
    sets = ex.neighbour_sets(s.card, survivors, n, taken, budget=cfg.budget, budget_unit=cfg.budget_unit,
                             shift_max=e.shift_max, by_card=e.card_candidates, seed=e.seed + 1)
    proposals = [(st, f"neighbour k={k} r2 #{i + 1}", "neighbour" if e.card_candidates else None,
                  None if e.card_candidates else "random-neighbour") for i, st in enumerate(sets)]
    return ex.make_candidates(s.card, proposals, len(proposals), cfg.budget, cfg.budget_unit, f"k{k}r2")


# --------------------------------------------------------------------------- explore.json
def _mean_sd(v: list[float]) -> tuple[float | None, float | None]:
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def best_fixed_from_table(path: str | Path, task: str, k: int) -> tuple[str | None, float | None]:
    """The fixed strategy (all layers aside) with the best mean gain fraction at (task, k) in a paper-table JSON."""
    rows = json.loads(Path(path).read_text())
    by: dict[str, list[float]] = {}
    for r in rows:
        if r.get("task") == task and r.get("k") == k and r.get("strategy") != "all" and r.get("gain_fraction") is not None:
            by.setdefault(r["strategy"], []).append(float(r["gain_fraction"]))
    if not by:
        return None, None
    name = max(by, key=lambda n: (np.mean(by[n]), n))
    return name, float(np.mean(by[name]))


def _fixed_name(c: Candidate) -> str | None:
    """The fixed-table strategy a pool set stands for: 'card' (the card's pick) or a baseline's name."""
    if "max-quality" in c.objectives:
        return "card"
    return next((st for st in c.strategies if st not in ("stratified", "random-neighbour")), None)


def explore_rows(s, p: ExplorePlan, candidates: dict[str, Candidate], by_k: dict[int, list[str]],
                 picks: dict[int, str], results: list[PhaseResult]) -> list[dict]:
    """One row per k: the pick and its gain fraction over the seeds, the best fixed strategy, the steps
    spent against the fixed table's, the rung gate."""
    cfg, t = s.cfg, s.cfg.train_config
    seed0 = cfg.seeds[0]
    final_q = _final_quality(results, t.steps)
    spent = _steps_done(results)
    reused = _steps_reused(results)
    base_q = [r.metrics.get("initial_quality", r.metrics.get("initial_eval_loss")) for r in results]
    base = float(np.median([b for b in base_q if b is not None]))
    all_q = {seed: final_q[trial_key(REFERENCE, seed)] for seed in cfg.seeds
             if trial_key(REFERENCE, seed) in final_q}
    rungs = {}
    for row in read_rungs(s.out):              # the last attempt's report wins
        rungs.setdefault(row["key"], {})[int(row["step"])] = row["rung_quality"]
    task = cfg.explore.task or Path(str(t.data.path)).stem
    out = []
    for k in cfg.ks:
        pick = candidates[picks[k]]
        q = {seed: final_q[trial_key(pick.id, seed)] for seed in cfg.seeds
             if trial_key(pick.id, seed) in final_q}
        gf = ex.gain_fractions(base, q, all_q)
        gf_seeds = [seed for seed in sorted(q) if seed in all_q and base != all_q[seed]]
        mean, sd = _mean_sd(gf)
        ended = [c for c in by_k[k] if trial_key(c, seed0) in final_q]
        finals = [final_q[trial_key(c, seed0)] for c in ended]
        at = [ex.quality_at_rungs(rungs.get(trial_key(c, seed0), {}), p.milestones) for c in ended]
        rho = ex.rung_spearman(at, finals)
        gate = [{"rung": i + 1, "step": m, "spearman": rho[i] if rho else None, "n_sets": len(ended)}
                for i, m in enumerate(p.milestones)]
        fixed = {}
        for c in by_k[k]:
            name = _fixed_name(candidates[c])
            key = trial_key(c, seed0)
            if name and key in final_q and seed0 in all_q:
                fixed[name] = ex.gain_fractions(base, {seed0: final_q[key]}, {seed0: all_q[seed0]})[0]
        wanted = {"card", *(st for st in cfg.strategies if st != "all")}
        best_name, best_gf, source = None, None, None
        if wanted <= set(fixed):
            best_name = max(fixed, key=lambda n: (fixed[n], n))
            best_gf, source = fixed[best_name], "pool"
        elif cfg.explore.paper_table:
            best_name, best_gf = best_fixed_from_table(cfg.explore.paper_table, task, k)
            source = "paper_table" if best_name else None
        counted = ([trial_key(c, seed0) for c in by_k[k]] + [trial_key(pick.id, seed) for seed in cfg.seeds[1:]]
                   + [trial_key(REFERENCE, seed) for seed in cfg.seeds])
        steps = sum(spent.get(key, 0) for key in counted)
        out.append({
            "task": task, "k": k, "picked_layers": pick.layers, "picked_candidate": pick.id,
            "picked_labels": pick.labels, "gain_fraction_mean": mean, "gain_fraction_sd": sd,
            "gain_fractions": gf, "seeds": gf_seeds, "selection_seed": seed0,
            "gain_fraction_mean_unselected": ex.unselected_mean(gf, gf_seeds, seed0),
            "best_fixed_strategy": best_name, "best_fixed_gain_fraction": best_gf, "best_fixed_source": source,
            "steps": int(steps), "fixed_steps": p.fixed_steps[k], "steps_ratio": steps / p.fixed_steps[k],
            "steps_reused": sum(reused.get(key, 0) for key in counted),
            "rung_spearman": gate, "card_candidates": cfg.explore.card_candidates,
            "pool_size": p.pool_size[k], "n_candidates": len(by_k[k]), "n_trained_to_end": len(ended),
        })
    return out


def _rho(x) -> str:
    return "–" if x is None else f"{x:+.2f}"


def summary_lines(rows: list[dict], p: ExplorePlan) -> list[str]:
    """summary.md's explore section: the picks, the steps against the fixed table, the rung gate."""
    def f(x, spec=".3f"):
        return "–" if x is None else format(x, spec)

    lines = ["", "## Explore", "",
             f"Successive halving (ASHA) on the rung quality at steps {p.milestones}, every survivor of the last rung "
             "trained to the end; the pick is the set with the best final quality on the first seed, then trained "
             "on every seed. Its gain fraction on the first seed is biased upwards (it won there among many); "
             "the column 'other seeds' is the unbiased estimate.", "",
             "| k | pick | gain fraction | other seeds | best fixed | steps (x fixed table) | candidates (to the end) | "
             "rung Spearman ρ |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rho = ", ".join(f"{g['step']}: {_rho(g['spearman'])}" for g in r["rung_spearman"])
        gf = f(r["gain_fraction_mean"]) + (f" ± {f(r['gain_fraction_sd'])}" if r["gain_fraction_sd"] is not None else "")
        best = (f"{r['best_fixed_strategy']} {f(r['best_fixed_gain_fraction'])} ({r['best_fixed_source']})"
                if r["best_fixed_strategy"] else "–")
        lines.append(f"| {r['k']} | {r['picked_layers']} | {gf} | {f(r.get('gain_fraction_mean_unselected'))} | {best} | {r['steps']} of {r['fixed_steps']} "
                     f"({r['steps_ratio']:.2f}) | {r['n_candidates']} ({r['n_trained_to_end']}) | {rho} |")
    low = [(r["k"], g) for r in rows for g in r["rung_spearman"] if g["spearman"] is None or g["spearman"] < ex.RUNG_GATE]
    lines.append("")
    if low:
        lines += [f"Warning: rung gate — at k={k} rung {g['rung']} (step {g['step']}) ranks the sets trained to the "
                  f"end with ρ {_rho(g['spearman'])} < {ex.RUNG_GATE} ({g['n_sets']} sets): early stopping there is "
                  f"not to be trusted for this task and recipe; {GATE_ADVICE}." for k, g in low]
    else:
        lines.append(f"Rung gate passed: every rung ranks the sets trained to the end with ρ ≥ {ex.RUNG_GATE}.")
    for r in rows:
        if r.get("steps_reused"):
            lines.append(f"At k={r['k']}, {r['steps_reused']} of the {r['steps']} steps were replayed from earlier "
                         "searches (config key reuse), not trained again.")
    return lines


# --------------------------------------------------------------------------- entry points
def _save(s: Setup) -> None:
    s.out.mkdir(parents=True, exist_ok=True)
    if "://" not in s.storage:
        private_dir(s.storage)      # resuming unpickles what Tune keeps here: owner-writable only
    save_search(s)


def run_explore(cfg: SearchConfig, out: Path) -> dict:
    s, p = setup_explore(cfg, out)
    s = with_replays(s)
    _save(s)
    n = sum(len(v) for v in p.pools.values())
    print(f"layercard search: explore over {cfg.ks} with {n} candidates (pool sizes {p.pool_size}), rungs at steps "
          f"{p.milestones} -> {out}", flush=True)
    return execute(s, p)


def resume_explore(out: Path, overrides=()) -> dict:
    saved = read_saved_search(out)
    cfg = resumed_config(saved, overrides)
    s, p = setup_explore(cfg, out)
    check_resumed(s, saved, out)
    return execute(with_replays(s), p)


__all__ = ["run_explore", "resume_explore", "plan_explore", "explore_rows", "best_fixed_from_table", "read_rungs"]
