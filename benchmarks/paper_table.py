"""The paper-style table: card-guided layer sets vs baselines, trained and measured on SmolLM2-135M.

    python benchmarks/paper_table.py                      # both tasks, k ∈ {3, 5, 8}, 3 seeds (hours)
    python benchmarks/paper_table.py --quick              # sentiment, k = 5, 3 seeds, 5 baselines, 60 steps
    python benchmarks/paper_table.py --quick --tasks sentiment headline   # the same for both tasks
    python benchmarks/paper_table.py --tasks sentiment --seeds 0 1 2 --ks 3 5 8
    python benchmarks/paper_table.py --missing            # what the scope lacks beside the finished searches
    python benchmarks/paper_table.py --ks 3 8 --search-name search-k38 "strategies=[top, all]"   # another scope
    python benchmarks/paper_table.py --rebuild            # the table from the finished searches, nothing trains

For each task: profile SmolLM2 on the task's calibration split (a Layer Card; reused when present),
then one ``layercard search`` (into ``WORK/TASK/SEARCH_NAME``) over card-guided sets (max-quality at each k, min-cost at each
target) and every baseline at matching k plus all layers, each trained once per seed with the
same data order across strategies (the seed sets the order). Every number in the table comes from
those runs: nothing here trains or measures on its own. The table merges every finished search of a
task (``--search-name`` runs another scope beside them, e.g. more baselines), provided they share the
card and the training recipe; each search trains its own all-layer reference.

Writes ``benchmarks/results/paper_table.json`` (one row per strategy, k and seed), ``paper_table.md``
(means ± sd over seeds), ``frontier_<task>.png`` and ``searches/TASK/NAME.json``, one record per finished
search: the table merges those records with the searches under ``--work``, so it survives the loss of
``--work`` and grows on another machine (same card source and recipe). Searches and cards stay under
``--work``.
Needs ``layercard fetch --prepare sentiment headline`` first (``make fetch``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layercard.task_recipes import TASKS  # noqa: E402  (the tasks' recipes, shared with the other benchmarks)

LABEL = re.compile(r"^(?P<name>[\w-]+)(?: k=(?P<k>\d+))?(?: target=(?P<target>[\d.]+))?")


def strategy_of(label: str, n_layers: int) -> tuple[str, int] | None:
    """A search candidate label → (table strategy, k): ``max-quality k=5`` → (card, 5),
    ``min-cost target=0.95`` → (min-cost@0.95, |S|), ``top k=5`` → (top, 5), ``all`` → (all, L)."""
    m = LABEL.match(label)
    if not m or " budget=" in label:
        return None
    name = m["name"]
    if name == "max-quality":
        return "card", int(m["k"])
    if name == "min-cost":
        return f"min-cost@{m['target']}", n_layers
    if name == "all":
        return "all", n_layers
    return name, int(m["k"])


def card_predictor(card, rho: float | None = None):
    """layers → a loaded card's predicted gain fraction Q(S)/Q(all layers) under the *current* default
    set model (so a table rebuilt after a model change shows what the code now predicts); ``rho``: the
    recipe's step budget Σ lr_t."""
    from layercard import selection as sel

    arrays = sel.arrays_from_card(card, step_budget=rho)
    full = sel.set_quality(arrays, arrays.layers)
    return lambda layers: sel.set_quality(arrays, layers) / full if full > 0 else None


LEGACY_SCORE = "newton"   # the set model of card-guided rows written before rows named their score


def card_guided(strategy: str) -> bool:
    return strategy == "card" or strategy.startswith("min-cost")


def score_of(row: dict) -> str | None:
    """The set model that picked a card-guided row's layers (None for a baseline)."""
    return (row.get("score") or LEGACY_SCORE) if card_guided(row["strategy"]) else None


def set_key(row: dict) -> tuple:
    """(strategy, score, k): one table set. Card-guided sets of different set models are different sets."""
    return row["strategy"], score_of(row), row["k"]


