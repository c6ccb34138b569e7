"""Explore against the fixed table, and without the card: ``layercard search mode=explore`` at k = 5.

    python benchmarks/explore_table.py                        # sentiment and headline, k = 5, seeds 0 1 2 (hours)
    python benchmarks/explore_table.py --tasks sentiment      # one task
    python benchmarks/explore_table.py --resume               # continue interrupted searches
    python benchmarks/explore_table.py --smoke --work /tmp/x --results /tmp/x/results   # tiny random model

For each task: its Layer Card (``WORK/TASK/card``, profiled as benchmarks/paper_table.py does, and shared
with it), then two explore searches with the committed recipe (configs/search-smollm2.yaml and the task's
overrides, :mod:`layercard.data.task_recipes`): ``WORK/TASK/explore-k5`` (the card-seeded pool) and
``WORK/TASK/explore-k5-ablation`` (``explore.card_candidates=false``: the same schedule and pool size
without the card's pick and neighbours). A finished search is reused; an interrupted one continues with
``--resume``. The ablation replays the runs it shares with the card-seeded search (config key ``reuse``:
the same layers, seed and recipe report the same numbers), so it costs only the sets and rungs the two do
not share; ``--no-reuse`` trains them again. ``ablation_steps`` still counts every step its schedule
trained, replayed or not (``ablation_steps_reused``: those replayed). Every run both searches report is
kept in a run-record file, ``RESULTS/records/explore_<task>.jsonl`` (``--records``; the search config key
``records``), written when a search finishes or is interrupted, and replayed by both searches when it exists: a search
restarted on another machine, with no WORK left, trains only what no earlier run reported.

Writes ``RESULTS/explore_<task>.json`` (and ``explore_<task>_meta.json``: command, commit, machine, each
search's wall-clock minutes): the search's explore.json rows (one per k) plus
``ablation_gain_fraction`` (``_sd``), ``ablation_steps`` and ``ablation_picked_layers``; ``best_fixed_*``
come from the committed ``RESULTS/paper_table.json`` (same recipe). ``meets_best_fixed``: the pick's mean
gain fraction ≥ the best fixed strategy's − one seed sd (``meets_best_fixed_unselected``: the same on the
seeds the pick was not chosen on, free of the winner's curse); ``card_helps``: the ablation ends at least one
seed sd worse, or spent ≥ 2x the steps; ``pick_proposed_by_card``: the pick is the card's pick or one of its
neighbours (else a gap to the ablation is the halving's doing, not the card's).
Needs ``layercard fetch --prepare sentiment headline`` first (``make fetch``), except with ``--smoke``.
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

TASK_NAMES = ("sentiment", "headline")
SMOKE = {   # the tiny random Qwen3 (4 layers): wiring only, minutes
    "profile": ["data.num_samples=32", "coupling.probe_samples=8", "cost.steps=1"],
    # one shift neighbour, no swaps: 4 layers hold only 6 pairs, and the ablation needs 3 the card does not propose
    "search": ["budget=null", "explore.pool_size=3", "explore.n_shifts=1", "explore.n_swaps=0", "explore.grace_period=2", "explore.reduction_factor=2",
               "train.warmup_steps=0"],
}


def search_config(task: str, card_dir: Path, k: int, seeds: list[int], ablation: bool, args, reuse=(),
                  records: Path | None = None):
    from layercard.config import load_config
    from layercard.search.config import SearchConfig
    from layercard.data.task_recipes import TASKS

    yaml = ROOT / "configs" / ("search-tiny.yaml" if args.smoke else "search-smollm2.yaml")
    recipe = SMOKE["search"] if args.smoke else [*TASKS[task]["train"],
                                                 # one base-model eval per task, shared with the paper table
                                                 f"train.base_eval_cache={card_dir.parent / 'base_eval.json'}"]
    table = Path(args.paper_table)
    overrides = [f"card={card_dir}", "mode=explore", f"ks=[{k}]", f"seeds={json.dumps(seeds)}",
                 f"explore.task={task}", f"explore.card_candidates={'false' if ablation else 'true'}",
                 *([f"explore.paper_table={table.resolve()}"] if table.is_file() else []), *recipe,
                 *([f"reuse={json.dumps([str(r) for r in reuse])}"] if reuse else []),
                 *([f"records={records}"] if records else []), *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    return load_config(SearchConfig, yaml, overrides)


def run_or_resume(cfg, out: Path, resume: bool) -> list[dict]:
    """The explore.json rows of the search in OUT: reused when finished, continued with ``resume`` (with the
    earlier searches ``cfg`` reuses runs of, and its run-record file)."""
    from layercard.search import run as search

    if (out / "explore.json").is_file():
        print(f"== reusing the finished search {out}", flush=True)
    elif (out / search.SEARCH_FILE).is_file():
        if not resume:
            raise SystemExit(f"error: {out} holds an unfinished search; pass --resume to continue it")
        print(f"== resuming {out}", flush=True)
        search.resume_search(out, [*([f"reuse={json.dumps(cfg.reuse)}"] if cfg.reuse else []),
                                   *([f"records={cfg.records}"] if cfg.records else [])])
    else:
        print(f"== explore → {out}", flush=True)
        search.run_search(cfg, out)
    return json.loads((out / "explore.json").read_text())


CARD_LABELS = ("max-quality", "min-cost", "shift", "swap")     # labels of the sets the card proposes to a pool


def merge(rows: list[dict], ablation: list[dict]) -> list[dict]:
    """The explore rows plus the ablation's pick, gain fraction and steps at the same k, and the verdicts."""
    from layercard.search.pool import unselected_mean

    by_k = {r["k"]: r for r in ablation}
    out = []
    for r in rows:
        a = by_k.get(r["k"], {})
        row = {**r, "ablation_gain_fraction": a.get("gain_fraction_mean"),
               "ablation_gain_fraction_sd": a.get("gain_fraction_sd"), "ablation_steps": a.get("steps"),
               "ablation_steps_reused": a.get("steps_reused"),
               "ablation_picked_layers": a.get("picked_layers")}
        sd = r["gain_fraction_sd"] or 0.0
        mean, best = r["gain_fraction_mean"], r["best_fixed_gain_fraction"]
        if "gain_fraction_mean_unselected" not in r:      # rows written before the field existed
            seeds = r.get("seeds") or []
            row["selection_seed"] = seeds[0] if seeds else None
            row["gain_fraction_mean_unselected"] = (unselected_mean(r["gain_fractions"], seeds, seeds[0])
                                                    if seeds and len(seeds) == len(r["gain_fractions"]) else None)
        unselected = row["gain_fraction_mean_unselected"]
        row["within_budget"] = r["steps"] <= 1.1 * r["fixed_steps"]
        row["meets_best_fixed"] = None if mean is None or best is None else bool(mean >= best - sd)
        # the same test on the seeds the pick was not chosen on (its first seed won among many sets)
        row["meets_best_fixed_unselected"] = (None if unselected is None or best is None
                                              else bool(unselected >= best - sd))
        abl = row["ablation_gain_fraction"]
        row["card_helps"] = (None if mean is None or abl is None else
                             bool(abl <= mean - sd or (row["ablation_steps"] or 0) >= 2 * r["steps"]))
        # the card proposed the pick (its pick or a neighbour): when it did not, the pick was in the ablation's
        # pool too (a baseline) or a random set, and a gap to the ablation comes from which sets the halving
        # kept, not from the card's candidates
        row["pick_proposed_by_card"] = any(str(label).startswith(CARD_LABELS) for label in r.get("picked_labels") or [])
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the picks and the reference")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("--work", default=str(ROOT / "runs" / "paper"), help="cards (shared with paper_table.py) "
                   "and searches")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--paper-table", default=str(ROOT / "benchmarks" / "results" / "paper_table.json"),
                   help="the fixed strategies' gain fractions (same recipe)")
    p.add_argument("--resume", action="store_true", help="continue interrupted searches")
    p.add_argument("--no-ablation", action="store_true", help="run only the card-seeded search")
    p.add_argument("--reuse", nargs="+", default=[], metavar="SEARCH",
                   help="earlier searches (same recipe) whose runs both searches replay instead of training")
    p.add_argument("--records", default=None, metavar="FILE",
                   help="run-record file both searches replay and add their runs to (default: "
                        "RESULTS/records/explore_<task>.jsonl)")
    p.add_argument("--no-reuse", action="store_true",
                   help="the ablation trains every trial itself (by default it replays the runs it shares with "
                        "the card-seeded search: the same numbers, deterministic per seed)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny random model of configs/search-tiny.yaml (task 'tiny', k=2, seeds 0 1): wiring only")
    p.add_argument("overrides", nargs="*", help="search config key=value overrides")
    args = p.parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    if args.smoke:
        tasks, k, seeds = ["tiny"], 2, args.seeds[:2]
    else:
        from layercard.data.fetch import verify
        from layercard.data.tasks import prepare_task

        tasks, k, seeds = args.tasks, args.k, args.seeds
        verify(None, ["smollm2", "vader", "news"] if "headline" in tasks else ["smollm2", "vader"])
        for task in tasks:
            prepare_task(task)
    from layercard.search.results import SearchInterrupted

    results.mkdir(parents=True, exist_ok=True)
    try:
        for task in tasks:
            run_task(task, k, seeds, args, work, results, argv)
    except SearchInterrupted as err:
        print(f"explore_table: {err}; continue with the same command and --resume", file=sys.stderr)
        return 3
    return 0


