"""``layercard export-runs --to FILE SEARCH…``: keep a search's finished runs as a run-record file.

    layercard export-runs --to runs.jsonl runs/explore                  # one search
    layercard export-runs --to runs.jsonl runs/explore runs/ablation    # merged into what runs.jsonl holds
    layercard search --config … --out runs/again reuse=[runs.jsonl]     # replay them, here or elsewhere

One JSON line per run: its fingerprint (the worker config, layers, LoRA config, seed, weights hash and data
digests) and every report it made, with the library versions it trained under. A later search that
names the file in ``reuse`` replays a run with the same fingerprint instead of training it (a run ASHA
stopped at a rung, or one cut by an interruption, replays what it has and trains on). The file is merged,
never shrunk: a run is added, or replaced by a longer run with the same fingerprint. It can be read while
the search runs (what has finished so far) and outlives the search's directory.
"""
from __future__ import annotations

import argparse
import sys

from layercard.search.reuse import export_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layercard export-runs", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--to", required=True, metavar="FILE", help="run-record file (*.jsonl) to create or merge into")
    p.add_argument("sources", nargs="+", metavar="SEARCH", help="search OUT directories or run-record files")
    a = p.parse_args(argv)
    counts = export_runs(a.sources, a.to)
    print(f"layercard export-runs: {a.to}: {counts['runs']} runs ({counts['complete']} trained to the end), "
          f"{counts['new']} added or extended from {len(a.sources)} source(s)")
    return 0


if __name__ == "__main__":
    from layercard.runtime import run_main

    sys.exit(run_main(main))
