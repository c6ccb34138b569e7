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
from layercard.profile_config import ProfileConfig
from layercard.train_config import TrainConfig
from pipelines.common import parse_config, run_main


def _gib(values) -> float:
    values = values if isinstance(values, list) else [values]
    return max(v or 0 for v in values) / 2**30


def comparison_table(rows: list[dict]) -> str:
    head = (f"{'run':<22} {'layers':>6} {'params':>9} {'eval loss':>9} {'label loss':>10} {'accuracy':>8} "
            f"{'step s':>7} {'× all':>6} {'peak GiB':>8}")
    all_step = next((r["median_step_s"] for r in rows if r["run"] == "all layers"), None)
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "-")  # noqa: E731
        ratio = r["median_step_s"] / all_step if all_step and r.get("median_step_s") else None
        lines.append(f"{r['run']:<22} {r['adapted_layers']:>6} {r.get('trainable_params', 0):>9} "
                     f"{fmt(r.get('eval_loss'), '{:.4f}'):>9} {fmt(r.get('label_loss'), '{:.4f}'):>10} "
                     f"{fmt(r.get('metric'), '{:.3f}'):>8} {fmt(r.get('median_step_s'), '{:.3f}'):>7} "
                     f"{fmt(ratio, '{:.2f}'):>6} {_gib(r.get('peak_memory_bytes') or 0):>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_config(DemoConfig, argv, "python -m pipelines.demo", __doc__.splitlines()[0])
    out = Path(args.out)
    if cfg.fetch:
        from layercard.fetch import fetch_all
        from layercard.tasks import prepare_task

        fetch_all()
        for task in cfg.fetch:
            prepare_task(task)
    pcfg = load_config(ProfileConfig, cfg.profile_config, cfg.profile_overrides)
    tcfg_base = [*cfg.train_overrides]
    load_config(TrainConfig, cfg.train_config, [*tcfg_base, "strategy=all"])   # fail early on a bad train config

    from layercard.report import write_report
    from pipelines import select as select_cmd
    from pipelines import train as train_cmd
    from pipelines.profile import run_profile

    card_dir = out / "card"
    if not (card_dir / "card.json").exists():
        run_profile(pcfg).save(card_dir)
    from layercard.card import LayerCard

    card = LayerCard.load(card_dir, with_stats=False)
    write_report(card, out / "report")
    k = min(cfg.k, len(card.layers))
    selections = {f"card max-quality k={k}": ["--objective", "max-quality", "--k", str(k)],
                  f"card min-cost {cfg.target:g}": ["--objective", "min-cost", "--target", str(cfg.target)]}
    runs = []
    for name, sel_args in selections.items():
        sel_dir = out / "selections" / name.replace(" ", "_").replace("=", "")
        if not sel_dir.exists():
            select_cmd.main([str(card_dir), "--out", str(sel_dir), *sel_args])
        runs.append((name, [f"selection={sel_dir}"]))
    runs.append(("all layers", ["strategy=all"]))
    rows = []
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
            metrics = train_cmd.run(tcfg, run_dir)
        layers = metrics.get("selection_layers") or list(range(len(card.layers)))
        rows.append({"run": name, "adapted_layers": len(layers), "layers": layers,
                     "trainable_params": metrics.get("trainable_params"), "eval_loss": metrics.get("eval_loss"),
                     "label_loss": metrics.get("label_loss"), "metric": metrics.get("metric"),
                     "median_step_s": metrics.get("median_step_s"),
                     "peak_memory_bytes": metrics.get("peak_memory_bytes"), "adapter": str(run_dir / "adapter")})
    table = comparison_table(rows)
    atomic_write_json(out / "comparison.json", rows, default=str)
    atomic_write_text(out / "comparison.md", "```\n" + table + "\n```\n")
    print(table)
    print(f"\ncard: {card_dir}\nreport: {out / 'report' / 'report.html'}")
    for r in rows:
        print(f"adapter ({r['run']}): {r['adapter']}  layers {r['layers']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