def paper_rows(task: str, search_dir: Path, predict=None) -> list[dict]:
    """One row per (strategy, k, seed) from a finished search's trials and candidates; the predicted
    gain fraction from ``predict(layers)`` (see :func:`card_predictor`), else as the search recorded it."""
    import pandas as pd

    cands = pd.read_parquet(search_dir / "results.parquet").set_index("candidate")
    trials = pd.read_parquet(search_dir / "trials.parquet")
    trials = trials[trials["status"] == "trained"]
    all_id = next(c for c, r in cands.iterrows() if "all" in list(r["labels"]))
    shared = shared_fractions(_events(search_dir))
    ref = {int(t["seed"]): t for _, t in trials[trials["candidate"] == all_id].iterrows()}
    doc = search_dir / "search.json"
    score = json.loads(doc.read_text()).get("quality_model", LEGACY_SCORE) if doc.is_file() else LEGACY_SCORE
    rows = []
    for _, t in trials.iterrows():
        c = cands.loc[t["candidate"]]
        seed = int(t["seed"])
        if seed not in ref:
            continue
        a = ref[seed]
        layers = [int(x) for x in c["layers"]]
        predicted = predict(layers) if predict is not None else c["predicted_gain_fraction"]
        base, q, q_all = float(t["initial_quality"]), float(t["quality"]), float(a["quality"])
        for label in c["labels"]:
            parsed = strategy_of(label, len(c["layers"]))
            if parsed is None:
                continue
            strategy, k = parsed
            rows.append({
                "task": task, "strategy": strategy, "score": score if card_guided(strategy) else None,
                "k": k if not strategy.startswith("min-cost") else len(c["layers"]),
                "seed": seed, "layers": layers, "quality": q,
                "quality_name": t["quality_name"], "base_quality": base,
                "gain_fraction": (base - q) / (base - q_all) if base != q_all else None,
                "accuracy": float(t["metric"]) if TASKS.get(task, {}).get("accuracy", True)
                and t["metric_name"] in ("accuracy", "label_accuracy") else None,
                "step_time_ratio": float(t["step_seconds"]) / float(a["step_seconds"]),
                "shared_fraction": shared.get(t["trial"]), "reference_shared_fraction": shared.get(a["trial"]),
                "peak_mem_ratio": float(t["peak_memory_bytes"]) / float(a["peak_memory_bytes"]),
                "adapted_layers": len(c["layers"]), "step_seconds": float(t["step_seconds"]),
                "predicted_gain_fraction": None if predicted is None else float(predicted),
            })
    return rows


ARCHIVE = "searches"   # under --results: one record per finished search (search_record)

# train keys that change how a trial is scheduled, checkpointed or cached, not what it learns
SCHEDULING_KEYS = ("cpus_per_worker", "report_every", "checkpoint_every", "max_failures", "base_eval_cache")


def recipe_budget(records: list[dict]) -> float | None:
    """ρ = Σ lr_t of the task's recipe (one per table: :func:`search_records` refuses a mix)."""
    from layercard.adam_step import step_budget

    r = records[0]["recipe"] if records else None
    return step_budget(r["lr"], r["steps"], r["warmup_steps"]) if r else None


# sequence-format keys at the values every sequence had before they existed (no EOS, no template):
# a recipe that sets them so trains on the same tokens as one that does not name them
LEGACY_SEQUENCE_KEYS = {"answer_eos": False, "chat_template": False}


def recipe_of(config: dict) -> dict:
    """A search config's training recipe: its ``train`` section less the scheduling keys, its data
    sections less sequence-format keys at their legacy values."""
    label = config["train"].get("loss") == "label"     # an unset answer_eos is off for the label loss

    def legacy(k, v):
        return k in LEGACY_SEQUENCE_KEYS and (v == LEGACY_SEQUENCE_KEYS[k] or (v is None and (label or k != "answer_eos")))

    def data(d):
        return {k: v for k, v in d.items() if not legacy(k, v)} if isinstance(d, dict) else d

    return {k: data(v) if k in ("data", "eval_data") else v for k, v in config["train"].items()
            if k not in SCHEDULING_KEYS}


def finished_searches(task_dir: Path) -> list[Path]:
    """The task's finished searches under ``task_dir`` (``search``, then ``search-*`` by name); one that
    has not finished (no results.parquet) is left out with a note."""
    dirs = sorted((d for d in task_dir.glob("search*") if (d / "search.json").is_file()),
                  key=lambda d: (d.name != "search", d.name))
    done = [d for d in dirs if (d / "results.parquet").is_file()]
    for d in dirs:
        if d not in done:
            print(f"note: {d} has not finished (no results.parquet); the table leaves it out", flush=True)
    return done


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


# where files were on the machine that profiled: the weights and data hashes already say what they held;
# and keys that change no number the table compares: the data hash covers the tokens answer_eos and
# chat_template shape, coupling.adam only adds the sign-step columns, profile.save_stats says whether
# the statistics are written and ray.fail_once_in is test-only fault injection
LOCATION_KEYS = ("path", "cache_dir", "answer_eos", "chat_template", "adam", "save_stats", "fail_once_in")


