"""Does a short run rank layer sets as the full run does? The evidence behind explore's rung schedule.

    python benchmarks/rung_fidelity.py --search runs/paper-label/sentiment/explore-k5 --steps 10 30

Successive halving compares sets on a cheap *fidelity* of the full recipe. Two are measured here, on
every layer set at k whose full-recipe quality on the search's first seed is known (the search's sets
trained to the end, and the committed paper table's rows of the task at k: training is deterministic per
seed, so both are the same runs):

- truncated: the full schedule stopped at step T — the rung quality the search logged at T (what
  ``mode=explore`` compares today);
- compressed: a run of T steps with the recipe's schedule squeezed into them (warm-up scaled by
  T / steps, the lr decayed to 0 at step T), its final quality on the full eval split (new runs, on Ray
  Tune with the search's trial function).

For each: Spearman ρ with the full-recipe quality, over the sets that have both, and the steps it costs.
Writes ``RESULTS/rung_fidelity_<task>.json`` (and ``_meta.json``: command, commit, machine); resumable with
``--resume`` (finished runs are kept under ``--work``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import commit, machine  # noqa: E402


def known_sets(out: Path, saved: dict, k: int, seed: int, paper_table: Path, task: str) -> dict[tuple, dict]:
    """Layer set → {final quality, the search's candidate id (None: paper table only), truncated rung
    qualities by step}. A set in both sources must agree (same recipe, same seed)."""
    import pandas as pd

    from layercard.search.explore import read_rungs

    layers_of = {c["id"]: tuple(sorted(c["layers"])) for c in saved["candidates"]}
    rungs: dict[str, dict[int, float]] = {}
    for row in read_rungs(out):
        rungs.setdefault(row["key"], {})[int(row["step"])] = row["rung_quality"]
    sets: dict[tuple, dict] = {}
    trials = pd.read_parquet(out / "trials.parquet")
    for r in trials.itertuples():
        layers = layers_of.get(r.candidate)
        if r.status != "trained" or r.seed != seed or layers is None or len(layers) != k:
            continue
        sets[layers] = {"final": float(r.quality), "candidate": r.candidate, "truncated": rungs.get(r.trial, {}),
                        "source": "search"}
    if paper_table.is_file():
        for row in json.loads(paper_table.read_text()):
            if row.get("task") != task or row.get("k") != k or row.get("seed") != seed:
                continue
            layers = tuple(sorted(row["layers"]))
            if layers in sets:
                sets[layers]["paper_table_final"] = float(row["quality"])
                continue
            # a set the search stopped early still has its rung qualities up to where it stopped
            cid = next((c for c, ls in layers_of.items() if ls == layers), None)
            sets[layers] = {"final": float(row["quality"]), "candidate": cid, "source": "paper_table",
                            "truncated": rungs.get(f"{cid}-s{seed}", {}) if cid else {}}
    return sets


class FidelityIncomplete(Exception):
    pass


def run_compressed(saved: dict, sets: dict[tuple, dict], steps: int, work: Path, resume: bool,
                   concurrent: int | None = None) -> tuple[dict[tuple, float], float]:
    """Train every set for ``steps`` steps with the recipe's schedule compressed into them: set → final
    quality, and the runs' summed training time in seconds (over every invocation, resumed runs included)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from layercard.card.layer_card import LayerCard
    from layercard.config import from_dict
    from layercard.runtime import connect_ray
    from layercard.search.config import SearchConfig
    from layercard.search.setup import Setup, trial_key, trial_lora
    from layercard.search.trials import TrialLog, settle, trial_base_eval, tune_trainable
    from layercard.train.worker import prepare

    base_cfg = saved["config"]
    train = dict(base_cfg["train"])
    full, warm = int(train["steps"]), int(train.get("warmup_steps") or 0)
    train.update(steps=steps, warmup_steps=max(1, round(warm * steps / full)) if warm else 0)
    out = work / f"compressed-{steps}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = from_dict(SearchConfig, {**base_cfg, "train": train, "mode": "subsets", "resume": False,
                                   "stop_after_trials": None, "name": f"compressed-{steps}",
                                   "storage_path": str((work / "tune").resolve()),
                                   **({"max_concurrent_trials": concurrent} if concurrent else {})})
    card = LayerCard.load(Path(saved["card"]), with_stats=False)
    seed = cfg.seeds[0]
    ids = {layers: f"f{i:02d}" for i, layers in enumerate(sorted(sets))}
    trials = {}
    for layers, cid in ids.items():
        lora, adapter_layers = trial_lora(card, list(layers), cfg)
        trials[trial_key(cid, seed)] = {"candidate": cid, "seed": seed, "layers": adapter_layers, "lora": lora}
    s = Setup(cfg, out, card, [], prepare(cfg.train_config), trials)
    connect_ray(cfg.train_config.address)
    base_eval = trial_base_eval(s)
    trainable = tune_trainable(s, base_eval)
    if resume and tune.Tuner.can_restore(s.experiment):
        tuner = tune.Tuner.restore(s.experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(list(trials))},
                           tune_config=tune.TuneConfig(scheduler=FIFOScheduler(), reuse_actors=False,
                                                       max_concurrent_trials=cfg.max_concurrent_trials),
                           run_config=tune.RunConfig(name=cfg.name, storage_path=s.storage, verbose=0,
                                                     callbacks=[TrialLog(str(out), base_eval, len(trials))]))
    print(f"rung_fidelity: {len(trials)} compressed runs of {steps} steps (warm-up {train['warmup_steps']})",
          flush=True)
    try:
        grid = tuner.fit()
    finally:
        settle()
    quality = {r.config["trial"]: r.metrics.get("quality") for r in grid
               if r.error is None and r.metrics and r.metrics.get("step") == steps}
    if len(quality) < len(trials):      # interrupted (Ctrl+C) or failed: no table from part of the runs
        raise FidelityIncomplete(f"{len(trials) - len(quality)} of {len(trials)} compressed runs of {steps} steps "
                                 f"did not finish; continue with --resume")
    by_id = {cid: layers for layers, cid in ids.items()}
    seconds = sum(float(r.metrics.get("time_total_s") or 0.0) for r in grid if r.error is None and r.metrics)
    return {by_id[key.rsplit("-s", 1)[0]]: q for key, q in quality.items() if q is not None}, seconds


