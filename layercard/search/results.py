"""A search's measurements as rows: one per trial, one per candidate (averaged over its seeds, with
its place on the measured front)."""
from __future__ import annotations

import numpy as np

from layercard.errors import LayercardError
from layercard.search.events import read_events
from layercard.search.setup import Setup
from layercard.select.candidates import pareto_mask

STATUSES = ("trained", "over_budget", "stopped_early", "failed")


class SearchInterrupted(LayercardError):
    """The driver stopped before every trial finished; ``--resume OUT`` continues."""


def trial_rows_of(s: Setup, grid) -> list[dict]:
    """One row per trial; raises SearchInterrupted when a trial has not finished."""
    events = read_events(s.out)
    finished = {e["key"]: e for e in events if e["event"] in ("complete", "error")}
    attempts = {}
    for e in events:
        if e["event"] == "start":
            attempts[e["key"]] = attempts.get(e["key"], 0) + 1
    unfinished = [k for k in s.trials if k not in finished]
    if unfinished:
        raise SearchInterrupted(f"search interrupted with {len(s.trials) - len(unfinished)} of {len(s.trials)} trials "
                                f"finished; resume with `layercard search --resume {s.out}`")
    results = {r.config["trial"]: r for r in grid}
    steps = s.cfg.train_config.steps
    rows = []
    for key, trial in s.trials.items():
        r = results.get(key)
        m = dict(r.metrics or {}) if r is not None else {}
        event = finished[key]
        if event["event"] == "error" or (r is not None and r.error is not None):
            status = "failed"
        elif m.get("step") == steps and m.get("median_step_s") is not None:
            status = "trained"
        else:
            status = "stopped_early"
        peak = m.get("peak_memory_bytes")
        # A trial stopped at a rung reported the rung quality only: it has no quality, so no quality name.
        quality = m.get("quality", m.get("eval_loss"))
        quality_name = m.get("quality_name") or ("eval_loss" if quality is not None else None)
        rows.append({
            "trial": key, "candidate": trial["candidate"], "seed": trial["seed"], "trial_id": event["trial_id"],
            "attempts": attempts.get(key, 0), "status": status, "steps_done": m.get("step"),
            "initial_eval_loss": m.get("initial_eval_loss"), "eval_loss": m.get("eval_loss"),
            "initial_quality": m.get("initial_quality", m.get("initial_eval_loss")),
            "quality": quality, "quality_name": quality_name,
            "label_loss": m.get("label_loss"),
            "metric": m.get("metric"), "metric_name": m.get("metric_name"),
            "step_seconds": m.get("median_step_s"),
            "peak_memory_bytes": max(peak) if isinstance(peak, list) and peak else peak,
            "train_tokens_per_s": m.get("train_tokens_per_s"),
            "reused_from": m.get("reused_from"),    # the earlier search whose run was replayed (config key reuse)
            "error": event.get("error") or (str(r.error).splitlines()[0][:500] if r is not None and r.error else None),
        })
    base = [r["initial_quality"] for r in rows if r["initial_quality"] is not None]
    # The base model's quality (label loss, else eval loss) does not depend on the layers (LoRA
    # starts at zero): one per search. Measured gain = how far a layer set brought it down.
    base_quality = float(np.median(base)) if base else None
    for row in rows:
        row["measured_gain"] = None if base_quality is None or row["quality"] is None else base_quality - row["quality"]
    return rows


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def candidate_rows(s: Setup, trial_rows: list[dict]) -> list[dict]:
    """One row per candidate: predictions, status, and measurements averaged over its trained trials
    (over its early-stopped ones when none trained)."""
    by_cand: dict[str, list[dict]] = {}
    for r in trial_rows:
        by_cand.setdefault(r["candidate"], []).append(r)
    out = []
    for c in s.candidates:
        trials = by_cand.get(c.id, [])
        statuses = {t["status"] for t in trials}
        status = ("over_budget" if c.over_budget else "failed" if "failed" in statuses
                  else "trained" if statuses == {"trained"} else "stopped_early")
        use = [t for t in trials if t["status"] == "trained"] or [t for t in trials if t["status"] == "stopped_early"]
        losses = [t["eval_loss"] for t in use if t["eval_loss"] is not None]
        out.append({
            "candidate": c.id, "layers": c.layers, "k": c.k, "labels": c.labels,
            "objective": ", ".join(c.objectives) or None, "strategy": ", ".join(c.strategies) or None,
            "card_guided": c.card_guided, "baseline": c.baseline,
            "predicted_gain": c.predicted_gain, "predicted_gain_fraction": c.predicted_gain_fraction,
            "predicted_cost": c.cost, "cost_unit": s.cfg.budget_unit,
            "predicted_flops_per_token": c.predicted_flops_per_token,
            "predicted_step_seconds": c.predicted_step_seconds,
            "over_budget": c.over_budget, "status": status, "n_trials": len(trials),
            "steps_done": _mean(t["steps_done"] for t in use),
            "eval_loss": _mean(losses), "eval_loss_std": float(np.std(losses)) if len(losses) > 1 else None,
            "quality": _mean(t["quality"] for t in use),
            "quality_name": next((t["quality_name"] for t in use if t["quality_name"]), None),
            "label_loss": _mean(t["label_loss"] for t in use),
            "measured_gain": _mean(t["measured_gain"] for t in use), "metric": _mean(t["metric"] for t in use),
            "metric_name": next((t["metric_name"] for t in use if t["metric_name"]), None),
            "step_seconds": _mean(t["step_seconds"] for t in use),
            "peak_memory_bytes": _mean(t["peak_memory_bytes"] for t in use),
            "trial_ids": [t["trial_id"] for t in trials],
            "error": next((t["error"] for t in trials if t["error"]), None),
        })
        if s.rungs is not None:
            out[-1]["rung_reached"] = rung_reached(s.rungs, [t["steps_done"] for t in trials], s.cfg.train_config.steps)
    trained = [r for r in out if r["status"] == "trained"]
    front = pareto_mask([r["step_seconds"] for r in trained], [r["measured_gain"] for r in trained])
    on_front = {r["candidate"] for r, f in zip(trained, front) if f}
    for r in out:
        r["on_measured_front"] = r["candidate"] in on_front
    return out


def rung_reached(rungs: list[int], steps_done: list, steps: int) -> int:
    """How far a candidate got through successive halving: the number of rungs whose milestone it
    reached, plus one when it trained to the end (0: never reached the first rung)."""
    done = max((int(x) for x in steps_done if x is not None and np.isfinite(x)), default=0)
    return sum(done >= m for m in rungs) + (done >= steps)


def rows_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)
