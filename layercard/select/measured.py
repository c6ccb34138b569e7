"""A search's measured pick as a selection: ``layercard select CARD --from-search OUT [--k K]``.

A finished ``layercard search`` leaves in OUT ``search.json`` (the card it searched), ``results.parquet``
(one row per candidate: layers, status, measured quality) and, in ``mode=explore``, ``explore.json``
(the pick per k, trained on every seed). The pick is, in that order of preference:

* ``explore.json``'s pick at k (the set with the best final quality on the first seed, trained on every
  seed; its gain fraction over the seeds is recorded);
* otherwise the candidate of ``results.parquet`` with the best measured quality among those trained to
  the end with k layers (any k when none is given, the all-layer reference aside).

Only the files are read (this stage does not import the search), and only a search of this card, or of
the card this card version came from, is accepted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from layercard.errors import LayercardError

SEARCH_RECORD = "search.json"        # layercard.search.run.SEARCH_FILE
EXPLORE_RECORD = "explore.json"      # layercard.search.explore.EXPLORE_FILE
RESULTS_TABLE = "results.parquet"


def check_layers(card, layers) -> list[int]:
    """``layers`` as sorted ints, each a layer of the card, none twice: one-line error otherwise."""
    known = set(card.layer_ids)
    out = []
    for l in layers:
        try:
            layer = int(l)
        except (TypeError, ValueError):
            raise LayercardError(f"--layers: {l!r} is not a layer number") from None
        if layer not in known:
            raise LayercardError(f"--layers: layer {layer} is not in the card (layers {min(known)}..{max(known)})")
        if layer in out:
            raise LayercardError(f"--layers: layer {layer} is given twice")
        out.append(layer)
    if not out:
        raise LayercardError("--layers: give at least one layer")
    return sorted(out)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LayercardError(f"--from-search: '{path}' is unreadable ({type(err).__name__})") from None


def _record(out: Path) -> dict:
    path = out / SEARCH_RECORD
    if not path.is_file():
        raise LayercardError(f"--from-search: '{out}' holds no search ({SEARCH_RECORD} is missing)")
    return _read_json(path)


def measured_pick(card, out: str | Path, k: int | None) -> tuple[list[int], dict]:
    """(layers, what was measured) of the search in ``out`` for this card, at k layers."""
    out = Path(out).expanduser()
    record = _record(out)
    ids = {card.card_id, card.meta.get("parent_card_id")}
    if record.get("card_id") not in ids:
        raise LayercardError(f"--from-search: the search in '{out}' ran on card {record.get('card_id')}, not on "
                             f"{card.card_id} (or the card it came from)")
    explore = out / EXPLORE_RECORD
    if explore.is_file():
        rows = _read_json(explore)
        if k is None and len(rows) == 1:
            k = rows[0]["k"]
        row = next((r for r in rows if r["k"] == k), None)
        if row is None:
            raise LayercardError(f"--from-search: the explore search in '{out}' picked at k = "
                                 f"{sorted(r['k'] for r in rows)}; give one of them with --k")
        info = {"search": str(out.resolve()), "source": EXPLORE_RECORD, "k": k, "candidate": row.get("picked_candidate"),
                "gain_fraction_mean": row.get("gain_fraction_mean"), "gain_fraction_sd": row.get("gain_fraction_sd"),
                "gain_fraction_mean_unselected": row.get("gain_fraction_mean_unselected"),
                "seeds": row.get("seeds")}
        return sorted(int(l) for l in row["picked_layers"]), info
    table = out / RESULTS_TABLE
    if not table.is_file():
        raise LayercardError(f"--from-search: '{out}' has no {RESULTS_TABLE}: the search has not finished "
                             f"(resume it with `layercard search --resume {out}`)")
    import pandas as pd

    res = pd.read_parquet(table)
    n_all = len(card.layer_ids)
    rows = [r for r in res.to_dict("records") if r["status"] == "trained" and r.get("quality") is not None
            and not math.isnan(r["quality"]) and (len(r["layers"]) == k if k is not None else len(r["layers"]) < n_all)]
    if not rows:
        what = f"with {k} layers" if k is not None else "other than all layers"
        raise LayercardError(f"--from-search: no set {what} was trained to the end in '{out}'")
    best = min(rows, key=lambda r: (r["quality"], len(r["layers"]), list(r["layers"])))
    info = {"search": str(out.resolve()), "source": RESULTS_TABLE, "k": len(best["layers"]),
            "candidate": best["candidate"], "quality": float(best["quality"]), "quality_name": best.get("quality_name"),
            "measured_gain": None if best.get("measured_gain") is None else float(best["measured_gain"]),
            "trials": int(best.get("n_trials") or 0)}
    return sorted(int(l) for l in best["layers"]), info


__all__ = ["check_layers", "measured_pick"]
