"""The driver's trial log: start / complete / error of every trial as the driver saw them, one JSON
line each in ``OUT/trial_events.jsonl`` (it survives ``Tuner.restore``: every attempt counts)."""
from __future__ import annotations

import json
from pathlib import Path

EVENTS_FILE = "trial_events.jsonl"  # start / complete / error of every trial, as the driver saw them
STOP_FILE = ".stop_after_trials"    # test-only switch, read by TrialLog


def read_events(out: Path) -> list[dict]:
    path = out / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
