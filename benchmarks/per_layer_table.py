"""Which card column ranks layers the way single-layer LoRA trainings do: the per-layer diagnostic.

A finished ``mode=per-layer`` search (every layer trained alone, same recipe) writes a new card version
with a ``measured_gain`` column (base − eval quality). This ranks each predictor the card holds against
it — every set model's singleton score Q({ℓ}) (``coverage``, ``adam`` at the search recipe's step budget,
``newton`` = r_ℓ b_ℓ²/2K_ℓℓ with its two factors, the one-step gain b²/2K and the reliability r), and
the plain columns (grad_norm, gain_adj, res2, …) — and says which term agrees with training and which
misleads::

    layercard search --config configs/search-smollm2.yaml --out runs/per-layer/headline \\
        card=runs/paper-label/headline/card mode=per-layer "seeds=[0]" <the task's train overrides>
    python benchmarks/per_layer_table.py --search runs/per-layer/headline --name headline

Writes ``benchmarks/results/per_layer_<name>.json`` / ``.md`` and ``per_layer_<name>.png`` (measured
gain per layer next to the predictors, each scaled to its maximum).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ("grad_norm", "gain_adj", "gain_adj_rank_r", "res2", "res_frac", "energy", "kappa", "block_influence")


NEWTON = "newton Q({ℓ}) = r·b²/2K"


def layer_predictors(card, step_budget: float | None = None) -> dict[str, np.ndarray]:
    """name → one value per card layer (card order): what each could say about a layer trained alone.
    Every set model's singleton score Q({ℓ}) (``adam`` and ``coverage`` where the card has the sign-step
    columns, with ``step_budget`` ρ = Σ lr_t of the recipe the layers were trained with), its factors for
    ``newton``, the card's columns and depth."""
    from layercard.select import selection as sel

    A = sel.arrays_from_card(card, model="newton")
    d = np.diag(A.K).astype(np.float64)
    b = card.layers["b"].to_numpy(np.float64)
    one_step = np.where(d > 0, b**2 / (2.0 * np.where(d > 0, d, 1.0)), 0.0)
    out = {NEWTON: sel.singleton_quality(A), "b²/2K (no reliability)": one_step,
           "reliability r": sel.card_reliability(card)}
    if getattr(card, "coupling_adam", None) is not None:
        for model in ("adam", "coverage"):
            out[f"{model} Q({{ℓ}})"] = sel.singleton_quality(sel.arrays_from_card(card, model=model,
                                                                                    step_budget=step_budget))
    out.update({c: card.layers[c].to_numpy(np.float64) for c in COLUMNS if c in card.layers})
    out["depth"] = np.asarray(card.layer_ids, dtype=np.float64)
    return out


def agreement(predictors: dict[str, np.ndarray], measured) -> dict[str, float | None]:
    """name → Spearman ρ of the predictor with the measured gain (layers without a measurement skipped)."""
    from layercard.select.candidates import spearman

    y = np.asarray(measured, dtype=np.float64)
    return {name: spearman(np.asarray(x, dtype=np.float64), y) for name, x in predictors.items()}


def top_overlap(predictor, measured, k: int) -> int:
    """How many of the k layers that trained best alone the predictor also puts in its top k."""
    x, y = np.asarray(predictor, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(ok)
    best = set(idx[np.argsort(-y[ok], kind="stable")[:k]])
    picked = set(idx[np.argsort(-x[ok], kind="stable")[:k]])
    return len(best & picked)


def markdown(name: str, ids, measured, predictors, rho, k: int, meta: dict) -> str:
    order = np.argsort(-np.asarray(measured, dtype=np.float64), kind="stable")
    best = [int(ids[i]) for i in order[:k]]
    lines = [f"# Per-layer diagnostic: {name}", "",
             f"Every layer trained alone ({meta['steps']} steps × batch {meta['batch_size']}, lr {meta['lr']:g}, "
             f"seeds {meta['seeds']}); measured gain = the base model's {meta['quality']} − the trained one's "
             f"(on the eval split). Card {meta['card_id']}.", "",
             f"Layers that trained best alone (top {k}): {best}.", "",
             f"| predictor | Spearman ρ with measured gain | of the top {k} layers, also in its top {k} |",
             "|---|---|---|"]
    for p, r in sorted(rho.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -2)):
        lines.append(f"| {p} | {'n/a' if r is None else f'{r:+.2f}'} | {top_overlap(predictors[p], measured, k)} |")
    lines += ["", "| layer | measured gain | coverage Q({ℓ}) | newton Q({ℓ}) | b²/2K | r | grad_norm |",
              "|---|---|---|---|---|---|---|"]
    pick = lambda key, i: predictors.get(key, np.full(len(ids), np.nan))[i]  # noqa: E731
    for i, l in enumerate(ids):
        lines.append(f"| {l} | {measured[i]:.4f} | {pick('coverage Q({ℓ})', i):.3g} | {pick(NEWTON, i):.3g} | "
                     f"{pick('b²/2K (no reliability)', i):.3g} | {pick('reliability r', i):.3f} | "
                     f"{pick('grad_norm', i):.3g} |")
    return "\n".join(lines) + "\n"


