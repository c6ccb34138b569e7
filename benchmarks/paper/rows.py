"""A finished search's candidates and trials as table rows: one per strategy, k and seed, with gain
fractions and step-time ratios against the same seed's all-layer run."""
from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.paper.events import shared_fractions
from layercard.data.task_recipes import TASKS
from layercard.search.events import read_events


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
    from layercard.select import selection as sel

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
    shared = shared_fractions(read_events(search_dir))
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
