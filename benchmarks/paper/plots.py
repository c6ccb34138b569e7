"""The frontier figure of a task: measured gain fraction against measured step-time ratio per strategy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.paper.tables import grouped


def plot_frontier(rows: list[dict], task: str, path: Path) -> None:
    """Gain fraction vs step-time ratio, every strategy (± sd over seeds), the measured Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layercard.select.candidates import pareto_mask

    g = [r for r in grouped(rows) if r["task"] == task and r["gain_fraction"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"card": ("*", "tab:red", 220), "min-cost": ("P", "tab:purple", 120), "all": ("s", "black", 90)}
    for r in g:
        base = r["strategy"].split("@")[0]
        m, color, size = markers.get(base, ("o", "tab:gray", 50))
        ax.errorbar(r["step_time_ratio"], r["gain_fraction"], yerr=r["gain_fraction_sd"] or 0, fmt="none",
                    ecolor=color, alpha=0.5)
        ax.scatter(r["step_time_ratio"], r["gain_fraction"], marker=m, color=color, s=size, zorder=3)
        ax.annotate(f"{r['strategy']} k={r['k']}", (r["step_time_ratio"], r["gain_fraction"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    x = np.array([r["step_time_ratio"] for r in g])
    y = np.array([r["gain_fraction"] for r in g])
    front = pareto_mask(x, y)
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "--o", color="tab:red", alpha=0.6, markersize=16, markerfacecolor="none",
            label="measured Pareto front")   # circled points: visible even when one set dominates all others
    ax.set_xlabel("step-time ratio vs all layers (lower is cheaper)")
    ax.set_ylabel("gain fraction (1 = all layers)")
    ax.set_title(f"{task}: measured quality vs cost (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
