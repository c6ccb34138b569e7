"""The table's text: rows grouped over seeds (means ± sd), the card's predictions against the measured
ranking, and paper_table.md."""
from __future__ import annotations


import numpy as np

from benchmarks.paper.rows import set_key


def _mean_sd(values) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


UNEVEN = 0.5   # a trial and its reference whose shared fractions differ by more: their step-time ratio is biased


def uneven_sharing(row: dict) -> bool:
    a, b = row.get("shared_fraction"), row.get("reference_shared_fraction")
    return a is not None and b is not None and abs(a - b) > UNEVEN


def grouped(rows: list[dict]) -> list[dict]:
    """Means and sds over seeds per (task, strategy, k), in a stable order."""
    order = ["card", "min-cost", "top", "bottom", "mid", "uniform", "random", "grad-norm", "block-influence", "all"]
    keys = sorted({(r["task"], *set_key(r)) for r in rows},
                  key=lambda x: (x[0], order.index(x[1].split("@")[0]) if x[1].split("@")[0] in order else 99,
                                 x[1], x[2] or "", x[3]))
    out = []
    for task, strategy, score, k in keys:
        rs = [r for r in rows if (r["task"], *set_key(r)) == (task, strategy, score, k)]
        g = {"task": task, "strategy": strategy, "score": score, "k": k, "n_seeds": len(rs), "layers": rs[0]["layers"],
             "quality_name": rs[0]["quality_name"]}
        for col in ("quality", "gain_fraction", "accuracy", "peak_mem_ratio", "predicted_gain_fraction",
                    "base_quality"):
            g[col], g[f"{col}_sd"] = _mean_sd(r[col] for r in rs)
        # step-time ratios over the seeds whose trial and reference shared the machine alike, if any did
        even = [r for r in rs if not uneven_sharing(r)]
        g["uneven_sharing"] = not even
        g["step_time_ratio"], g["step_time_ratio_sd"] = _mean_sd(r["step_time_ratio"] for r in (even or rs))
        g["n_even_seeds"] = len(even)
        out.append(g)
    return out


LOW = 2   # a set that adapts a layer at or below this index reaches the first blocks (see prediction_agreement)


RIVALS = ("grad_norm", "gain_adj", "res2")   # card columns whose plain sum over a set is a free predictor


def card_rivals(card) -> dict:
    """name → layers → the plain sum of a loaded card's column over the set (no coupling, no cost): the
    free predictors the card's set prediction should beat (see :func:`prediction_agreement`)."""
    cols = card.layers.set_index("layer")
    return {f"Σ {c}": (lambda layers, v=cols[c]: float(v.loc[list(layers)].sum())) for c in RIVALS if c in cols}


def prediction_agreement(groups: list[dict], rivals: dict | None = None) -> dict:
    """How the card's predicted gain fractions agree with the measured ones (seed means) over one task's
    sets other than all layers: Spearman ρ over every set and within each k holding ≥ 3 sets, and how many
    sets trained better than predicted — among all of them and among those adapting a layer ≤ ``LOW``.
    ``rivals`` (name → layers → score, e.g. :func:`card_rivals`): the same ρ over every set for each."""
    from layercard.select.candidates import spearman

    sets = [g for g in groups if g["strategy"] != "all" and g["gain_fraction"] is not None
            and g["predicted_gain_fraction"] is not None]

    def rho(gs, score=lambda g: g["predicted_gain_fraction"]):
        return {"spearman": spearman([score(g) for g in gs], [g["gain_fraction"] for g in gs]), "n_sets": len(gs)}

    def above(gs):
        return {"n_above": sum(g["gain_fraction"] > g["predicted_gain_fraction"] for g in gs), "n_sets": len(gs)}

    by_k = {k: [g for g in sets if g["k"] == k] for k in sorted({g["k"] for g in sets})}
    return {"all": rho(sets), "by_k": {k: rho(gs) for k, gs in by_k.items() if len(gs) >= 3},
            "above_prediction": above(sets),
            "above_prediction_low": above([g for g in sets if min(g["layers"]) <= LOW]),
            "rivals": {name: rho(sets, lambda g, f=f: f(g["layers"])) for name, f in (rivals or {}).items()}}


