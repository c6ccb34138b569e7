"""What a finished search leaves in OUT: results.parquet, trials.parquet, frontier.png, summary.md and
card/ (a new card version with the measured columns and frontier.parquet), published to the store when set."""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
from pathlib import Path

import numpy as np

from layercard.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from layercard.card.layer_card import LayerCard
from layercard.card.store import CardStore
from layercard.search.plots import write_frontier_png
from layercard.search.results import STATUSES, candidate_rows, rows_frame, trial_rows_of
from layercard.search.setup import Setup
from layercard.select.candidates import per_layer_correlations

_UNIT_WORDS = {"flops": "FLOPs/token", "seconds": "s/step"}


def _fmt(x, spec: str = ".4g") -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def summary_markdown(s: Setup, rows: list[dict], per_layer: dict | None, card_dir: Path) -> str:
    cfg, t = s.cfg, s.cfg.train_config
    unit = _UNIT_WORDS[cfg.budget_unit]
    counts = {st: sum(r["status"] == st for r in rows) for st in STATUSES}
    quality = next((r["quality_name"] for r in rows if r.get("quality_name")), "eval_loss").replace("_", " ")
    lines = [f"# Layer-subset search ({cfg.mode})", "",
             f"- card: `{cfg.card}` ({s.card.card_id}), model `{s.plan.model_id}` (weights {s.plan.weights_hash})",
             f"- budget: {_fmt(cfg.budget)} {unit}" if cfg.budget is not None else "- budget: none",
             f"- training: {t.steps} steps x batch {t.batch_size} x {t.num_workers} worker(s), ZeRO-{t.zero_stage}, "
             f"lr {t.lr:g}, seeds {cfg.seeds}; ASHA {'on' if cfg.use_asha else 'off'}",
             f"- candidates: {len(rows)} — " + ", ".join(f"{n} {st}" for st, n in counts.items() if n),
             f"- new card version: `{card_dir}`", "",
             f"| id | layers | proposed by | pred. gain (frac.) | pred. cost ({unit}) | status | {quality} | "
             "measured gain | s/step | peak MB | front |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        lines.append(f"| {r['candidate']} | {r['layers']} | {'; '.join(r['labels'])} | "
                     f"{_fmt(r['predicted_gain_fraction'], '.1%')} | {_fmt(r['predicted_cost'])} | {r['status']} | "
                     f"{_fmt(r['quality'])} | {_fmt(r['measured_gain'])} | {_fmt(r['step_seconds'], '.3g')} | "
                     f"{_fmt(peak, '.0f')} | {'★' if r['on_measured_front'] else ''} |")
    trained = [r for r in rows if r["status"] == "trained" and r["quality"] is not None]
    if trained:
        best = min(trained, key=lambda r: r["quality"])
        name = (best["quality_name"] or "eval_loss").replace("_", " ")
        lines += ["", f"Best measured {name}: {best['candidate']} {best['layers']} ({'; '.join(best['labels'])}) "
                      f"at {_fmt(best['quality'])}."]
    if per_layer:
        rho = per_layer["spearman"]
        verdict = {True: "beats both free predictors", False: "does not beat the free predictors",
                   None: "cannot be judged (too few layers or no spread)"}[per_layer["beats_free_predictors"]]
        lines += ["", "## Per-layer: does the card rank layers by their measured gain?", "",
                  "| predictor | Spearman ρ with measured gain |", "|---|---|",
                  f"| card's predicted gain Q({{ℓ}}) | {_fmt(rho['predicted_gain'], '.3f')} |",
                  f"| raw res2 | {_fmt(rho['res2'], '.3f')} |",
                  f"| layer depth | {_fmt(rho['depth'], '.3f')} |", "",
                  f"Over {per_layer['n_layers']} layers the card's prediction {verdict}."]
    lines += s.extra_summary or []
    return "\n".join(lines) + "\n"


def per_layer_measurements(s: Setup, rows: list[dict]) -> tuple[dict[int, dict], dict | None]:
    """Measurements of every layer trained alone, and (per-layer mode) the Spearman comparison."""
    single = {r["layers"][0]: r for r in rows if r["k"] == 1 and r["status"] == "trained"}
    if s.cfg.mode != "per-layer":
        return single, None
    t = s.card.layers
    ids = s.card.layer_ids
    pred = {r["layers"][0]: r["predicted_gain"] for r in rows if r["k"] == 1}
    nan = float("nan")
    corr = per_layer_correlations(
        ids, [pred.get(l, nan) for l in ids], t["res2"].to_numpy(np.float64),
        [single[l]["measured_gain"] if l in single and single[l]["measured_gain"] is not None else nan for l in ids])
    return single, corr


