"""Predictor leaderboard: which card score ranks measured layer sets (and single layers) best?

For every task with a measured table (``benchmarks/results/paper_table.json``: every strategy at
k = 3, 5, 8, seed-mean gain fraction) and a card of the same model and data (``--cards DIR`` holds
``DIR/<task>``), every predictor the card can compute scores every measured set. Reported per task:

* within-k Spearman ρ between the predictor and the measured gain fraction at each k, their mean,
  and a permutation p-value of that mean (measured values shuffled within each k, one-sided);
* where ``benchmarks/results/per_layer_<task>.json`` exists (every layer trained alone), the
  Spearman ρ of the predictor's singleton score with the single-layer gain, and two more predictors
  that read those gains: the ``measured`` set model (:mod:`layercard.select.gain_models`: the coverage
  model over the measured single-layer gains) and the best member's single-layer gain. They cost a
  trial per layer, so they are the yardstick of what a per-layer search buys, not a free score;
* with ``--searches`` (finished ``layercard search`` runs, e.g. explore and its ablation), the sets of one
  k trained to the end on the searches' first seed, pooled with the table's rows of that k and seed
  (training is deterministic per seed, so a set in both is one run, checked to agree): Spearman ρ over
  all of them, with its permutation p-value. One seed, but two to three times the sets of a table's k.
  ``--records TASK=FILE`` adds the runs of a run-record file (``layercard export-runs``, the search config
  key ``records``) the same way, so the runs of a search still under way, or of one whose directory is
  gone, count too (its all-layer reference, or else the table's at that seed).

Constants: the ``adam`` and ``coverage`` models use the step budget ρ = Σ lr_t of the task's own
training recipe (from its archived search records) and nothing fitted; the ``newton`` model's
reliability uses the card's median κ. No constant is fitted on any task, so leave-one-task-out
holds trivially; a predictor that ever needs one must fit it on one task and be scored on the rest.

Choosing *which* predictor to use is itself fitted to the tasks it was read off. The leave-one-task-out
rows measure that choice honestly: for each task, the predictor with the best mean within-k ρ on the
other tasks is taken and scored on the held-out one (with its rank there among all predictors).

    python benchmarks/predictors.py --cards runs/cards            # → benchmarks/results/predictors.{json,md}
    python benchmarks/predictors.py --cards runs/cards --tasks headline --update \
        --records headline=benchmarks/results/records/explore_headline.jsonl   # one task again, the rest kept
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KS = (3, 5, 8)


def _sum_of(column: str):
    def score(card, A, layers):
        t = card.layers.set_index("layer")
        return float(t.loc[list(layers), column].sum())
    return score


def _model(name: str):
    def score(card, A, layers):
        from layercard.select.selection import set_quality

        return set_quality(A[name], layers)
    return score


def _shallow(card, A, layers) -> float:
    return -float(np.mean(layers))


PREDICTORS = {
    # card set models (layercard.select.gain_models)
    "adam Q (trust-region sign step)": _model("adam"),
    "coverage Q": _model("coverage"),
    "newton Q (½b̂ᵀK̂⁻¹b̂)": _model("newton"),
    # free predictors: a card column summed over the set, or depth
    "Σ adam_b (ℓ1 rate, probe)": _sum_of("adam_b"),
    "Σ lora_grad_l1": _sum_of("lora_grad_l1"),
    "Σ grad_norm": _sum_of("grad_norm"),
    "Σ res2": _sum_of("res2"),
    "Σ gain_adj": _sum_of("gain_adj"),
    "Σ block_influence": _sum_of("block_influence"),
    "shallowness (−mean layer)": _shallow,
}
FREE = [name for name in PREDICTORS if not name.endswith("Q") and "Q (" not in name]


def _max_measured(card, A, layers) -> float:
    t = card.layers.set_index("layer")
    return float(t.loc[list(layers), "measured_gain"].max())


# predictors that read what a per-layer search measured (every layer trained alone): on a task's board only
# where benchmarks/results/per_layer_<task>.json exists, and with no per-layer column (it would be the data)
MEASURED = {
    "measured Q (coverage of single-layer gains)": _model("measured"),
    "max single-layer gain (measured)": _max_measured,
}


def spearman(x, y) -> float:
    from layercard.select.candidates import spearman as sp

    r = sp(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return float("nan") if r is None else float(r)


def measured_sets(rows: list[dict], task: str) -> dict[int, list[tuple[tuple[int, ...], float]]]:
    """k → [(layers, seed-mean gain fraction)] over the fixed-k strategies (card and baselines)."""
    acc: dict[tuple[int, tuple[int, ...]], list[float]] = {}
    for r in rows:
        if r["task"] != task or r["k"] not in KS or r["strategy"].startswith("min-cost") or r["strategy"] == "all":
            continue
        acc.setdefault((r["k"], tuple(r["layers"])), []).append(r["gain_fraction"])
    out: dict[int, list] = {}
    for (k, layers), v in sorted(acc.items()):
        out.setdefault(k, []).append((layers, float(np.mean(v))))
    return out


def search_sets(search_dirs: list[Path], task: str, rows: list[dict], records: list[Path] = ()
                ) -> tuple[int, int, dict] | None:
    """(k, seed, {layers: gain fraction}) of the sets ``task``'s searches (and the run-record files
    ``records`` of ``task``) trained to the end on their first seed, pooled with the table's rows of that k
    and seed; None when no search or record file is of ``task``. Gain fraction = the set's measured gain over
    the all-layer reference's at the same seed, as in the table."""
    import pandas as pd

    pooled: dict[tuple[int, ...], float] = {}
    k = seed = None
    for d in search_dirs:
        saved = json.loads((d / "search.json").read_text())
        cfg = saved["config"]
        if ((cfg.get("explore") or {}).get("task") or Path(cfg["train"]["data"]["path"]).stem) != task:
            continue
        if len(cfg["ks"]) != 1 or (k is not None and (cfg["ks"][0], cfg["seeds"][0]) != (k, seed)):
            raise SystemExit(f"error: search {d}: pooled searches of '{task}' must share one k and first seed")
        k, seed = cfg["ks"][0], cfg["seeds"][0]
        layers_of = {c["id"]: tuple(sorted(c["layers"])) for c in saved["candidates"]}
        t = pd.read_parquet(d / "trials.parquet")
        t = t[(t.status == "trained") & (t.seed == seed)]
        ref = t[t.candidate == "all"]
        if ref.empty:
            raise SystemExit(f"error: search {d} has no all-layer reference trained on seed {seed}")
        ref_gain = float(ref.measured_gain.iloc[0])
        for r in t.itertuples():
            layers = layers_of.get(r.candidate)
            if layers is not None and len(layers) == k:
                _pool(pooled, layers, float(r.measured_gain) / ref_gain, str(d))
    by_file = {path: record_runs(path) for path in records}
    runs = [r for rs in by_file.values() for r in rs]
    if runs and k is None:          # no search of the task: the (k, seed) most of the records' runs have
        counts: dict[tuple[int, int], int] = {}
        for r in runs:
            if not r["reference"]:
                counts[(len(r["layers"]), r["seed"])] = counts.get((len(r["layers"]), r["seed"]), 0) + 1
        if counts:
            k, seed = max(counts, key=lambda ks: (counts[ks], -ks[0], -ks[1]))
    if k is None:
        return None
    table_ref = next((r for r in rows if r["task"] == task and r["strategy"] == "all" and r.get("seed") == seed), None)
    for path, file_runs in by_file.items():
        mine = [r for r in file_runs if r["seed"] == seed]
        ref = next((r for r in mine if r["reference"]), None)
        if ref is None and table_ref is None:
            raise SystemExit(f"error: {path}: no all-layer reference on seed {seed}, in the file or the table")
        ref_quality = table_ref["quality"] if ref is None else ref["quality"]
        for r in mine:
            if len(r["layers"]) == k:
                gain = (r["base"] - r["quality"]) / (r["base"] - ref_quality)
                _pool(pooled, r["layers"], gain, f"{path} ({r['key']})")
    for r in rows:
        if r["task"] == task and r["k"] == k and r.get("seed") == seed and r["strategy"] != "all":
            _pool(pooled, tuple(sorted(r["layers"])), float(r["gain_fraction"]), "the table")
    return k, seed, pooled


