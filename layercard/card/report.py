"""Render a Layer Card: a self-contained ``report.html`` (figures embedded as base64 PNG, no
scripts, no external resources) and ``card.md``, a section to paste into a Hugging Face model card.

Figures use matplotlib's Agg canvas directly (no pyplot), so rendering never touches a display
or the process-wide backend. Both files are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from layercard.atomic import atomic_write_text
from layercard.errors import LayercardError

MD_COLUMNS = [("res_frac", "res_frac"), ("gain_adj", "gain_adj"), ("kappa", "κ"), ("d_eff", "d_eff"),
              ("block_influence", "BI"), ("backprop_flops_per_token", "backprop FLOPs/tok"),
              ("step_seconds", "step s")]
HTML_COLUMNS = ["layer", "n_tokens", "res2", "res2_rank_r", "res_frac", "grad_norm", "energy", "kappa",
                "erank", "d_eff", "gain_adj", "gain_adj_rank_r", "block_influence", "b", "k_diag", "adapter_params",
                "adapter_flops_per_token", "backprop_flops_per_token", "act_bytes_per_token",
                "step_seconds", "peak_bytes", "step_measured"]


def default_top_k(num_layers: int) -> int:
    """About one layer in six (the paper adapts ~5 of Qwen3-8B's 36 layers), at least one."""
    return max(1, min(num_layers, round(num_layers / 6)))


def recommendation(card, selection: Sequence[int] | None = None, top_k: int | None = None) -> tuple[list[int], str]:
    """(layers, how): ``selection`` if given (validated); else, when the card has its coupling and
    cost columns, the card-guided max-quality set of k layers (what ``layercard select`` picks);
    else the top-k layers by noise-adjusted gain. Layers sorted."""
    if selection is not None:
        layers = sorted({int(l) for l in selection})
        if not layers:
            raise LayercardError("selection is empty: give at least one layer")
        card.positions(layers)
        return layers, "the given selection"
    card.require_columns(["gain_adj"], "profiling")
    k = default_top_k(len(card.layers)) if top_k is None else int(top_k)
    if not 1 <= k <= len(card.layers):
        raise LayercardError(f"top_k must be in 1..{len(card.layers)}, got {k}")
    from layercard.select import selection as sel

    try:
        arrays = sel.arrays_from_card(card)
    except LayercardError:
        arrays = None                  # no coupling pass or no cost columns: card-guided selection needs both
    if arrays is not None:
        return sorted(sel.select_max_quality(arrays, k=k).layers), \
            f"card-guided max-quality set of {k} layers, as `layercard select` picks it"
    order = card.layers.sort_values("gain_adj", ascending=False, kind="stable")
    return sorted(int(l) for l in order["layer"].head(k)), \
        f"top {k} by noise-adjusted gain gain_adj (the card lacks the coupling or cost that selection needs)"


def recommended_layers(card, selection: Sequence[int] | None = None, top_k: int | None = None) -> list[int]:
    """The layers of :func:`recommendation`."""
    return recommendation(card, selection, top_k)[0]


# ---------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None or (isinstance(x, (float, np.floating)) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{x:.4g}"
    return str(x)


def _column(card, name: str) -> np.ndarray | None:
    if name not in card.layers.columns:
        return None
    values = pd.to_numeric(card.layers[name], errors="coerce").to_numpy(np.float64)
    return values if np.isfinite(values).any() else None


def _lora_snippet(card, layers: list[int]) -> str:
    meta = card.meta
    targets = meta.get("target_modules") or []
    return (f"LoraConfig(r={meta.get('rank', 8)}, target_modules={targets!r}, "
            f"layers_to_transform={layers!r}, layers_pattern={meta.get('layers_pattern', 'layers')!r})")


def _write_atomic(path: Path, data: str) -> None:
    atomic_write_text(path, data)


# ---------------------------------------------------------------------------------------------
# Figures (each returns base64 PNG, or None when the card lacks the data)
# ---------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 8.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, np.atleast_1d(axes)


def _int_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _per_layer(ax, x, y, label: str, *, log: bool) -> None:
    ok = np.isfinite(y)
    ax.plot(x[ok], y[ok], marker="o", ms=3)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(_int_ticks())
    ax.set_ylabel(label)
    if log and ok.any() and (y[ok] > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def fig_pair(card, left: str, right: str, *, log_left: bool, log_right: bool) -> str | None:
    a, b = _column(card, left), _column(card, right)
    if a is None and b is None:
        return None
    x = np.asarray(card.layer_ids)
    fig, (ax1, ax2) = _figure(2)
    for ax, name, vals, log in ((ax1, left, a, log_left), (ax2, right, b, log_right)):
        if vals is None:
            ax.text(0.5, 0.5, f"{name} not in card", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            _per_layer(ax, x, vals, name + (" (log)" if log else ""), log=log)
    return _png(fig)


def coupling_computed(card) -> bool:
    rho = np.asarray(card.coupling, dtype=np.float64)
    return rho.size > 0 and np.isfinite(rho).any() and bool(np.any(np.nan_to_num(rho) != 0))


def fig_coupling(card) -> str | None:
    if not coupling_computed(card):
        return None
    ids = card.layer_ids
    rho = np.nan_to_num(np.asarray(card.coupling, dtype=np.float64))
    fig, (ax,) = _figure(1, width=5.6, height=4.6)
    im = ax.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, len(ids) // 12)
    ticks = list(range(0, len(ids), step))
    ax.set_xticks(ticks, [str(ids[i]) for i in ticks])
    ax.set_yticks(ticks, [str(ids[i]) for i in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("coupling ρ")
    ax.figure.colorbar(im, ax=ax, shrink=0.85)
    return _png(fig)


def fig_cost(card) -> str | None:
    back, adapt = _column(card, "backprop_flops_per_token"), _column(card, "adapter_flops_per_token")
    if back is None:
        return None
    from layercard.profile.cost import predicted_step_seconds

    x = np.asarray(card.layer_ids)
    fwd = float(card.meta.get("cost_model", {}).get("forward_flops_per_token", 0.0))
    total = fwd + back + (adapt if adapt is not None else 0.0)
    fig, (ax,) = _figure(1, height=3.8)
    ax.plot(x, total / 1e6, color="C0", marker="o", ms=3, label="analytic: fwd + backprop(ℓ) + adapter (MFLOPs/token)")
    ax.set_xlabel("lowest adapted layer ℓ (adapter on ℓ)")
    ax.xaxis.set_major_locator(_int_ticks())
    ax.set_ylabel("analytic MFLOPs / token", color="C0")
    ax.grid(alpha=0.3)
    steps = _column(card, "step_seconds")
    handles, labels = ax.get_legend_handles_labels()
    if steps is not None:
        ax2 = ax.twinx()
        measured = card.layers["step_measured"].to_numpy(bool) if "step_measured" in card.layers else np.ones(len(x), bool)
        ax2.plot(x, steps, color="C1", lw=1, ls=":", label="measured, interpolated (s/step)")
        ax2.plot(x[measured], steps[measured], "s", color="C1", label="measured (s/step)")
        if card.meta.get("cost_fit"):
            pred = [predicted_step_seconds(card, [l]) for l in x]
            r2 = card.meta.get("cost_r2")
            ax2.plot(x, pred, color="C2", lw=1, ls="--",
                     label=f"calibrated prediction (R²={_fmt(r2)})")
        ax2.set_ylabel("seconds / step", color="C1")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=2, frameon=False)
    return _png(fig)


def fig_top_gain(card, k: int) -> str | None:
    gain = _column(card, "gain_adj")
    if gain is None:
        return None
    top = card.layers.assign(_g=gain).sort_values("_g", ascending=False, kind="stable").head(k)
    fig, (ax,) = _figure(1, height=max(2.0, 0.32 * len(top) + 1.0))
    ax.barh([f"layer {int(l)}" for l in top["layer"]][::-1], top["_g"].to_numpy()[::-1], color="C2")
    ax.set_xlabel("noise-adjusted gain (gain_adj)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td.k{text-align:left;font-weight:600}img{max-width:100%}.note{color:#666}
code,pre{background:#f6f6f6;padding:1px 4px}pre{padding:.6em;overflow-x:auto}"""


def _img(b64: str | None, alt: str, missing: str) -> str:
    if b64 is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _meta_rows(card) -> list[tuple[str, str]]:
    m = card.meta
    keys = ["model_id", "weights_hash", "data_id", "data_hash", "tokenizer", "seq_len", "n_tokens", "rank",
            "ridge", "loss", "label_token_ids", "target_modules", "num_layers", "card_id", "created_at", "schema_version"]
    rows = [(k, _fmt(m[k]) if not isinstance(m[k], (list, dict)) else ", ".join(map(str, m[k])))
            for k in keys if m.get(k) is not None]
    if "cost_r2" in m:
        rows.append(("step-time R² (predicted vs measured)", _fmt(m["cost_r2"])))
    return rows


def render_html(card, layers: list[int], how: str, top_k: int) -> str:
    title = f"Layer Card — {card.meta.get('model_id', 'model')}"
    meta = "".join(f'<tr><td class="k">{html.escape(k)}</td><td style="text-align:left">{html.escape(v)}</td></tr>'
                   for k, v in _meta_rows(card))
    cols = [c for c in HTML_COLUMNS if c in card.layers.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(row[c]))}</td>" for c in cols) + "</tr>"
                   for _, row in card.layers.iterrows())
    cost_note = ""
    if card.meta.get("cost_fit"):
        cost_note = (f'<p class="note">Measured with an adapter on ℓ only; the calibrated model is '
                     f'seconds/step ≈ c·[1, backprop FLOPs from min(S), Σ adapter FLOPs], '
                     f'R² = {html.escape(_fmt(card.meta.get("cost_r2")))} on '
                     f'{card.meta["cost_fit"]["n_points"]} measured points.</p>')
    sections = [
        ("Residual strength", _img(fig_pair(card, "res2", "res_frac", log_left=True, log_right=False),
                                   "res2 and res_frac per layer", "res2 / res_frac not in card")),
        ("Activation energy and conditioning", _img(fig_pair(card, "energy", "kappa", log_left=True, log_right=True),
                                                    "energy and kappa per layer", "energy / kappa not in card")),
        ("Layer coupling", _img(fig_coupling(card), "coupling heatmap", "coupling not computed")),
        ("Cost vs lowest adapted layer", _img(fig_cost(card), "cost vs lowest adapted layer", "cost not computed")
         + cost_note),
        ("Top layers by noise-adjusted gain", _img(fig_top_gain(card, max(top_k, min(10, len(card.layers)))),
                                                    "top layers by gain_adj", "gain_adj not in card")),
    ]
    parts = [f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections]
    rec = (f"<h2>Recommended layers</h2><p>{html.escape(how)}: <code>layers_to_transform = {layers}</code></p>"
           f"<pre>{html.escape(_lora_snippet(card, layers))}</pre>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{meta}</table>
{rec}
{"".join(parts)}
<h2>Per-layer table</h2>
<table><tr>{head}</tr>{body}</table>
</body></html>
"""


def render_markdown(card, layers: list[int], how: str) -> str:
    m = card.meta
    cols = [(c, label) for c, label in MD_COLUMNS if _column(card, c) is not None]
    lines = [
        "## Layer Card",
        "",
        f"Profiled with layercard on {_fmt(m.get('n_tokens'))} tokens"
        + (f" of `{m['data_id']}`" if m.get("data_id") else "")
        + f"; LoRA rank {m.get('rank', '—')}, target modules {', '.join(f'`{t}`' for t in m.get('target_modules', []))}.",
        "",
        "| layer | " + " | ".join(label for _, label in cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for _, row in card.layers.iterrows():
        lines.append(f"| {int(row['layer'])} | " + " | ".join(_fmt(row[c]) for c, _ in cols) + " |")
    if m.get("cost_r2") is not None:
        lines += ["", f"Step-time model R² (predicted vs measured): {_fmt(m['cost_r2'])}."]
    lines += ["", f"**Recommended `layers_to_transform`**: `{layers}` ({how}).", "",
              "```python", "from peft import LoraConfig", "", _lora_snippet(card, layers), "```", ""]
    return "\n".join(lines)


def write_report(card, out_dir: str | Path, *, selection: Sequence[int] | None = None,
                 top_k: int | None = None) -> dict[str, Path]:
    """Write ``report.html`` and ``card.md`` into ``out_dir``; returns their paths."""
    if len(card.layers) == 0:
        raise LayercardError("card has no layers to report on")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayercardError(f"report output '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    layers, how = recommendation(card, selection, top_k)
    k = len(layers)
    paths = {"html": out / "report.html", "markdown": out / "card.md"}
    _write_atomic(paths["html"], render_html(card, layers, how, k))
    _write_atomic(paths["markdown"], render_markdown(card, layers, how))
    return paths