def seed_ceiling(paper_table: Path, task: str, k: int, seed: int) -> list[dict]:
    """The full run on another seed as a fidelity: ρ between ``seed``'s qualities and each other seed's over
    the paper table's sets at k. No short run can rank the sets more like ``seed``'s full runs than this,
    beyond chance: it bounds what a rung gate against one seed can show."""
    from layercard.select.candidates import spearman

    if not paper_table.is_file():
        return []
    by_seed: dict[int, dict[tuple, float]] = {}
    for row in json.loads(paper_table.read_text()):
        if row.get("task") == task and row.get("k") == k:
            by_seed.setdefault(row["seed"], {})[tuple(sorted(row["layers"]))] = float(row["quality"])
    out = []
    for other in sorted(s for s in by_seed if s != seed):
        both = sorted(set(by_seed.get(seed, {})) & set(by_seed[other]))
        if len(both) > 2:
            out.append({"kind": "full run, another seed", "steps": None, "other_seed": other, "n_sets": len(both),
                        "spearman": spearman([by_seed[other][s] for s in both], [by_seed[seed][s] for s in both])})
    return out


def fidelity_rows(sets: dict[tuple, dict], compressed: dict[int, dict[tuple, float]], full_steps: int) -> list[dict]:
    """One row per (kind, steps): ρ with the full-recipe quality over the sets that have both."""
    from layercard.select.candidates import spearman

    rows = []
    truncated_steps = sorted({st for v in sets.values() for st in v["truncated"]})
    for st in truncated_steps:
        pairs = [(v["truncated"][st], v["final"]) for v in sets.values() if st in v["truncated"]]
        rows.append({"kind": "truncated", "steps": st, "n_sets": len(pairs), "spearman": spearman(*zip(*pairs))
                     if len(pairs) > 2 else None, "steps_per_set": st})
    for st, q in sorted(compressed.items()):
        pairs = [(q[layers], v["final"]) for layers, v in sets.items() if layers in q]
        rows.append({"kind": "compressed", "steps": st, "n_sets": len(pairs), "spearman": spearman(*zip(*pairs))
                     if len(pairs) > 2 else None, "steps_per_set": st})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--search", required=True, help="a finished explore search (OUT of layercard search mode=explore)")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 30], help="fidelities: steps of the compressed runs")
    ap.add_argument("--work", default=None, help="where the compressed runs go (default: SEARCH/../rung-fidelity)")
    ap.add_argument("--paper-table", default=str(ROOT / "benchmarks/results/paper_table.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: the search's)")
    args = ap.parse_args(argv)

    from layercard.atomic import atomic_write_text
    from layercard.runtime import run_main
    from layercard.search.run import read_saved_search

    def run(_argv) -> int:
        out = Path(args.search).expanduser().resolve()
        saved = read_saved_search(out)
        ex = saved["config"].get("explore") or {}
        (k,) = saved["config"]["ks"]
        task = ex.get("task") or Path(saved["config"]["train"]["data"]["path"]).stem
        seed = saved["config"]["seeds"][0]
        work = Path(args.work) if args.work else out.parent / f"rung-fidelity-k{k}"
        started = time.time()
        sets = known_sets(out, saved, k, seed, Path(args.paper_table), task)
        runs = {st: run_compressed(saved, sets, st, work, args.resume, args.max_concurrent) for st in args.steps}
        compressed = {st: q for st, (q, _) in runs.items()}
        rows = fidelity_rows(sets, compressed, int(saved["config"]["train"]["steps"]))
        rows += seed_ceiling(Path(args.paper_table), task, k, seed)
        doc = {"task": task, "k": k, "seed": seed, "full_steps": int(saved["config"]["train"]["steps"]),
               "fidelity": rows,
               "sets": [{"layers": list(layers), "source": v["source"], "final": v["final"],
                         "paper_table_final": v.get("paper_table_final"),
                         "truncated": {str(s): q for s, q in sorted(v["truncated"].items())},
                         "compressed": {str(st): compressed[st].get(layers) for st in sorted(compressed)}}
                        for layers, v in sorted(sets.items())]}
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results / f"rung_fidelity_{task}.json", json.dumps(doc, indent=2) + "\n")
        atomic_write_text(results / f"rung_fidelity_{task}_meta.json", json.dumps({
            "command": "python benchmarks/rung_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": commit(), "machine": machine(),
            # wall clock of this invocation only; the compressed runs' own training time counts every invocation
            "minutes_this_invocation": round((time.time() - started) / 60, 1),
            "compressed_trial_minutes": {str(st): round(sec / 60, 1) for st, (_, sec) in sorted(runs.items())}},
            indent=2) + "\n")
        print(f"\n{task}, k = {k}, seed {seed}: Spearman ρ of a fidelity with the {doc['full_steps']}-step quality")
        print("| fidelity | steps | sets | ρ |\n|---|---|---|---|")
        for r in rows:
            rho = "–" if r["spearman"] is None else f"{r['spearman']:+.2f}"
            steps = r["steps"] if r["steps"] is not None else f"{doc['full_steps']} (seed {r['other_seed']})"
            print(f"| {r['kind']} | {steps} | {r['n_sets']} | {rho} |")
        return 0

    try:
        return run_main(run, [])
    except FidelityIncomplete as err:
        print(f"rung_fidelity: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