def agreement_line(a: dict) -> str:
    def r(x):
        return "–" if x["spearman"] is None else f"{x['spearman']:+.2f}"

    by_k = ", ".join(f"k = {k}: {r(x)} ({x['n_sets']})" for k, x in a["by_k"].items())
    up, low = a["above_prediction"], a["above_prediction_low"]
    return (f"Predicted vs measured gain fraction (seed means, sets other than all layers): Spearman ρ {r(a['all'])} "
            f"over {a['all']['n_sets']} sets" + (f"; within one k: {by_k}" if by_k else "") + ". "
            f"{up['n_above']} of {up['n_sets']} sets trained better than predicted; of the {low['n_sets']} that adapt "
            f"a layer ≤ {LOW}, {low['n_above']}."
            + (" Free predictors (a card column summed over the set, no coupling), ρ over the same sets: "
               + ", ".join(f"{name} {r(x)}" for name, x in a["rivals"].items()) + "." if a.get("rivals") else ""))


def _fmt(mean, sd, spec=".3f") -> str:
    if mean is None:
        return "–"
    return f"{mean:{spec}}" + (f" ± {sd:{spec}}" if sd is not None else "")


def markdown(rows: list[dict], meta: dict) -> str:
    when = "rebuilt from the finished searches" if meta.get("rebuild") else f"{meta['runtime_min']:.0f} min this run"
    lines = [f"# Paper table ({meta['machine']}, {when})", ""]
    if meta.get("command"):
        lines += [f"This run: `{meta['command']}` at commit {meta.get('commit')}; the rows merge every finished "
                  "search of each task (their records: `benchmarks/results/searches/`).", ""]
    for task in sorted({r["task"] for r in rows}):
        g = [r for r in grouped(rows) if r["task"] == task]
        qname = g[0]["quality_name"].replace("_", " ")
        seed_spread = next((r["quality_sd"] for r in g if r["strategy"] == "all"), None)
        trained = meta.get("search_minutes", {}).get(task)
        lines += [f"## {task} (quality = {qname}, lower is better; base model {_fmt(g[0]['base_quality'], None, '.4f')}; "
                  f"all-layer seed sd {_fmt(seed_spread, None, '.4f') if seed_spread is not None else '–'}"
                  + (f"; trials took {trained:.0f} min" if trained is not None else "")
                  + (f" in {n} searches" if (n := len(meta.get("searches", {}).get(task, []))) > 1 else "")
                  + (f" ({u} of them untimed)" if (u := len(meta.get("untimed_searches", {}).get(task, []))) else "")
                  + ")", "",
                  "| strategy | k | layers | quality | gain fraction | predicted gain fraction | accuracy | "
                  "step-time ratio | peak-mem ratio | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in g:
            name = r["strategy"] if r.get("score") is None else f"{r['strategy']} ({r['score']})"
            lines.append(f"| {name} | {r['k']} | {r['layers']} | {_fmt(r['quality'], r['quality_sd'], '.4f')} | "
                         f"{_fmt(r['gain_fraction'], r['gain_fraction_sd'])} | {_fmt(r['predicted_gain_fraction'], None)} | "
                         f"{_fmt(r['accuracy'], r['accuracy_sd'])} | "
                         f"{_fmt(r['step_time_ratio'], r['step_time_ratio_sd'], '.2f')}{' †' * r['uneven_sharing']} | "
                         f"{_fmt(r['peak_mem_ratio'], r['peak_mem_ratio_sd'], '.2f')} | {r['n_seeds']} |")
        if any(r["uneven_sharing"] for r in g):
            lines += ["", f"† in every seed, the trial and its all-layer reference did not share the machine "
                          f"alike (their fractions of time beside another trial differ by more than {UNEVEN}): one "
                          "ran mostly alone, so this step-time ratio is biased (low if the trial ran alone, high if "
                          "the reference did). Elsewhere the ratio averages only the seeds that shared alike."]
        agreement = meta.get("prediction_agreement", {}).get(task) or prediction_agreement(g)
        lines += ["", agreement_line(agreement), ""]
    return "\n".join(lines)