def card_source(doc: dict) -> dict:
    """What a search's card was profiled from: the weights and calibration data (content hashes), the
    profile config less the files' locations and the layer count.

    The table needs one source, not one card file: profiling the same source on another CPU gives a card
    equal up to float rounding (another card_id) — :func:`check_sets` then catches any set it would pick
    differently. A search whose card is gone is known by its card_id alone."""
    from layercard.card import LayerCard
    from layercard.store import config_hash

    path = Path(doc.get("card") or "")
    if not (path / "card.json").is_file():
        return {"card_id": doc["card_id"]}
    card = LayerCard.load(path, with_stats=False)
    meta = card.meta

    def content(node):
        return {k: content(v) for k, v in node.items() if k not in LOCATION_KEYS} if isinstance(node, dict) else node

    kind = {"weights_hash_kind": meta["weights_hash_kind"]} if "weights_hash_kind" in meta else {}
    sampled = {"weights_hash_sampled": meta["weights_hash_sampled"]} if "weights_hash_sampled" in meta else {}
    return {"weights_hash": meta.get("weights_hash"), **kind, **sampled, "data_hash": meta.get("data_hash"),
            "config_hash": config_hash(content(meta.get("config") or {})), "n_layers": len(card.layers)}


def comparable_sources(a: dict, b: dict) -> tuple[dict, dict]:
    """Two card sources with weights hashes of one kind. A record without ``weights_hash_kind`` was
    written when the hash sampled each file's first and last MiB; a newer card keeps that fingerprint as
    ``weights_hash_sampled``, so the pair is compared on it — never a whole-file hash against a sampled one."""
    if a.get("weights_hash_kind") == b.get("weights_hash_kind"):
        return a, b

    def sampled(src: dict) -> dict:
        out = {k: v for k, v in src.items() if k not in ("weights_hash_kind", "weights_hash_sampled")}
        if src.get("weights_hash_kind") == "sha256":     # state-dict hashes of random models never changed
            out["weights_hash"] = src.get("weights_hash_sampled")
        return out
    return sampled(a), sampled(b)


def search_record(task: str, search_dir: Path) -> dict:
    """What the table needs of a finished search, in one JSON-able record: its card (id and source), recipe
    and scope, its trial minutes and its rows (:func:`paper_rows`, the predicted gain fraction as the search
    recorded it). Records are archived beside the table (:func:`archive_searches`), so the table outlives
    ``--work``."""
    doc = json.loads((search_dir / "search.json").read_text())
    return {"task": task, "search": search_dir.name, "card_id": doc["card_id"], "card": card_source(doc),
            "recipe": recipe_of(doc["config"]),
            "scope": {k: doc["config"].get(k) for k in SCOPE_KEYS}, "minutes": search_minutes(search_dir),
            "machine": machine(), "rows": paper_rows(task, search_dir)}


def archive_searches(task: str, live: list[dict], archive: Path) -> None:
    """Write the records of the finished searches under ``--work`` (``live``) to ``archive/TASK/NAME.json``
    (whole or not at all: written beside, then renamed)."""
    from layercard.atomic import atomic_write_json

    for rec in live:
        path = archive / task / f"{rec['search']}.json"
        atomic_write_json(path, rec, indent=1)


def first_difference(a: dict, b: dict) -> str | None:
    """The first key (sorted) whose value differs between ``a`` and ``b``, else None."""
    return next((k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)), None)


def search_records(task: str, work: Path, archive: Path, live: list[dict] | None = None) -> list[dict]:
    """Every finished search of the task the table merges: the archived records and the finished searches
    under ``work`` (a live search replaces its archived record), ``search`` first, then by name.

    Every one must come from a card of the same source (:func:`card_source`) and the same training recipe:
    training is deterministic per seed, so their rows compare directly (each search trains its own all-layer
    reference, so ratios stay side by side within one run). A different card source or recipe, or a
    strategy that picked other layers in another search (:func:`check_sets`), is an error naming the search
    and the key. ``live``: the records of the searches under ``work``, when the caller has them."""
    records = {p.name[:-len(".json")]: json.loads(p.read_text()) for p in sorted((archive / task).glob("*.json"))}
    if live is None:
        live = [search_record(task, d) for d in finished_searches(work / task)]
    records.update({rec["search"]: rec for rec in live})
    if not records:
        raise SystemExit(f"error: no finished search of {task} under {work / task} or {archive / task}")
    done = [records[n] for n in sorted(records, key=lambda n: (n != "search", n))]
    first = done[0]
    for rec in done[1:]:
        a, b = comparable_sources(first["card"], rec["card"])
        if (key := first_difference(a, b)) is not None:
            raise SystemExit(f"error: {rec['search']} searched a card with {key}={b.get(key)!r}, "
                             f"{first['search']} one with {a.get(key)!r}: one table needs one card")
        a, b = first["recipe"], rec["recipe"]
        if (key := first_difference(a, b)) is not None:
            raise SystemExit(f"error: {rec['search']} trained with train.{key}={b.get(key)!r}, "
                             f"{first['search']} with {a.get(key)!r}: one table needs one recipe")
    check_sets(done)
    return done


