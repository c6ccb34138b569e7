"""``layercard show CARD_DIR``: print the layer table of a card."""
from __future__ import annotations

import argparse
import sys

from layercard.card.layer_card import LayerCard

SHOWN = ["layer", "n_tokens", "res2", "res2_rank_r", "res_frac", "grad_norm", "kappa", "d_eff", "gain_adj",
         "gain_adj_rank_r",
         "block_influence", "b", "k_diag", "step_seconds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layercard show", description="print a card's layer table")
    p.add_argument("card", help="card directory")
    p.add_argument("--modules", action="store_true", help="print the per-module table too")
    args = p.parse_args(argv)
    card = LayerCard.load(args.card, with_stats=False)
    m = card.meta
    print(f"card {card.card_id}  model {m.get('model_id')}  weights {m.get('weights_hash')}  "
          f"tokens {m.get('n_tokens')}  rank {m.get('rank')}  ridge {m.get('ridge')}  loss {m.get('loss', 'lm')}")
    cols = [c for c in SHOWN if c in card.layers.columns]
    print(card.layers[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.modules:
        print(card.modules.drop(columns=["group"], errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    from layercard.runtime import run_main

    sys.exit(run_main(main))
