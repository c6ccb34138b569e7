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
    styles = {"card-guided": dict(marker="o", color="tab:blue"), "baseline": dict(marker="s", color="tab:orange"),
              "both": dict(marker="D", color="tab:green")}
    for kind, style in styles.items():
        sel = [r for r in pts if _kind(r) == kind]
        if sel:
            ax.scatter([r["step_seconds"] for r in sel], [r["measured_gain"] for r in sel], label=kind, s=36,
                       zorder=3, **style)
    for r in pts:
        ax.annotate(f"{r['candidate']} {r['layers']}", (r["step_seconds"], r["measured_gain"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in pts if r["on_measured_front"]), key=lambda r: r["step_seconds"])
    if front:
        xs, ys = [r["step_seconds"] for r in front], [r["measured_gain"] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1, zorder=2)
        ax.scatter(xs, ys, s=130, facecolors="none", edgecolors="black", label="measured Pareto front", zorder=4)
    if not pts:
        ax.text(0.5, 0.5, "no trained candidate has a measured cost", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("measured seconds per training step (median)")
    ax.set_ylabel("measured gain (base eval loss − eval loss)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _kind(row: dict) -> str:
    return "both" if row["card_guided"] and row["baseline"] else "baseline" if row["baseline"] else "card-guided"