def run_task(task: str, k: int, seeds: list[int], args, work: Path, results: Path, argv) -> None:
    """One task: its card, the explore search and the ablation (reused or resumed), merged and written."""
    from layercard.atomic import atomic_write_text

    started = time.time()
    card_dir = smoke_card(work) if args.smoke else ensure_card(task, work)
    name = f"explore-k{k}"
    records = Path(args.records or results / "records" / f"explore_{task}.jsonl").resolve()
    reuse = [Path(r).resolve() for r in args.reuse]
    rows = run_or_resume(search_config(task, card_dir, k, seeds, False, args, reuse, records), work / task / name,
                         args.resume)
    if not args.no_reuse:
        reuse.append((work / task / name).resolve())
    ablation = [] if args.no_ablation else run_or_resume(
        search_config(task, card_dir, k, seeds, True, args, reuse, records), work / task / f"{name}-ablation", args.resume)
    merged = merge(rows, ablation)
    path = results / f"explore_{task}.json"
    atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
    searches = [work / task / name, *([] if args.no_ablation else [work / task / f"{name}-ablation"])]
    atomic_write_text(results / f"explore_{task}_meta.json", json.dumps({
        "command": "python benchmarks/explore_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit(), "machine": machine(),
        "searches": {str(d): search_minutes(d) for d in searches}}, indent=2) + "\n")
    print(json.dumps(merged, indent=1))
    print(f"== {task}: {path} ({(time.time() - started) / 60:.1f} min)", flush=True)


def search_minutes(out: Path) -> float | None:
    """Wall-clock minutes from a search's first trial start to its last trial end (its trial log)."""
    from layercard.search.events import read_events

    times = [e["time"] for e in read_events(out)] if out.is_dir() else []
    return round((max(times) - min(times)) / 60, 1) if times else None


def ensure_card(task: str, work: Path) -> Path:
    from layercard.data.task_recipes import ensure_card as ensure

    return ensure(task, work, [], ROOT / "configs" / "profile-smollm2.yaml")


def smoke_card(work: Path) -> Path:
    from layercard.config import load_config
    from layercard.profile.config import ProfileConfig
    from layercard.profile.run import run_profile

    card_dir = work / "tiny" / "card"
    if not (card_dir / "card.json").exists():
        run_profile(load_config(ProfileConfig, ROOT / "configs" / "tiny.yaml", SMOKE["profile"]),
                    progress=False).save(card_dir)
    return card_dir


if __name__ == "__main__":
    sys.exit(main())