def plot(name: str, ids, measured, predictors, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = lambda v: np.asarray(v, dtype=np.float64) / np.nanmax(np.abs(v))  # noqa: E731
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.asarray(ids)
    ax.bar(x, scaled(measured), color="tab:gray", alpha=0.5, label="measured gain (trained alone)")
    for key, style in (("coverage Q({ℓ})", "-o"), (NEWTON, "-^"), ("grad_norm", ":s")):
        if key in predictors:
            ax.plot(x, scaled(predictors[key]), style, markersize=4, label=key)
    ax.set_xlabel("layer")
    ax.set_ylabel("value / its maximum")
    ax.set_title(f"{name}: single-layer training vs the card's per-layer predictors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recipe_budget(search_dir: Path) -> float | None:
    """ρ = Σ lr_t of the recipe a search trained with (its ``search.json``); None when it has none."""
    from layercard.profile.adam_step import step_budget

    path = search_dir / "search.json"
    if not path.is_file():
        return None
    t = json.loads(path.read_text())["config"]["train"]
    return step_budget(t["lr"], t["steps"], t["warmup_steps"])


def main(argv: list[str] | None = None) -> int:
    from layercard.atomic import atomic_write_text
    from layercard.card.layer_card import LayerCard
    from layercard.errors import LayercardError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--search", required=True, help="a finished mode=per-layer search directory (holds card/)")
    p.add_argument("--name", required=True, help="output name: per_layer_<name>.{json,md,png}")
    p.add_argument("--top", type=int, default=5, help="k of the top-k overlap column")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    card_dir = Path(args.search) / "card"
    if not (card_dir / "card.json").is_file():
        raise SystemExit(f"error: {card_dir} holds no card: --search must be a finished search directory")
    card = LayerCard.load(card_dir, with_stats=False)
    search = card.meta.get("search") or {}
    if search.get("mode") != "per-layer" or "measured_gain" not in card.layers:
        raise SystemExit(f"error: {card_dir} is not the card of a finished mode=per-layer search "
                         f"(mode {search.get('mode')!r})")
    measured = card.layers["measured_gain"].to_numpy(np.float64)
    if np.isfinite(measured).sum() < 3:
        raise SystemExit(f"error: {card_dir} measures {int(np.isfinite(measured).sum())} layers; need ≥ 3")
    try:
        predictors = layer_predictors(card, recipe_budget(Path(args.search)))
    except LayercardError as e:
        raise SystemExit(f"error: {e}") from None
    rho = agreement(predictors, measured)
    ids = card.layer_ids
    meta = {"card_id": card.meta.get("parent_card_id"), "steps": search.get("steps"),
            "batch_size": search.get("batch_size"), "lr": search.get("lr"), "seeds": search.get("seeds"),
            "quality": search.get("quality", "eval_loss")}
    doc = {"name": args.name, **meta, "layers": [int(l) for l in ids], "measured_gain": measured.tolist(),
           "spearman": rho, "top": args.top,
           "top_overlap": {k: top_overlap(v, measured, args.top) for k, v in predictors.items()},
           "predictors": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in predictors.items()}}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text = markdown(args.name, ids, measured, predictors, rho, args.top, meta)
    atomic_write_text(results / f"per_layer_{args.name}.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(results / f"per_layer_{args.name}.md", text)
    plot(args.name, ids, measured, predictors, results / f"per_layer_{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