def check_sets(records: list[dict]) -> None:
    """A (strategy, k) must name the same layers in every search: two cards of one source could, in
    principle, pick a near-tie differently, and then their rows are not one strategy."""
    seen: dict[tuple, tuple[list[int], str]] = {}
    for rec in records:
        for r in rec["rows"]:
            key = set_key(r)
            layers, where = seen.setdefault(key, (r["layers"], rec["search"]))
            if layers != r["layers"]:
                what = key[0] if key[1] in (None, LEGACY_SCORE) else f"{key[0]} ({key[1]})"
                raise SystemExit(f"error: {what} k={key[2]} is layers {r['layers']} in {rec['search']} but "
                                 f"{layers} in {where}: one table needs one set per strategy")


def table_tasks(work: Path, archive: Path, requested: list[str]) -> list[str]:
    """The tasks the written table covers: the requested ones and every other task with a finished search
    under ``work`` or an archived one, so running one task's scope does not drop the other's rows from
    ``benchmarks/results``."""
    def has_table(task: str) -> bool:
        return (any((s / "results.parquet").is_file() for s in (work / task).glob("search*"))
                or any((archive / task).glob("*.json")))

    return [t for t in TASKS if t in requested or has_table(t)]


def merged_rows(records: list[dict], predict=None) -> list[dict]:
    """The rows of every search record (:func:`search_records`), each tagged with its search, the predicted
    gain fraction from ``predict(layers)`` where given. A (strategy, k, seed) found in more than one search
    is the same deterministic training run again: the first is kept, unless a later one measured its
    step-time ratio like with like (:func:`uneven_sharing`) and the first did not."""
    rows, at = [], {}
    for rec in records:
        for r in rec["rows"]:
            key, r = (*set_key(r), r["seed"]), {**r, "score": score_of(r), "search": rec["search"]}
            if predict is not None:
                r["predicted_gain_fraction"] = predict(r["layers"])
            if key not in at:
                at[key] = len(rows)
                rows.append(r)
            elif uneven_sharing(rows[at[key]]) and not uneven_sharing(r):
                rows[at[key]] = r
    return rows


def _events(search_dir: Path) -> list[dict]:
    from pipelines.search import read_events   # here, not at the top: it imports Ray Tune

    return read_events(search_dir)


def shared_fractions(events: list[dict]) -> dict[str, float]:
    """trial key → the fraction of its run (its last start to its end) during which another trial ran.

    Trials share the machine, so a step-time ratio compares like with like only when the trial and its
    all-layer reference shared it alike; the table marks those that did not."""
    span: dict[str, list[float]] = {}
    for e in sorted(events, key=lambda e: e["time"]):
        if e["event"] == "start":
            span[e["key"]] = [e["time"], np.inf]
        elif e["key"] in span and span[e["key"]][1] == np.inf:
            span[e["key"]][1] = e["time"]
    end = max((e["time"] for e in events), default=0.0)
    span = {k: (a, b if b != np.inf else end) for k, (a, b) in span.items()}
    out = {}
    for key, (a, b) in span.items():
        cuts = sorted({a, b} | {t for k, (c, d) in span.items() if k != key for t in (c, d) if a < t < b})
        shared = sum(hi - lo for lo, hi in zip(cuts, cuts[1:])
                     if any(c < hi and d > lo for k, (c, d) in span.items() if k != key))
        out[key] = shared / (b - a) if b > a else 0.0
    return out


def search_minutes(search_dir: Path) -> float | None:
    """Wall time of a search's trials (first start to last completion in trial_events.jsonl), so a
    table rebuilt from finished searches still says how long they took."""
    times = [e["time"] for e in _events(search_dir)]
    return (max(times) - min(times)) / 60 if times else None


def _mean_sd(values) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


UNEVEN = 0.5   # a trial and its reference whose shared fractions differ by more: their step-time ratio is biased


