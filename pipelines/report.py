"""``layercard report CARD_DIR [--out DIR]``: render a saved Layer Card to report.html and card.md.

    layercard report runs/demo/card                 # writes into runs/demo/card
    layercard report runs/demo/card --out site/ --top-k 5
    layercard report runs/demo/card --layers 3,7,12 # recommend a given selection instead
"""
from __future__ import annotations

import argparse
from pathlib import Path

from layercard.errors import LayercardError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line LayercardError instead of argparse's usage dump + exit
        raise LayercardError(f"layercard report: {message}")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layercard report", description="Render a Layer Card to report.html and card.md.")
    p.add_argument("card_dir", metavar="CARD_DIR", help="a card directory written by `layercard profile`")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: CARD_DIR)")
    p.add_argument("--top-k", type=int, default=None,
                   help="recommend k layers: the card-guided max-quality set (as `layercard select` picks it), "
                        "or the top k by gain_adj on a card without coupling or cost (default: about one layer in six)")
    p.add_argument("--layers", type=_layer_list, default=None,
                   help="recommend this selection instead, e.g. 3,7,12")
    return p


def main(argv: list[str] | None = None) -> int:
    from layercard.card.layer_card import LayerCard
    from layercard.card.report import write_report

    args = build_parser().parse_args(argv)
    if args.layers is not None and args.top_k is not None:
        raise LayercardError("layercard report: give --layers or --top-k, not both")
    card = LayerCard.load(args.card_dir, with_stats=False)
    out = Path(args.out) if args.out else Path(args.card_dir)
    paths = write_report(card, out, selection=args.layers, top_k=args.top_k)
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    import sys

    from layercard.runtime import run_main

    sys.exit(run_main(main))