def record_runs(path: Path) -> list[dict]:
    """The runs of a run-record file (``layercard export-runs``) trained to the end: key, seed, layers (the
    last report's ``adapter_layers``), final quality, the base model's quality, whether it is the all-layer
    reference (candidate ``all``)."""
    from layercard.search.reuse import read_records

    out = []
    for run in read_records(path).values():
        last = run.reports[-1]
        cand, _, seed = run.key.rpartition("-s")
        if not run.complete or not seed.isdigit() or last.get("adapter_layers") is None:
            continue
        out.append({"key": run.key, "seed": int(seed), "layers": tuple(sorted(int(l) for l in last["adapter_layers"])),
                    "quality": float(last["quality"]), "base": float(last["initial_quality"]), "reference": cand == "all"})
    return out


def _pool(pooled: dict, layers: tuple[int, ...], gain_fraction: float, source: str) -> None:
    if layers in pooled and abs(pooled[layers] - gain_fraction) > 1e-4:
        raise SystemExit(f"error: set {list(layers)} has gain fraction {gain_fraction:.4f} in {source} but "
                         f"{pooled[layers]:.4f} elsewhere: not the same recipe and seed")
    pooled[layers] = gain_fraction


def within_k(scores: dict[int, np.ndarray], measured: dict[int, np.ndarray], perms: int, seed: int = 0) -> dict:
    """Spearman per k, its mean, and a one-sided permutation p-value of the mean."""
    rho = {k: spearman(scores[k], measured[k]) for k in scores}
    mean = float(np.nanmean(list(rho.values())))
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(perms):
        m = np.nanmean([spearman(scores[k], rng.permutation(measured[k])) for k in scores])
        hits += m >= mean - 1e-12
    return {"per_k": {str(k): v for k, v in rho.items()}, "mean": mean, "p_value": (hits + 1) / (perms + 1)}