def uneven_sharing(row: dict) -> bool:
    a, b = row.get("shared_fraction"), row.get("reference_shared_fraction")
    return a is not None and b is not None and abs(a - b) > UNEVEN


def grouped(rows: list[dict]) -> list[dict]:
    """Means and sds over seeds per (task, strategy, k), in a stable order."""
    order = ["card", "min-cost", "top", "bottom", "mid", "uniform", "random", "grad-norm", "block-influence", "all"]
    keys = sorted({(r["task"], *set_key(r)) for r in rows},
                  key=lambda x: (x[0], order.index(x[1].split("@")[0]) if x[1].split("@")[0] in order else 99,
                                 x[1], x[2] or "", x[3]))
    out = []
    for task, strategy, score, k in keys:
        rs = [r for r in rows if (r["task"], *set_key(r)) == (task, strategy, score, k)]
        g = {"task": task, "strategy": strategy, "score": score, "k": k, "n_seeds": len(rs), "layers": rs[0]["layers"],
             "quality_name": rs[0]["quality_name"]}
        for col in ("quality", "gain_fraction", "accuracy", "peak_mem_ratio", "predicted_gain_fraction",
                    "base_quality"):
            g[col], g[f"{col}_sd"] = _mean_sd(r[col] for r in rs)
        # step-time ratios over the seeds whose trial and reference shared the machine alike, if any did
        even = [r for r in rs if not uneven_sharing(r)]
        g["uneven_sharing"] = not even
        g["step_time_ratio"], g["step_time_ratio_sd"] = _mean_sd(r["step_time_ratio"] for r in (even or rs))
        g["n_even_seeds"] = len(even)
        out.append(g)
    return out


LOW = 2   # a set that adapts a layer at or below this index reaches the first blocks (see prediction_agreement)


RIVALS = ("grad_norm", "gain_adj", "res2")   # card columns whose plain sum over a set is a free predictor


def card_rivals(card) -> dict:
    """name → layers → the plain sum of a loaded card's column over the set (no coupling, no cost): the
    free predictors the card's set prediction should beat (see :func:`prediction_agreement`)."""
    cols = card.layers.set_index("layer")
    return {f"Σ {c}": (lambda layers, v=cols[c]: float(v.loc[list(layers)].sum())) for c in RIVALS if c in cols}


def prediction_agreement(groups: list[dict], rivals: dict | None = None) -> dict:
    """How the card's predicted gain fractions agree with the measured ones (seed means) over one task's
    sets other than all layers: Spearman ρ over every set and within each k holding ≥ 3 sets, and how many
    sets trained better than predicted — among all of them and among those adapting a layer ≤ ``LOW``.
    ``rivals`` (name → layers → score, e.g. :func:`card_rivals`): the same ρ over every set for each."""
    from layercard.candidates import spearman

    sets = [g for g in groups if g["strategy"] != "all" and g["gain_fraction"] is not None
            and g["predicted_gain_fraction"] is not None]

    def rho(gs, score=lambda g: g["predicted_gain_fraction"]):
        return {"spearman": spearman([score(g) for g in gs], [g["gain_fraction"] for g in gs]), "n_sets": len(gs)}

    def above(gs):
        return {"n_above": sum(g["gain_fraction"] > g["predicted_gain_fraction"] for g in gs), "n_sets": len(gs)}

    by_k = {k: [g for g in sets if g["k"] == k] for k in sorted({g["k"] for g in sets})}
    return {"all": rho(sets), "by_k": {k: rho(gs) for k, gs in by_k.items() if len(gs) >= 3},
            "above_prediction": above(sets),
            "above_prediction_low": above([g for g in sets if min(g["layers"]) <= LOW]),
            "rivals": {name: rho(sets, lambda g, f=f: f(g["layers"])) for name, f in (rivals or {}).items()}}


def agreement_line(a: dict) -> str:
    def r(x):
        return "–" if x["spearman"] is None else f"{x['spearman']:+.2f}"

    by_k = ", ".join(f"k = {k}: {r(x)} ({x['n_sets']})" for k, x in a["by_k"].items())
    up, low = a["above_prediction"], a["above_prediction_low"]
    return (f"Predicted vs measured gain fraction (seed means, sets other than all layers): Spearman ρ {r(a['all'])} "
            f"over {a['all']['n_sets']} sets" + (f"; within one k: {by_k}" if by_k else "") + ". "
            f"{up['n_above']} of {up['n_sets']} sets trained better than predicted; of the {low['n_sets']} that adapt "
            f"a layer ≤ {LOW}, {low['n_above']}."
            + (" Free predictors (a card column summed over the set, no coupling), ρ over the same sets: "
               + ", ".join(f"{name} {r(x)}" for name, x in a["rivals"].items()) + "." if a.get("rivals") else ""))