def write_card_version(s: Setup, rows: list[dict], single: dict[int, dict], per_layer: dict | None) -> Path:
    """OUT/card: the input card plus measured columns and frontier.parquet, written atomically."""
    import pandas as pd

    card = LayerCard.load(Path(s.cfg.card).expanduser(), with_stats=False)
    nan = float("nan")
    col = lambda key: [(single[l][key] if l in single and single[l][key] is not None else nan)  # noqa: E731
                       for l in card.layer_ids]
    card.layers["measured_eval_loss"] = col("eval_loss")
    card.layers["measured_quality"] = col("quality")
    card.layers["measured_gain"] = col("measured_gain")
    card.layers["measured_step_seconds"] = col("step_seconds")
    front = pd.DataFrame([{k: r[k] for k in ("candidate", "layers", "labels", "k", "predicted_gain", "predicted_cost",
                                             "eval_loss", "quality", "measured_gain", "metric", "step_seconds",
                                             "peak_memory_bytes", "on_measured_front")}
                          for r in rows if r["status"] == "trained"],
                         columns=["candidate", "layers", "labels", "k", "predicted_gain", "predicted_cost", "eval_loss",
                                  "quality", "measured_gain", "metric", "step_seconds", "peak_memory_bytes", "on_measured_front"])
    buf = io.BytesIO()
    front.to_parquet(buf, index=False)
    frontier = buf.getvalue()
    t = s.cfg.train_config
    card.meta = {k: v for k, v in card.meta.items() if k not in ("files", "card_id", "created_at")}
    card.meta["parent_card_id"] = s.card.card_id
    card.meta["search"] = {
        "mode": s.cfg.mode, "budget": s.cfg.budget, "budget_unit": s.cfg.budget_unit, "steps": t.steps,
        "batch_size": t.batch_size, "lr": t.lr, "seeds": s.cfg.seeds, "zero_stage": t.zero_stage,
        "measured_columns": ["measured_eval_loss", "measured_quality", "measured_gain", "measured_step_seconds"],
        "quality": next((r["quality_name"] for r in rows if r.get("quality_name")), "eval_loss"),
        "frontier_file": "frontier.parquet", "frontier_sha256": hashlib.sha256(frontier).hexdigest(),
        "measured_front": [r["candidate"] for r in rows if r["on_measured_front"]],
        "per_layer": per_layer,
    }
    card.meta["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    final = s.out / "card"
    with atomic_dir(final, replace=True) as stage:     # the previous OUT/card stays until this one is whole
        card.save(stage, overwrite=True)
        (stage / "frontier.parquet").write_bytes(frontier)
    return final


def write_outputs(s: Setup, grid) -> dict:
    """results.parquet, trials.parquet, frontier.png, summary.md, card/ (and the store, when set)."""
    trials = trial_rows_of(s, grid)
    rows = candidate_rows(s, trials)
    single, per_layer = per_layer_measurements(s, rows)
    card_dir = write_card_version(s, rows, single, per_layer)
    atomic_write_bytes(s.out / "results.parquet", _parquet_bytes(rows_frame(rows)))
    atomic_write_bytes(s.out / "trials.parquet", _parquet_bytes(rows_frame(trials)))
    unit = _UNIT_WORDS[s.cfg.budget_unit]
    write_frontier_png(rows, s.out / "frontier.png",
                       f"{Path(str(s.plan.model_id)).name}: {sum(r['status'] == 'trained' for r in rows)} trained, budget "
                       f"{_fmt(s.cfg.budget)} {unit}")
    atomic_write_text(s.out / "summary.md", summary_markdown(s, rows, per_layer, card_dir))
    version = None
    if s.cfg.store:
        version = CardStore(s.cfg.store).publish(card_dir, summary={"search": str(s.out)}).version
    counts = {st: sum(r["status"] == st for r in rows) for st in STATUSES}
    return {"out": str(s.out), "candidates": len(rows), **counts, "card": str(card_dir), "store_version": version,
            "per_layer": per_layer}


def _parquet_bytes(frame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()
