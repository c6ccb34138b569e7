"""``layercard cards list [--store S] [--model M]`` · ``layercard cards show VERSION [--store S]``

Browse the card store (:mod:`layercard.card.store`): a local path or a pyarrow URI, from ``--store``
or ``$LAYERCARD_STORE``.
"""
from __future__ import annotations

import argparse
import json
import sys

from layercard.card.store import CardStore, default_store

SHOWN = ["layer", "res2", "kappa", "gain_adj", "b", "k_diag", "step_seconds", "backprop_flops_per_token"]


def _drift_word(summary: dict) -> str:
    drift = summary.get("drift")
    if drift is None:
        return "baseline" if "drift" in summary else "–"
    return f"DRIFT {summary.get('changed_layers')}" if drift else "ok"


def cmd_list(store: CardStore, model: str | None, as_json: bool) -> int:
    versions = store.list_versions(model)
    if as_json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no versions{f' of model {model!r}' if model else ''} in store '{store.uri}'")
        return 0
    print(f"{'version':<30} {'model':<36} {'weights':<16} {'data':<16} {'config':<16} drift")
    for v in versions:
        print(f"{v.version:<30} {v.model_id[:36]:<36} {v.weights_hash[:16]:<16} {v.data_hash[:16]:<16} "
              f"{v.config_hash:<16} {_drift_word(v.summary)}")
    return 0


def cmd_show(store: CardStore, version: str, as_json: bool) -> int:
    v = store.get(version)
    if as_json:
        print(json.dumps(v.to_dict(), indent=2))
        return 0
    card = store.load(v, with_stats=False)
    print(f"version    {v.version}\nmodel      {v.model_id}\nweights    {v.weights_hash}\ndata       {v.data_hash}\n"
          f"config     {v.config_hash}\ncreated    {v.created_at}\npublished  {v.published_at}\ncard       {v.card_id}\n"
          f"location   {v.path}\ndrift      {_drift_word(v.summary)}"
          + (f" against {v.summary['against']}" if v.summary.get("against") else ""))
    cols = [c for c in SHOWN if c in card.layers.columns]
    print(card.layers[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if "drift.md" in v.files:
        print()
        print(store.read_file(v, "drift.md").decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layercard cards", description="list and show versions in a card store")
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("list", help="list versions, oldest first")
    pl.add_argument("--model", help="only this model (model id or model key)")
    ps = sub.add_parser("show", help="one version: identity, layer table, drift report")
    ps.add_argument("version", help="version id (or <model key>/<version id>)")
    for sp in (pl, ps):
        sp.add_argument("--store", help="a path or pyarrow URI (default: $LAYERCARD_STORE)")
        sp.add_argument("--json", action="store_true", help="print the manifest(s) as JSON")
    args = p.parse_args(argv)
    store = CardStore(default_store(args.store))
    if args.cmd == "list":
        return cmd_list(store, args.model, args.json)
    return cmd_show(store, args.version, args.json)


if __name__ == "__main__":
    from layercard.runtime import run_main

    sys.exit(run_main(main))