def _fmt(mean, sd, spec=".3f") -> str:
    if mean is None:
        return "–"
    return f"{mean:{spec}}" + (f" ± {sd:{spec}}" if sd is not None else "")


def markdown(rows: list[dict], meta: dict) -> str:
    when = "rebuilt from the finished searches" if meta.get("rebuild") else f"{meta['runtime_min']:.0f} min this run"
    lines = [f"# Paper table ({meta['machine']}, {when})", ""]
    for task in sorted({r["task"] for r in rows}):
        g = [r for r in grouped(rows) if r["task"] == task]
        qname = g[0]["quality_name"].replace("_", " ")
        seed_spread = next((r["quality_sd"] for r in g if r["strategy"] == "all"), None)
        trained = meta.get("search_minutes", {}).get(task)
        lines += [f"## {task} (quality = {qname}, lower is better; base model {_fmt(g[0]['base_quality'], None, '.4f')}; "
                  f"all-layer seed sd {_fmt(seed_spread, None, '.4f') if seed_spread is not None else '–'}"
                  + (f"; trials took {trained:.0f} min" if trained is not None else "")
                  + (f" in {n} searches" if (n := len(meta.get("searches", {}).get(task, []))) > 1 else "")
                  + (f" ({u} of them untimed)" if (u := len(meta.get("untimed_searches", {}).get(task, []))) else "")
                  + ")", "",
                  "| strategy | k | layers | quality | gain fraction | predicted gain fraction | accuracy | "
                  "step-time ratio | peak-mem ratio | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in g:
            name = r["strategy"] if r.get("score") is None else f"{r['strategy']} ({r['score']})"
            lines.append(f"| {name} | {r['k']} | {r['layers']} | {_fmt(r['quality'], r['quality_sd'], '.4f')} | "
                         f"{_fmt(r['gain_fraction'], r['gain_fraction_sd'])} | {_fmt(r['predicted_gain_fraction'], None)} | "
                         f"{_fmt(r['accuracy'], r['accuracy_sd'])} | "
                         f"{_fmt(r['step_time_ratio'], r['step_time_ratio_sd'], '.2f')}{' †' * r['uneven_sharing']} | "
                         f"{_fmt(r['peak_mem_ratio'], r['peak_mem_ratio_sd'], '.2f')} | {r['n_seeds']} |")
        if any(r["uneven_sharing"] for r in g):
            lines += ["", f"† in every seed, the trial and its all-layer reference did not share the machine "
                          f"alike (their fractions of time beside another trial differ by more than {UNEVEN}): one "
                          "ran mostly alone, so this step-time ratio is biased (low if the trial ran alone, high if "
                          "the reference did). Elsewhere the ratio averages only the seeds that shared alike."]
        agreement = meta.get("prediction_agreement", {}).get(task) or prediction_agreement(g)
        lines += ["", agreement_line(agreement), ""]
    return "\n".join(lines)


def plot_frontier(rows: list[dict], task: str, path: Path) -> None:
    """Gain fraction vs step-time ratio, every strategy (± sd over seeds), the measured Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layercard.candidates import pareto_mask

    g = [r for r in grouped(rows) if r["task"] == task and r["gain_fraction"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"card": ("*", "tab:red", 220), "min-cost": ("P", "tab:purple", 120), "all": ("s", "black", 90)}
    for r in g:
        base = r["strategy"].split("@")[0]
        m, color, size = markers.get(base, ("o", "tab:gray", 50))
        ax.errorbar(r["step_time_ratio"], r["gain_fraction"], yerr=r["gain_fraction_sd"] or 0, fmt="none",
                    ecolor=color, alpha=0.5)
        ax.scatter(r["step_time_ratio"], r["gain_fraction"], marker=m, color=color, s=size, zorder=3)
        ax.annotate(f"{r['strategy']} k={r['k']}", (r["step_time_ratio"], r["gain_fraction"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    x = np.array([r["step_time_ratio"] for r in g])
    y = np.array([r["gain_fraction"] for r in g])
    front = pareto_mask(x, y)
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "--o", color="tab:red", alpha=0.6, markersize=16, markerfacecolor="none",
            label="measured Pareto front")   # circled points: visible even when one set dominates all others
    ax.set_xlabel("step-time ratio vs all layers (lower is cheaper)")
    ax.set_ylabel("gain fraction (1 = all layers)")
    ax.set_title(f"{task}: measured quality vs cost (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_card(task: str, work: Path, extra: list[str]) -> Path:
    from layercard.task_recipes import ensure_card as ensure

    return ensure(task, work, extra, ROOT / "configs" / "profile-smollm2.yaml")


SCOPE_KEYS = ("mode", "ks", "targets", "strategies", "random_seeds", "seeds", "budget", "budget_fractions")


def scope_of(config: dict) -> dict:
    """What a search trains: its candidates' scope and its recipe (scheduling keys aside)."""
    return {**{k: config.get(k) for k in SCOPE_KEYS},
            "train": recipe_of(config)}


def search_config(task: str, card_dir: Path, args):
    """The SearchConfig of this scope: configs/search-smollm2.yaml + the task's and the command's overrides."""
    from layercard.config import load_config
    from layercard.search_config import SearchConfig

    # one base-model eval per task, shared by its searches (the file is keyed by weights, eval data, batching)
    overrides = [f"card={card_dir}", f"ks={json.dumps(args.ks)}", f"targets={json.dumps(args.targets)}",
                 f"seeds={json.dumps(args.seeds)}", f"train.base_eval_cache={Path(card_dir).parent / 'base_eval.json'}",
                 *TASKS[task]["train"], *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    return load_config(SearchConfig, ROOT / "configs" / "search-smollm2.yaml", overrides)


def missing_rows(card_dir: Path, cfg, rows: list[dict]) -> tuple[dict[tuple, list[int]], int]:
    """((strategy, score, k) → the seeds this scope asks for that no finished search has trained yet, rows the scope asks for)."""
    from layercard.candidates import build_candidates
    from layercard.card import LayerCard

    from layercard.adam_step import step_budget
    from layercard.selection import resolve_model

    card = LayerCard.load(card_dir, with_stats=False)
    have = {(r["strategy"], score_of(r), r["k"], r["seed"]) for r in rows}
    score = resolve_model(card, cfg.model)
    t = cfg.train_config
    out: dict[tuple[str, int], list[int]] = {}
    wanted = set()
    for c in build_candidates(card, ks=cfg.ks, targets=cfg.targets, strategies=cfg.strategies,
                              random_seeds=cfg.random_seeds, budget_fractions=cfg.budget_fractions,
                              model=cfg.model, step_budget=step_budget(t.lr, t.steps, t.warmup_steps)):
        for label in c.labels:
            parsed = strategy_of(label, len(c.layers))
            if parsed is None:
                continue
            strategy, k = parsed
            k = len(c.layers) if strategy.startswith("min-cost") else k
            key = (strategy, score if card_guided(strategy) else None, k)
            wanted |= {(*key, seed) for seed in cfg.seeds}
            seeds = [seed for seed in cfg.seeds if (*key, seed) not in have]
            if seeds:
                out[key] = seeds
    return out, len(wanted)


def run_search(task: str, card_dir: Path, work: Path, args) -> Path:
    """Run (or resume) this scope's search in WORK/TASK/SEARCH_NAME; a finished one there is reused
    only if it ran the same scope, else the error says to pick another ``--search-name``."""
    from pipelines import search

    out = work / task / args.search_name
    cfg = search_config(task, card_dir, args)
    if (out / search.SEARCH_FILE).exists():
        saved = scope_of(json.loads((out / search.SEARCH_FILE).read_text())["config"])
        wanted = scope_of(cfg.to_dict())
        diff = [k for k in wanted if wanted[k] != saved[k]]
        if diff:
            raise SystemExit(f"error: {out} holds a search of another scope ({diff[0]}: {saved[diff[0]]!r}, asked "
                             f"{wanted[diff[0]]!r}); pass --search-name NEW to run this scope beside it")
        if not (out / "results.parquet").exists():
            search.resume(out)
        return out
    print(f"== {task}: search ({len(args.ks)} ks, {len(args.seeds)} seeds) → {out}", flush=True)
    search.run(cfg, out)
    return out


def print_missing(args) -> int:
    """What this scope still lacks per task (nothing trains or profiles)."""
    for task in args.tasks:
        task_dir = Path(args.work) / task
        if not (task_dir / "card" / "card.json").is_file():
            print(f"{task}: no card under {task_dir} yet: everything (profile first)")
            continue
        cfg = search_config(task, task_dir / "card", args)
        archive = Path(args.results) / ARCHIVE
        rows = merged_rows(search_records(task, Path(args.work), archive)) if task in table_tasks(
            Path(args.work), archive, []) else []
        lacking, wanted = missing_rows(task_dir / "card", cfg, rows)
        print(f"{task}: {sum(len(v) for v in lacking.values())} of {wanted} rows missing")
        for (strategy, score, k), seeds in lacking.items():
            print(f"  {strategy}{f' ({score})' if score else ''} k={k}: seeds {seeds}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS),
                   help="the tasks to train; default: sentiment and headline (sentiment only with --quick). The written table "
                        "covers every task with a finished search")
    p.add_argument("--ks", nargs="+", type=int, default=[3, 5, 8])
    p.add_argument("--targets", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the search config's)")
    p.add_argument("--quick", action="store_true",
                   help="k=5, target 0.95, seeds 0 1 2, baselines top/bottom/mid/uniform/all (sentiment unless "
                        "--tasks says otherwise), "
                        "the search config's steps and eval items")
    p.add_argument("--work", default=str(ROOT / "runs" / "paper"), help="cards and searches (reused when present)")
    p.add_argument("--search-name", default="search",
                   help="the search's directory under WORK/TASK: a new name runs another scope beside the finished "
                        "ones (the table merges every finished search of the task)")
    p.add_argument("--missing", action="store_true",
                   help="train nothing: list the (strategy, k, seeds) of this scope that no finished search "
                        "holds yet")
    p.add_argument("--rebuild", action="store_true",
                   help="train nothing: write the table from the finished searches (archived under "
                        "RESULTS/searches and under --work)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                   help="where the table goes; RESULTS/searches/TASK/NAME.json keeps every finished search's "
                        "record, so the table can grow on another machine")
    p.add_argument("--profile-override", dest="profile_overrides", action="append", default=[])
    p.add_argument("overrides", nargs="*", help="search config key=value overrides")
    args = p.parse_args(argv)
    args.tasks = args.tasks if args.tasks or args.quick else ["sentiment", "headline"]
    if args.quick:
        args.tasks = args.tasks or ["sentiment"]
        args.ks, args.targets, args.seeds = [5], [0.95], [0, 1, 2]
        args.overrides = ["strategies=[top, bottom, mid, uniform, all]", *args.overrides]
    if args.missing:
        return print_missing(args)
    if not args.rebuild:
        from layercard.fetch import verify
        from layercard.tasks import prepare_task

        verify(None, ["smollm2", "vader", "news"] if "headline" in args.tasks else ["smollm2", "vader"])
        for task in args.tasks:
            prepare_task(task)
    started = time.time()
    work = Path(args.work)
    if not args.rebuild:
        for task in args.tasks:
            run_search(task, ensure_card(task, work, args.profile_overrides), work, args)
    from layercard.card import LayerCard

    results = Path(args.results)
    archive = results / ARCHIVE
    tasks = table_tasks(work, archive, args.tasks)
    rows, minutes, names, untimed, agreement = [], {}, {}, {}, {}
    for task in tasks:
        live = [search_record(task, d) for d in finished_searches(work / task)]
        records = search_records(task, work, archive, live)
        card_dir = work / task / "card"
        card = LayerCard.load(card_dir, with_stats=False) if (card_dir / "card.json").is_file() else None
        if card is None:
            print(f"note: no card under {card_dir}: predicted gain fractions as each search recorded them", flush=True)
        task_rows = merged_rows(records, card_predictor(card, recipe_budget(records)) if card else None)
        rows += task_rows
        agreement[task] = prediction_agreement(grouped(task_rows), card_rivals(card) if card else None)
        minutes[task] = sum(r["minutes"] or 0.0 for r in records)
        names[task] = [r["search"] for r in records]
        untimed[task] = [r["search"] for r in records if r["minutes"] is None]
        archive_searches(task, live, archive)
    meta = {"machine": machine(), "runtime_min": (time.time() - started) / 60, "tasks": tasks,
            "trained": [] if args.rebuild else args.tasks, "ks": args.ks, "seeds": args.seeds,
            "targets": args.targets, "quick": args.quick, "rebuild": args.rebuild,
            "search_minutes": minutes, "searches": names, "untimed_searches": untimed,
            "prediction_agreement": agreement}
    results.mkdir(parents=True, exist_ok=True)
    (results / "paper_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / "paper_table_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    text = markdown(rows, meta)
    (results / "paper_table.md").write_text(text)
    for task in tasks:
        plot_frontier(rows, task, results / f"frontier_{task}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