def recipe_budget(task: str) -> float:
    """ρ = Σ lr_t of the task's training recipe, from its archived search records (one recipe per task)."""
    from layercard.profile.adam_step import step_budget

    recipes = {json.dumps({k: r["recipe"][k] for k in ("lr", "steps", "warmup_steps")}, sort_keys=True)
               for r in (json.loads(p.read_text()) for p in sorted((RESULTS / "searches" / task).glob("*.json")))}
    if len(recipes) != 1:
        raise SystemExit(f"{task}: archived searches use {len(recipes)} recipes, expected one")
    r = json.loads(recipes.pop())
    return step_budget(r["lr"], r["steps"], r["warmup_steps"])


def task_board(task: str, card_dir: Path, rows: list[dict], perms: int, searches: list[Path] = (),
               records: list[Path] = (), kept_pooled: dict | None = None) -> dict:
    from layercard.card.layer_card import LayerCard
    from layercard.select.selection import arrays_from_card

    card = LayerCard.load(card_dir, with_stats=False)
    rho_budget = recipe_budget(task)
    A = {m: arrays_from_card(card, model=m, step_budget=rho_budget) for m in ("newton", "adam", "coverage")}
    predictors = dict(PREDICTORS)
    per_layer = RESULTS / f"per_layer_{task}.json"
    d = json.loads(per_layer.read_text()) if per_layer.exists() else None
    if d is not None:       # the per-layer search's gains, as its card version holds them
        gain_of = dict(zip(d["layers"], d["measured_gain"]))
        card.layers["measured_gain"] = [gain_of.get(l, np.nan) for l in card.layers["layer"]]
        A["measured"] = arrays_from_card(card, model="measured", step_budget=rho_budget)
        predictors.update(MEASURED)
    sets = measured_sets(rows, task)
    measured = {k: np.array([g for _, g in v]) for k, v in sets.items()}
    board = {"task": task, "card_id": card.card_id, "step_budget": rho_budget,
             "sets_per_k": {str(k): len(v) for k, v in sets.items()}, "sets": {}, "per_layer": None}
    for name, fn in predictors.items():
        scores = {k: np.array([fn(card, A, layers) for layers, _ in v]) for k, v in sets.items()}
        board["sets"][name] = within_k(scores, measured, perms)
    if d is not None:
        gains = np.asarray(d["measured_gain"], dtype=np.float64)
        board["per_layer"] = {name: spearman([fn(card, A, (l,)) for l in d["layers"]], gains)
                              for name, fn in PREDICTORS.items()}
    pooled = search_sets(list(searches), task, rows, list(records))
    board["pooled"] = None
    measured_from = None
    if pooled is None and kept_pooled:     # the measured sets an earlier board pooled, scored again on this card
        pooled = kept_pooled["k"], kept_pooled["seed"], {tuple(ls): float(g) for ls, g in
                                                         zip(kept_pooled["sets"], kept_pooled["gain_fraction"])}
        measured_from = kept_pooled.get("measured_from") or kept_pooled["computed"]
    if pooled is not None:
        k, seed, gf = pooled
        layer_sets = sorted(gf)
        measured_k = {k: np.array([gf[ls] for ls in layer_sets])}
        board["pooled"] = {"k": k, "seed": seed, "n_sets": len(layer_sets), "sets": [list(ls) for ls in layer_sets],
                           "gain_fraction": measured_k[k].tolist(), "predictors": {}}
        if measured_from:
            board["pooled"]["measured_from"] = measured_from
        for name, fn in predictors.items():
            r = within_k({k: np.array([fn(card, A, ls) for ls in layer_sets])}, measured_k, perms)
            board["pooled"]["predictors"][name] = {"rho": r["mean"], "p_value": r["p_value"]}
    return board


