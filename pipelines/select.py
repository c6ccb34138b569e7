"""``layercard select CARD_DIR --out DIR``: choose layers from a Layer Card and write a PEFT LoraConfig.

Objectives (docs/design.md §3; the predicted quality Q(S) and cost model are in :mod:`layercard.select.selection`):

    --objective max-quality --k K [--budget B]     best Q with |S| ≤ K and/or cost ≤ B
    --objective min-cost --target T                cheapest S with Q(S) ≥ T · Q(all layers)
    --objective pareto                             every non-dominated (Q, cost) set → pareto.json
    --strategy top|bottom|mid|uniform|random|grad-norm|block-influence --k K  (or all)   baselines

Cost is predicted FLOPs per token (``--budget-unit flops``, the default) or predicted seconds per
training step (``--budget-unit seconds``, calibrated on the card's measured steps).
``--rank-budget P`` spreads LoRA ranks over the chosen layers within P adapter parameters.

DIR gets ``adapter_config.json`` (``peft.LoraConfig.from_pretrained(DIR)`` loads it) and
``selection.json``; with ``--objective pareto`` also ``pareto.json`` (the config is the best-gain
set's). DIR is written atomically.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from layercard.select.baselines import STRATEGIES, baseline_layers
from layercard.atomic import atomic_dir
from layercard.card.layer_card import LayerCard
from layercard.data.examples import LEGACY_SEQUENCE_FORMAT
from layercard.errors import LayercardError
from layercard.select.gain_models import DEFAULT_MODEL, FORMULAS, MODELS
from layercard.select.lora_config import build_lora_config, card_rank_allocation, write_lora_config
from layercard.select.selection import (
    COST_UNITS,
    CardArrays,
    arrays_from_card,
    pareto_front,
    select_max_quality,
    select_min_cost,
    set_quality,
    singleton_quality,
)

OBJECTIVES = ("max-quality", "min-cost", "pareto")
QUALITY_FORMULA = ("Q(S) = ½ b̂_Sᵀ (K̂_SS + E_SS)⁺ b̂_S; b̂ = √r ⊙ b, K̂ = (√r √rᵀ) ⊙ K, E = diag((1 − r) ⊙ diag K), "
                   "r = f²·min(1, √(κ_ref/κ)), f = 2·gain_adj/res2 (layercard.select.selection)")


def _formula(A: CardArrays | None) -> str:
    return FORMULAS.get(A.model_name, QUALITY_FORMULA) if A is not None else QUALITY_FORMULA


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line LayercardError instead of usage + exit
        raise LayercardError(f"layercard select: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layercard select", description="choose layers from a card and write a PEFT LoraConfig")
    p.add_argument("card", help="Layer Card directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--objective", choices=OBJECTIVES, help="card-guided objective (default max-quality)")
    p.add_argument("--strategy", choices=STRATEGIES, help="a baseline instead of an objective")
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


def _check_args(a) -> None:
    if a.strategy and a.objective:
        raise LayercardError("give --strategy or --objective, not both")
    a.objective = None if a.strategy else (a.objective or "max-quality")
    used = {"--k": a.k is not None, "--budget": a.budget is not None, "--target": a.target is not None}
    allowed = {"max-quality": {"--k", "--budget"}, "min-cost": {"--target"}, "pareto": set(),
               None: {"--k"}}[a.objective]
    extra = [f for f, on in used.items() if on and f not in allowed]
    if extra:
        what = f"--objective {a.objective}" if a.objective else f"--strategy {a.strategy}"
        raise LayercardError(f"{', '.join(extra)} does not apply to {what}")
    if a.objective == "max-quality" and a.k is None and a.budget is None:
        raise LayercardError("--objective max-quality needs --k and/or --budget")
    if a.objective == "min-cost" and a.target is None:
        raise LayercardError("--objective min-cost needs --target (a fraction of the all-layer gain in (0, 1])")
    if a.strategy and a.strategy != "all" and a.k is None:
        raise LayercardError(f"--strategy {a.strategy} needs --k")
    if a.rank is not None and a.rank < 1:
        raise LayercardError(f"--rank must be >= 1, got {a.rank}")
    if a.rank is not None and a.rank_budget is not None:
        raise LayercardError("give --rank or --rank-budget, not both (the budget decides the ranks)")
    if a.alpha is not None and not a.alpha > 0:
        raise LayercardError(f"--alpha must be > 0, got {a.alpha}")


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------
def step_budget_of(a) -> float | None:
    """ρ from --step-budget or --train-config (None: the set model's default recipe)."""
    if a.step_budget is not None and a.train_config is not None:
        raise LayercardError("give --step-budget or --train-config, not both")
    if a.train_config is None:
        if a.step_budget is not None and not a.step_budget > 0:
            raise LayercardError(f"--step-budget must be > 0, got {a.step_budget}")
        return a.step_budget
    from layercard.profile.adam_step import step_budget
    from layercard.config import load_config
    from layercard.train.config import TrainConfig

    t = load_config(TrainConfig, a.train_config, ["selection=null", "strategy=all"])   # only lr, steps, warmup matter
    return step_budget(t.lr, t.steps, t.warmup_steps)


def _arrays(card, unit: str, needed: bool, model: str | None = None,
            rho: float | None = None) -> tuple[CardArrays | None, str | None]:
    """The card's selection arrays; a baseline without coupling or cost still runs (no predictions)."""
    try:
        return arrays_from_card(card, unit, model=model, step_budget=rho), None
    except LayercardError as err:
        if needed:
            raise
        return None, str(err)


def _choose(card, a, A: CardArrays | None):
    """(layers, method, pareto Selections or None)."""
    if a.strategy:
        return baseline_layers(card, a.strategy, a.k, seed=a.seed), "baseline", None
    if a.objective == "max-quality":
        s = select_max_quality(A, k=a.k, budget=a.budget)
        return list(s.layers), s.method, None
    if a.objective == "min-cost":
        s = select_min_cost(A, a.target)
        return list(s.layers), s.method, None
    front = pareto_front(A)
    best = max(front, key=lambda s: (s.gain, -s.cost))
    return list(best.layers), best.method, front


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _cost(card, layers) -> dict:
    from layercard.profile.cost import predicted_cost

    c = predicted_cost(card, layers)
    return {"flops_per_token": c["flops_per_token"], "step_seconds": c["step_seconds"],
            "adapted_layers": c["adapted_layers"]}


def _ratio(x, y):
    return None if x is None or y is None or not y else float(x) / float(y)


def _predictions(card, A: CardArrays | None, layers, all_cost: dict | None, all_gain: float | None) -> dict:
    if A is None:
        return {"predicted_gain": None, "gain_fraction": None, "predicted_cost": None, "cost_fraction": None}
    gain = set_quality(A, layers)
    cost = _cost(card, layers)
    return {
        "predicted_gain": gain,
        "gain_fraction": _ratio(gain, all_gain),
        "predicted_cost": cost,
        "cost_fraction": {k: _ratio(cost[k], all_cost[k]) for k in ("flops_per_token", "step_seconds")},
    }


def _baselines(card, A: CardArrays, k: int, seed: int, all_cost, all_gain) -> dict:
    out = {}
    for name in STRATEGIES:
        try:
            layers = baseline_layers(card, name, k, seed=seed)
        except LayercardError as err:      # e.g. a card without block_influence
            out[name] = {"error": str(err)}
            continue
        out[name] = {"layers": layers, **_predictions(card, A, layers, all_cost, all_gain)}
    return out


def _write_atomically(out: Path, overwrite: bool, write) -> None:
    if out.exists() and not overwrite:
        raise LayercardError(f"output directory '{out}' already exists (pass --overwrite or choose another --out)")
    with atomic_dir(out, replace=overwrite) as tmp:     # the old selection stays until the new one is whole
        write(tmp)


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _check_args(a)
    card = LayerCard.load(a.card, with_stats=False)
    rho = step_budget_of(a)
    A, missing = _arrays(card, a.budget_unit, needed=bool(a.objective) or a.rank_budget is not None,
                         model=a.model, rho=rho)
    layers, method, front = _choose(card, a, A)

    ranks = None
    if a.rank_budget is not None:
        values = dict(zip((int(l) for l in A.layers), singleton_quality(A)))
        ranks = card_rank_allocation(card, layers, a.rank_budget, values)
    config, info = build_lora_config(card, layers, r=a.rank, alpha=a.alpha, ranks=ranks, target_form=a.target_form)

    all_layers = card.layer_ids
    all_gain = set_quality(A, all_layers) if A is not None else None
    all_cost = _cost(card, all_layers) if A is not None else None
    selection = {
        "card_id": card.card_id,
        "weights_hash": card.meta.get("weights_hash"), "weights_hash_kind": card.meta.get("weights_hash_kind"),
        "model_id": card.meta.get("model_id"),
        "sequences": card.meta.get("sequences") or LEGACY_SEQUENCE_FORMAT,   # how the card's sequences were built
        "layers": layers,
        "strategy": a.strategy,
        "objective": a.objective,
        "method": method,
        "parameters": {"k": a.k, "budget": a.budget, "budget_unit": a.budget_unit, "target": a.target,
                       "seed": a.seed if a.strategy == "random" else None, "rank": config.r,
                       "rank_budget": a.rank_budget, "alpha": config.lora_alpha},
        "quality_formula": _formula(A),
        "quality_model": A.model_name if A is not None else None,
        "step_budget": getattr(getattr(A, "model", None), "rho", None),
        **_predictions(card, A, layers, all_cost, all_gain),
        "all_layer_gain": all_gain,
        "all_layer_cost": all_cost,
        "adapted_layers": len(layers),
        "ranks": {str(l): r for l, r in info["ranks"].items()},
        "adapter_params": info["adapter_params"],
        "target_form": info["target_form"],
        "ambiguous_targets": info["ambiguous_targets"],
        "modules": sorted({m for ms in info["modules"].values() for m in ms}),
    }
    if missing:
        selection["predictions_missing"] = missing
    else:
        selection["layer_terms"] = {str(l): {"reliability": float(r), "singleton_gain": float(q)}
                                    for l, r, q in zip(A.layers, A.weight, singleton_quality(A))}
    if A is not None and front is None:
        selection["baselines"] = _baselines(card, A, len(layers), a.seed, all_cost, all_gain)
    pareto = None
    if front is not None:
        pareto = {"card_id": card.card_id, "cost_unit": COST_UNITS[a.budget_unit], "quality_formula": _formula(A),
                  "all_layer_gain": all_gain, "all_layer_cost": all_cost,
                  "sets": [{"layers": list(s.layers), "method": s.method,
                            **_predictions(card, A, list(s.layers), all_cost, all_gain)} for s in front]}

    def write(tmp: Path) -> None:
        write_lora_config(config, tmp)
        _dump(tmp / "selection.json", selection)
        if pareto is not None:
            _dump(tmp / "pareto.json", pareto)

    out = Path(a.out)
    _write_atomically(out, a.overwrite, write)
    what = f"--strategy {a.strategy}" if a.strategy else f"--objective {a.objective}"
    gf, cf = selection["gain_fraction"], (selection["cost_fraction"] or {}).get(COST_UNITS[a.budget_unit])
    tail = "" if gf is None else f": {gf:.1%} of the all-layer predicted gain at {cf:.1%} of its cost"
    print(f"{what}: layers {layers}{tail} -> {out}")
    if pareto is not None:
        print(f"pareto front: {len(pareto['sets'])} sets -> {out / 'pareto.json'}")
    return 0


if __name__ == "__main__":
    import sys

    from pipelines.common import run_main

    sys.exit(run_main(main))
