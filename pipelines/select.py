"""``layercard select CARD_DIR --out DIR``: choose layers from a Layer Card and write a PEFT LoraConfig.

Objectives (docs/design.md §3; the predicted quality Q(S) and cost model are in :mod:`layercard.select.selection`):

    --objective max-quality --k K [--budget B]     best Q with |S| ≤ K and/or cost ≤ B
    --objective min-cost --target T                cheapest S with Q(S) ≥ T · Q(all layers)
    --objective pareto                             every non-dominated (Q, cost) set → pareto.json
    --strategy top|bottom|mid|uniform|random|grad-norm|block-influence --k K  (or all)   baselines
    --layers 2,11,18                               a set you give
    --from-search OUT [--k K]                      the set a finished search measured best (explore: its pick)

Cost is predicted FLOPs per token (``--budget-unit flops``, the default) or predicted seconds per
training step (``--budget-unit seconds``, calibrated on the card's measured steps).
``--rank-budget P`` spreads LoRA ranks over the chosen layers within P adapter parameters.

DIR gets ``adapter_config.json`` (``peft.LoraConfig.from_pretrained(DIR)`` loads it) and
``selection.json``; with ``--objective pareto`` also ``pareto.json`` (the config is the best-gain
set's). DIR is written atomically.
"""
from __future__ import annotations

import argparse
import sys

from layercard.errors import LayercardError
from layercard.runtime import run_main
from layercard.select.baselines import STRATEGIES
from layercard.select.gain_models import DEFAULT_MODEL, MODELS
from layercard.select.run import OBJECTIVES, run_select
from layercard.select.selection import COST_UNITS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line LayercardError instead of usage + exit
        raise LayercardError(f"layercard select: {message}")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layercard select", description="choose layers from a card and write a PEFT LoraConfig")
    p.add_argument("card", help="Layer Card directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--objective", choices=OBJECTIVES, help="card-guided objective (default max-quality)")
    p.add_argument("--strategy", choices=STRATEGIES, help="a baseline instead of an objective")
    p.add_argument("--layers", type=_layer_list, help="your own set, e.g. 2,11,18 (predictions and baselines "
                   "are reported for it as for any other)")
    p.add_argument("--from-search", metavar="OUT", help="the set a finished `layercard search` in OUT measured best "
                   "(explore: its pick at --k; otherwise the best trained set with --k layers)")
    p.add_argument("--k", type=int, help="number of layers (max-quality: at most k)")
    p.add_argument("--budget", type=float, help="max-quality: largest predicted cost, in --budget-unit")
    p.add_argument("--budget-unit", choices=sorted(COST_UNITS), default="flops",
                   help="flops = predicted FLOPs/token (default); seconds = predicted seconds/step")
    p.add_argument("--target", type=float, help="min-cost: fraction of the all-layer gain to reach, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random strategy seed (default 0)")
    p.add_argument("--rank", type=int, help="LoRA rank of every adapter (default: the card's rank)")
    p.add_argument("--rank-budget", type=int, help="total adapter parameters; ranks are spread over the layers")
    p.add_argument("--alpha", type=float, help="lora_alpha (default 2 x rank)")
    p.add_argument("--model", choices=MODELS, default=None,
                   help=f"set model that scores layer sets (default {DEFAULT_MODEL} when the card has its "
                        "columns, else newton; see layercard.select.gain_models)")
    p.add_argument("--step-budget", type=float, default=None,
                   help="ρ = Σ lr_t of the training run the selection is for (adam/coverage models)")
    p.add_argument("--train-config", default=None,
                   help="a `layercard train` YAML: ρ from its lr, steps and warmup_steps (instead of --step-budget)")
    p.add_argument("--target-form", choices=("auto", "list", "regex"), default="auto",
                   help="target_modules as a list + layers_to_transform, or one regex (auto: regex when ambiguous)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    run_select(**vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