def kept_pooled_sets(path: Path, task: str) -> dict | None:
    """The pooled measured sets (k, seed, sets, gain fractions) of ``task``'s board in ``path`` (an earlier
    predictors.json), with the command that measured them; None when it has none. ``--update`` of a task
    given no searches or record files scores these again, so a board keeps its pooled sets after the
    searches that trained them are gone."""
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    for b in kept["tasks"]:
        if b["task"] == task and b.get("pooled"):
            return {**b["pooled"], "computed": b.get("computed") or kept["meta"]}
    return None


def with_kept_boards(boards: list[dict], path: Path) -> list[dict]:
    """``boards`` plus the boards ``path`` (an earlier predictors.json) holds for other tasks, each with the
    command that computed it; sorted by task."""
    if not path.is_file():
        return boards
    kept = json.loads(path.read_text())
    tasks = {b["task"] for b in boards}
    return sorted([*boards, *({**b, "computed": b.get("computed") or kept["meta"]} for b in kept["tasks"]
                              if b["task"] not in tasks)], key=lambda b: b["task"])


def leave_one_task_out(boards: list[dict]) -> list[dict]:
    """Per held-out task: the predictor chosen on the other tasks (best mean of their within-k means),
    its within-k mean on the held-out task, its rank there (1 = best), and the held-out task's own best."""
    rows = []
    for held in boards:
        others = [b for b in boards if b is not held]
        if not others:
            continue
        names = [n for n in held["sets"] if all(n in b["sets"] for b in others)]
        on_others = {n: float(np.nanmean([b["sets"][n]["mean"] for b in others])) for n in names}
        chosen = max(names, key=lambda n: (np.nan_to_num(on_others[n], nan=-9), n))
        held_means = {n: held["sets"][n]["mean"] for n in names}
        ranked = sorted(names, key=lambda n: -np.nan_to_num(held_means[n], nan=-9))
        rows.append({"held_out": held["task"], "chosen_on": [b["task"] for b in others], "chosen": chosen,
                     "chosen_rho_on_others": on_others[chosen], "held_out_rho": held_means[chosen],
                     "held_out_rank": ranked.index(chosen) + 1, "of": len(names),
                     "held_out_best": ranked[0], "held_out_best_rho": held_means[ranked[0]]})
    return rows


