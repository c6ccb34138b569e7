"""``python -m pipelines.demo --config configs/demo-smollm2.yaml --out runs/demo`` (what `make demo` runs)

fetch → profile (local Ray) → card + HTML report → select (max-quality k, min-cost target) → train
LoRA on each selection and on all layers with the same steps, data and seed → a side-by-side table.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from layercard.atomic import atomic_write_json, atomic_write_text
from layercard.config import load_config
from layercard.demo_config import DemoConfig
from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig
from layercard.train.config import TrainConfig
from layercard.runtime import parse_config, run_main


def _gib(values) -> float:
    values = values if isinstance(values, list) else [values]
    return max(v or 0 for v in values) / 2**30


BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "paper_table.json"


def _fmt(v, f: str) -> str:
    return f.format(v) if isinstance(v, (int, float)) else "-"


def comparison_table(rows: list[dict], base: dict | None = None) -> str:
    head = (f"{'run':<22} {'layers':>6} {'params':>9} {'eval loss':>9} {'label loss':>10} {'accuracy':>8} "
            f"{'step s':>7} {'× all':>6} {'peak GiB':>8}")
    all_step = next((r["median_step_s"] for r in rows if r["run"] == "all layers"), None)
    lines = [head, "-" * len(head)]
    if base:
        lines.append(f"{'base model (no LoRA)':<22} {0:>6} {0:>9} {_fmt(base.get('initial_eval_loss'), '{:.4f}'):>9} "
                     f"{_fmt(base.get('initial_label_loss'), '{:.4f}'):>10} {_fmt(base.get('initial_metric'), '{:.3f}'):>8}")
    for r in rows:
        fmt = _fmt
        ratio = r["median_step_s"] / all_step if all_step and r.get("median_step_s") else None
        lines.append(f"{r['run']:<22} {r['adapted_layers']:>6} {r.get('trainable_params', 0):>9} "
                     f"{fmt(r.get('eval_loss'), '{:.4f}'):>9} {fmt(r.get('label_loss'), '{:.4f}'):>10} "
                     f"{fmt(r.get('metric'), '{:.3f}'):>8} {fmt(r.get('median_step_s'), '{:.3f}'):>7} "
                     f"{fmt(ratio, '{:.2f}'):>6} {_gib(r.get('peak_memory_bytes') or 0):>8.2f}")
    return "\n".join(lines)


def _summary(rows: list[dict]) -> dict:
    import statistics

    q = [r["quality"] for r in rows]
    alike = [r for r in rows if r.get("shared_fraction") is None or r.get("reference_shared_fraction") is None
             or abs(r["shared_fraction"] - r["reference_shared_fraction"]) <= 0.5] or rows
    ratios = [r["step_time_ratio"] for r in alike if r.get("step_time_ratio") is not None]
    return {"layers": rows[0]["layers"], "quality": statistics.fmean(q), "sd": statistics.stdev(q) if len(q) > 1 else 0.0,
            "gain": statistics.fmean(r["gain_fraction"] for r in rows),
            "ratio": statistics.fmean(ratios) if ratios else None, "seeds": len(rows)}


def _layer_text(layers: list[int]) -> str:
    """[0, 1, 2, 7, 9, 10] → '0–2, 7, 9, 10' (runs of three or more as ranges)."""
    parts, run = [], []
    for x in sorted(layers) + [None]:
        if run and x == run[-1] + 1:
            run.append(x)
            continue
        parts += [f"{run[0]}–{run[-1]}"] if len(run) >= 3 else [str(v) for v in run]
        run = [x]
    return ", ".join(parts)


def benchmark_table(task: str, k: int, target: float, path: Path = BENCHMARK) -> str | None:
    """The committed benchmark's figures (``benchmarks/results/paper_table.json``) for the demo's three runs
    and for the best other set of k layers on ``task``, as a text table; None when the file has no such task."""
    try:
        table = [r for r in json.loads(Path(path).read_text()) if r.get("task") == task]
    except (OSError, ValueError):
        return None
    if not table:
        return None
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in table:
        groups.setdefault((r["strategy"], r["k"]), []).append(r)
    picks = [(f"card max-quality k={k}", ("card", k)),
             (f"card min-cost {target:g}", next((g for g in groups if g[0] == f"min-cost@{target:g}"), None)),
             ("all layers", next((g for g in groups if g[0] == "all"), None))]
    others = [g for g in groups if g[1] == k and g[0] not in ("card", "all") and not g[0].startswith("min-cost")]
    if others:
        best = min(others, key=lambda g: _summary(groups[g])["quality"])
        picks.append((f"best other k={k}: {best[0]}", best))
    name = table[0]["quality_name"].replace("_", " ")
    head = f"{'run':<30} {'layers':<22} {name:>15} {'gain fraction':>13} {'step × all':>10} {'seeds':>5}"
    lines = [head, "-" * len(head),
             f"{'base model (no LoRA)':<30} {'':<22} {table[0]['base_quality']:>15.4f} {0:>13.2f}"]
    for label, key in picks:
        if key not in groups:
            continue
        s = _summary(groups[key])
        lines.append(f"{label:<30} {_layer_text(s['layers']):<22} {s['quality']:>7.4f} ± {s['sd']:.4f} "
                     f"{s['gain']:>13.2f} {_fmt(s['ratio'], '{:.2f}'):>10} {s['seeds']:>5}")
    return "\n".join(lines)


SMOKE_NOTE = ("The demo's own runs: one seed, a short recipe, on this machine — a smoke test of the path, not a "
              "measurement of which layers are best.\nIts step times come from runs trained one after another, "
              "not side by side: '× all' also reflects whatever else the machine was doing.")


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_config(DemoConfig, argv, "python -m pipelines.demo", __doc__.splitlines()[0])
    out = Path(args.out)
    if cfg.fetch:
        from layercard.data.fetch import fetch_all
        from layercard.data.tasks import prepare_task

        fetch_all()
        for task in cfg.fetch:
            prepare_task(task)
    pcfg = load_config(ProfileConfig, cfg.profile_config, cfg.profile_overrides)
    tcfg_base = [*cfg.train_overrides]
    load_config(TrainConfig, cfg.train_config, [*tcfg_base, "strategy=all"])   # fail early on a bad train config

    from layercard.card.report import write_report
    from layercard.profile.run import run_profile
    from layercard.select.run import run_select
    from layercard.train.run import run_training

    card_dir = out / "card"
    if not (card_dir / "card.json").exists():
        run_profile(pcfg).save(card_dir)
    from layercard.card.layer_card import LayerCard

    card = LayerCard.load(card_dir, with_stats=False)
    write_report(card, out / "report")
    k = min(cfg.k, len(card.layers))
    selections = {f"card max-quality k={k}": {"objective": "max-quality", "k": k},
                  f"card min-cost {cfg.target:g}": {"objective": "min-cost", "target": cfg.target}}
    runs = []
    for name, sel_args in selections.items():
        sel_dir = out / "selections" / name.replace(" ", "_").replace("=", "")
        if not sel_dir.exists():
            run_select(card_dir, sel_dir, **sel_args)
        runs.append((name, [f"selection={sel_dir}"]))
    runs.append(("all layers", ["strategy=all"]))
    rows, base = [], None
    for name, extra in runs:
        run_dir = out / "train" / name.replace(" ", "_").replace("=", "")
        tcfg = load_config(TrainConfig, cfg.train_config, [f"base_eval_cache={out / 'train' / 'base_eval.json'}",
                                                          *tcfg_base, *extra, f"name={run_dir.name}"])
        if (run_dir / "metrics.json").is_file():       # finished by an earlier demo in this --out: reuse it
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            if run_dir.exists():                        # an interrupted run of the demo's own: start it again
                shutil.rmtree(run_dir)
            print(f"== training: {name}", flush=True)
            metrics = run_training(tcfg, run_dir)
        base = base or {k_: metrics.get(k_) for k_ in ("initial_eval_loss", "initial_label_loss", "initial_metric")}
        layers = metrics.get("selection_layers") or list(range(len(card.layers)))
        rows.append({"run": name, "adapted_layers": len(layers), "layers": layers,
                     "trainable_params": metrics.get("trainable_params"), "eval_loss": metrics.get("eval_loss"),
                     "label_loss": metrics.get("label_loss"), "metric": metrics.get("metric"),
                     "median_step_s": metrics.get("median_step_s"),
                     "peak_memory_bytes": metrics.get("peak_memory_bytes"), "adapter": str(run_dir / "adapter")})
    table = comparison_table(rows, base)
    text = f"{SMOKE_NOTE}\n\n{table}\n"
    bench = benchmark_table(cfg.benchmark, k, cfg.target) if cfg.benchmark else None
    if bench:
        text += (f"\nThe committed benchmark on the same task ({cfg.benchmark}; benchmarks/results/paper_table.json, "
                 "see benchmarks/README.md): longer training, 3 seeds, larger eval set, each run timed side by side "
                 "with its all-layer reference. These are the figures to judge the layer choice by.\n\n"
                 f"{bench}\n")
    atomic_write_json(out / "comparison.json", rows, default=str)
    atomic_write_text(out / "comparison.md", "```\n" + text + "```\n")
    print(text)
    print(f"\ncard: {card_dir}\nreport: {out / 'report' / 'report.html'}")
    for r in rows:
        print(f"adapter ({r['run']}): {r['adapter']}  layers {r['layers']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
