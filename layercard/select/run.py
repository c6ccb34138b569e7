"""Choosing layers from a Layer Card and writing the selection: ``adapter_config.json`` (a PEFT
LoraConfig) and ``selection.json`` (layers, predictions, the card and model they were made for),
with ``--objective pareto`` also ``pareto.json``; the directory is written atomically.

What ``layercard select`` runs (its options are :func:`run_select`'s arguments; see ``pipelines/select.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from layercard.select.baselines import STRATEGIES, baseline_layers
from layercard.atomic import atomic_dir
from layercard.card.layer_card import LayerCard
from layercard.data.examples import LEGACY_SEQUENCE_FORMAT
from layercard.errors import LayercardError
from layercard.select.gain_models import FORMULAS
from layercard.select.lora_config import build_lora_config, card_rank_allocation, write_lora_config
from layercard.select.measured import check_layers, measured_pick
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


def _check_args(a) -> None:
    given = [f for f, on in (("--strategy", a.strategy), ("--objective", a.objective),
                             ("--layers", a.layers is not None), ("--from-search", a.from_search)) if on]
    if len(given) > 1:
        raise LayercardError(f"give one of --strategy, --objective, --layers, --from-search, not {' and '.join(given)}")
    if a.layers is not None or a.from_search:
        extra = [f for f, on in (("--budget", a.budget is not None), ("--target", a.target is not None),
                                 ("--k", a.layers is not None and a.k is not None)) if on]
        if extra:
            raise LayercardError(f"{', '.join(extra)} does not apply to {given[0]}")
    a.objective = None if (a.strategy or a.layers is not None or a.from_search) else (a.objective or "max-quality")
    used = {"--k": a.k is not None, "--budget": a.budget is not None, "--target": a.target is not None}
    allowed = {"max-quality": {"--k", "--budget"}, "min-cost": {"--target"}, "pareto": set(),
               None: {"--k"}}[a.objective]
    extra = [f for f, on in used.items() if on and f not in allowed]
    if extra and (a.strategy or a.objective):
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
    if a.layers is not None:
        return check_layers(card, a.layers), "given", None
    if a.from_search:
        layers, a.measured = measured_pick(card, a.from_search, a.k)
        return layers, "measured", None
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


def run_select(card: str | Path, out: str | Path, *, objective: str | None = None, strategy: str | None = None,
               k: int | None = None, budget: float | None = None, budget_unit: str = "flops",
               target: float | None = None, seed: int = 0, rank: int | None = None, rank_budget: int | None = None,
               alpha: float | None = None, model: str | None = None, step_budget: float | None = None,
               train_config: str | None = None, target_form: str = "auto", overwrite: bool = False,
               layers: list[int] | None = None, from_search: str | Path | None = None) -> dict:
    """Choose layers from the card in ``card`` and write the selection to ``out`` (``layercard select``;
    the arguments are its options). Returns selection.json's content."""
    a = SimpleNamespace(card=card, out=out, objective=objective, strategy=strategy, k=k, budget=budget,
                        budget_unit=budget_unit, target=target, seed=seed, rank=rank, rank_budget=rank_budget,
                        alpha=alpha, model=model, step_budget=step_budget, train_config=train_config,
                        target_form=target_form, overwrite=overwrite, layers=layers, from_search=from_search,
                        measured=None)
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
    if a.measured is not None:
        selection["measured"] = a.measured      # the search that measured this set (layercard.select.measured)
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
    what = (f"--strategy {a.strategy}" if a.strategy else f"--objective {a.objective}" if a.objective
            else "--layers" if a.layers is not None else f"--from-search {a.from_search}")
    gf, cf = selection["gain_fraction"], (selection["cost_fraction"] or {}).get(COST_UNITS[a.budget_unit])
    tail = "" if gf is None else f": {gf:.1%} of the all-layer predicted gain at {cf:.1%} of its cost"
    print(f"{what}: layers {layers}{tail} -> {out}")
    if pareto is not None:
        print(f"pareto front: {len(pareto['sets'])} sets -> {out / 'pareto.json'}")
    return selection