def markdown(boards: list[dict], meta: dict, loto: list[dict] | None = None) -> str:
    lines = ["# Predictor leaderboard", "",
             f"`{meta['command']}` at commit {meta['commit']} on {meta['machine']}.", "",
             "Within-k Spearman ρ between a predictor and the measured gain fraction (seed means) of the "
             "fixed-k sets (card and the seven baselines at k = 3, 5, 8), their mean, and the one-sided "
             "permutation p-value of the mean; per layer: ρ with the single-layer gain where every layer "
             "was trained alone. No constant is fitted on any task (ρ = Σ lr_t comes from each task's recipe). "
             "The two `measured` predictors read a per-layer search's single-layer gains (a trial per layer), "
             "so they appear only where one exists.", ""]
    for b in boards:
        lines += [f"## {b['task']} (step budget ρ = {b['step_budget']:.4g}; sets per k: "
                  f"{', '.join(f'{k}: {n}' for k, n in b['sets_per_k'].items())})", ""]
        computed = b.get("computed") or meta
        if computed["command"] != meta["command"]:
            lines += [f"Kept from `{computed['command']}` at commit {computed['commit']}.", ""]
        lines += ["| predictor | k = 3 | k = 5 | k = 8 | mean | p | per layer |", "|---|---|---|---|---|---|---|"]
        order = sorted(b["sets"], key=lambda n: -np.nan_to_num(b["sets"][n]["mean"], nan=-9))
        for name in order:
            s = b["sets"][name]
            pl = (b["per_layer"] or {}).get(name)
            cells = [f"{s['per_k'][str(k)]:+.2f}" if str(k) in s["per_k"] else "–" for k in KS]   # – : not measured
            lines.append(f"| {name} | {' | '.join(cells)} | **{s['mean']:+.2f}** | {s['p_value']:.3f} | "
                         f"{'' if pl is None else f'{pl:+.2f}'} |")
        lines.append("")
        pooled = b.get("pooled")
        if pooled:
            lines += [f"Every set trained to the end at k = {pooled['k']} on seed {pooled['seed']} ({pooled['n_sets']} "
                      "sets: the table's, the searches' and the run records'):", ""]
            if pooled.get("measured_from"):
                m = pooled["measured_from"]
                lines += [f"The sets and their gain fractions as pooled by `{m['command']}` at commit {m['commit']}; "
                          "the scores are this card's.", ""]
            lines += ["| predictor | ρ | p |", "|---|---|---|"]
            pp = pooled["predictors"]
            for name in sorted(pp, key=lambda n: -np.nan_to_num(pp[n]["rho"], nan=-9)):
                lines.append(f"| {name} | **{pp[name]['rho']:+.2f}** | {pp[name]['p_value']:.3f} |")
            lines.append("")
    if loto:
        lines += ["## Leave one task out: the predictor chosen on the other tasks, scored on the held-out one", "",
                  "| held out | chosen on | chosen predictor | ρ there | ρ held out | rank held out | best held out |",
                  "|---|---|---|---|---|---|---|"]
        for r in loto:
            lines.append(f"| {r['held_out']} | {', '.join(r['chosen_on'])} | {r['chosen']} | "
                         f"{r['chosen_rho_on_others']:+.2f} | **{r['held_out_rho']:+.2f}** | {r['held_out_rank']} of "
                         f"{r['of']} | {r['held_out_best']} ({r['held_out_best_rho']:+.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cards", required=True, type=Path, help="directory holding one card per task (DIR/<task>)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks (default: every task of the table with a card)")
    p.add_argument("--table", type=Path, default=RESULTS / "paper_table.json")
    p.add_argument("--perms", type=int, default=2000, help="permutations for the p-values")
    p.add_argument("--out", type=Path, default=RESULTS, help="where predictors.{json,md} go")
    p.add_argument("--searches", type=Path, nargs="*", default=[],
                   help="finished searches whose sets trained to the end are pooled with the table's (per task)")
    p.add_argument("--records", nargs="*", default=[], metavar="TASK=FILE",
                   help="run-record files (layercard export-runs, a search's config key records) of a task: their "
                        "runs trained to the end are pooled like a search's")
    p.add_argument("--update", action="store_true",
                   help="recompute --tasks only; every other task keeps its board from OUT/predictors.json (each "
                        "board records the command and commit that computed it)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.provenance import commit, machine
    from layercard.atomic import atomic_write_text

    records: dict[str, list[Path]] = {}
    for spec in a.records:
        task, _, path = spec.partition("=")
        if not path or not Path(path).is_file() or not path.endswith(".jsonl"):
            print(f"error: --records {spec!r} is not TASK=FILE.jsonl naming a run-record file", file=sys.stderr)
            return 2
        records.setdefault(task, []).append(Path(path))
    rows = json.loads(a.table.read_text())
    tasks = a.tasks or sorted({r["task"] for r in rows if (a.cards / r["task"]).is_dir()})
    if not tasks:
        print(f"error: no card for any task of {a.table} under {a.cards}", file=sys.stderr)
        return 2
    for t in tasks:
        if not (a.cards / t).is_dir():
            print(f"error: no card for task '{t}' at {a.cards / t}", file=sys.stderr)
            return 2
    for d in a.searches:
        if not (d / "search.json").is_file() or not (d / "trials.parquet").is_file():
            print(f"error: --searches {d} is not a finished search (no search.json and trials.parquet)", file=sys.stderr)
            return 2
    meta = {"command": "python benchmarks/predictors.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit(), "machine": machine()}
    kept = {t: kept_pooled_sets(a.out / "predictors.json", t) if a.update else None for t in tasks}
    boards = [{**task_board(t, a.cards / t, rows, a.perms, a.searches, records.get(t, []), kept[t]), "computed": meta}
              for t in tasks]
    if a.update:
        boards = with_kept_boards(boards, a.out / "predictors.json")
    a.out.mkdir(parents=True, exist_ok=True)
    loto = leave_one_task_out(boards)
    atomic_write_text(a.out / "predictors.json", json.dumps({"meta": meta, "tasks": boards, "leave_one_task_out": loto},
                                                            indent=1, default=float))
    md = markdown(boards, meta, loto)
    atomic_write_text(a.out / "predictors.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
