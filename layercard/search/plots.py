"""The search's figure: measured gain against measured seconds per step."""
from __future__ import annotations

from pathlib import Path


def write_frontier_png(rows: list[dict], path: Path, title: str) -> None:
    """Measured gain vs measured seconds/step of the trained candidates; baselines marked, front drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = [r for r in rows if r["status"] == "trained" and r["step_seconds"] is not None
           and r["measured_gain"] is not None]
    styles = {"card-guided": dict(marker="o", color="tab:blue"), "card neighbour": dict(marker="o", color="lightsteelblue"),
              "baseline": dict(marker="s", color="tab:orange"), "both": dict(marker="D", color="tab:green"),
              "stratified random": dict(marker="^", color="tab:gray"), "given": dict(marker="P", color="tab:purple")}
    n_layers = max((len(r["layers"]) for r in rows), default=0)
    for kind, style in styles.items():
        sel = [r for r in pts if _kind(r) == kind]
        if sel:
            ax.scatter([r["step_seconds"] for r in sel], [r["measured_gain"] for r in sel], label=kind, s=36,
                       zorder=3, **style)
    for r in pts:
        label = layer_label(r["layers"], n_layers)
        ax.annotate(r["candidate"] if label == r["candidate"] else f"{r['candidate']} {label}",
                    (r["step_seconds"], r["measured_gain"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in pts if r["on_measured_front"]), key=lambda r: r["step_seconds"])
    if front:
        xs, ys = [r["step_seconds"] for r in front], [r["measured_gain"] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1, zorder=2)
        ax.scatter(xs, ys, s=130, facecolors="none", edgecolors="black", label="measured Pareto front", zorder=4)
    if not pts:
        ax.text(0.5, 0.5, "no trained candidate has a measured cost", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("measured seconds per training step (median)")
    quality = next((r.get("quality_name") for r in pts if r.get("quality_name")), None) or "eval_loss"
    ax.set_ylabel(f"measured gain (base − final {quality.replace('_', ' ')})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def layer_label(layers, n_layers: int) -> str:
    """``[12, 13, 14, 15, 16]`` → ``12–16``; ``[2, 9, 10, 11]`` → ``2,9–11``; every layer → ``all``."""
    layers = sorted(int(l) for l in layers)
    if n_layers and len(layers) == n_layers and layers == list(range(layers[0], layers[0] + n_layers)):
        return "all"
    runs: list[list[int]] = []
    for l in layers:
        if runs and l == runs[-1][-1] + 1:
            runs[-1].append(l)
        else:
            runs.append([l])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def _kind(row: dict) -> str:
    labels = list(row.get("labels") or [])
    if row["card_guided"] and labels and all(l.startswith(("shift", "swap")) for l in labels):
        return "card neighbour"
    if not row["card_guided"] and labels and all(l.startswith("given") for l in labels):
        return "given"
    if not row["card_guided"] and not row["baseline"] or labels and all(l.startswith("stratified") for l in labels):
        return "stratified random"
    return "both" if row["card_guided"] and row["baseline"] else "baseline" if row["baseline"] else "card-guided"
