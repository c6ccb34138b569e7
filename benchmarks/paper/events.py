"""What a search's trial event log says about its runs: how much of each trial ran beside another, and
how long the search took."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from layercard.search.events import read_events


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
    times = [e["time"] for e in read_events(search_dir)]
    return (max(times) - min(times)) / 60 if times else None
