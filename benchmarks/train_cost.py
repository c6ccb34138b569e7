"""Measured LoRA training cost vs. the lowest adapted layer (DESIGN §1, Cost).

    python benchmarks/train_cost.py                      # 8-layer random Qwen3, 1 worker, ~5 min on 2 cores
    python benchmarks/train_cost.py --smoke              # tiny and quick
    python benchmarks/train_cost.py --card CARD_DIR      # + the card's predicted cost and R² (needs layercard.cost)

Runs the real pipeline (``pipelines.train.run``: Ray Train + DeepSpeed ZeRO) once per layer set:
``k`` adjacent layers starting at l0 = 0, L/4, L/2, 3L/4, and all layers. Frozen blocks below l0
need no backward, so step time and activation memory should fall as l0 rises. Writes
``benchmarks/results/train_cost.json`` and ``.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_config(layers: int, hidden: int) -> dict:
    heads = max(2, hidden // 32)
    return dict(model_type="qwen3", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads, intermediate_size=3 * hidden,
                vocab_size=256)


def layer_sets(L: int, k: int) -> list[tuple[str, list[int]]]:
    sets = []
    for name, l0 in (("l0=0", 0), ("l0=L/4", L // 4), ("l0=L/2", L // 2), ("l0=3L/4", 3 * L // 4)):
        sets.append((name, list(range(l0, min(L, l0 + k)))))
    sets.append(("all", list(range(L))))
    return sets


def write_selection(path: Path, layers: list[int], weights_hash: str, r: int) -> Path:
    from peft import LoraConfig

    LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               layers_to_transform=layers, layers_pattern="layers", r=r, lora_alpha=2 * r).save_pretrained(str(path))
    (path / "selection.json").write_text(json.dumps({"layers": layers, "weights_hash": weights_hash}))
    return path


def predicted(card_dir: str | None, layers: list[int]) -> float | None:
    """The card's predicted cost of a layer set, when a card and ``layercard.cost`` are available."""
    if not card_dir:
        return None
    try:
        from layercard.card import LayerCard
        from layercard.cost import predicted_cost
    except ImportError:
        return None
    value = predicted_cost(LayerCard.load(card_dir, with_stats=False), layers)
    return float(value["step_s"] if isinstance(value, dict) else value)


def r_squared(x: list[float], y: list[float]) -> float | None:
    """R² of the least-squares line y ≈ a + b·x (the squared Pearson correlation)."""
    import numpy as np

    if len(x) < 3:
        return None
    c = np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1]
    return float(c * c)


def table(rows: list[dict]) -> str:
    head = "| set | layers | lowest | median step s | × all | tokens/s | peak RSS MiB | trainable | predicted |"
    lines = [head, "|" + "---|" * 9]
    base = next(r for r in rows if r["set"] == "all")["median_step_s"]
    for r in rows:
        pred = f"{r['predicted']:.4g}" if r["predicted"] is not None else "–"
        lines.append(f"| {r['set']} | {r['layers'][0]}..{r['layers'][-1]} | {r['lowest']} | {r['median_step_s']:.4f} | "
                     f"{r['median_step_s'] / base:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['trainable']} | {pred} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=2, help="adjacent layers per set")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--card", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_cost.json"))
    p.add_argument("--smoke", action="store_true", help="8 layers, hidden 64, 4 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.steps, args.seq, args.batch_size = 64, 4, 32, 4
    if args.layers < 8:
        p.error("--layers must be >= 8")

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from layercard.data import DataConfig
    from layercard.models import ModelConfig, load_model
    from layercard.train_config import TrainConfig
    from pipelines import train

    mcfg = ModelConfig(config=model_config(args.layers, args.hidden))
    whash = load_model(mcfg).weights_hash
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, args.num_workers), include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, layers in layer_sets(args.layers, args.k):
            sel = write_selection(Path(tmp) / f"sel-{layers[0]}-{len(layers)}", layers, whash, args.rank)
            cfg = TrainConfig(model=mcfg, data=DataConfig(path=str(ROOT / "configs" / "data" / "tiny.jsonl"),
                                                          max_seq_len=args.seq),
                              selection=str(sel), steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                              warmup_steps=1, zero_stage=args.zero_stage, num_workers=args.num_workers,
                              checkpoint_every=10 ** 6, report_every=10 ** 6, max_failures=0, name=f"bench-{layers[0]}")
            m = train.run(cfg, Path(tmp) / f"run-{name}")
            rows.append({"set": name, "layers": layers, "lowest": layers[0], "median_step_s": m["median_step_s"],
                         "tokens_per_s": m["train_tokens_per_s"], "peak_mib": max(m["peak_memory_bytes"]) / 2 ** 20,
                         "peak_memory_bytes": m["peak_memory_bytes"], "trainable": m["trainable_params"],
                         "eval_loss": m["eval_loss"], "predicted": predicted(args.card, layers)})
            print(f"{name}: median step {m['median_step_s']:.4f} s", flush=True)
    preds = [(r["predicted"], r["median_step_s"]) for r in rows if r["predicted"] is not None]
    result = {"model": mcfg.config, "args": vars(args), "rows": rows,
              "r2_predicted_vs_measured": r_squared(*zip(*preds)) if len(preds) >= 3 else None,
              "versions": __import__("layercard.card", fromlist=["library_versions"]).library_versions()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = table(rows)
    out.with_suffix(".md").write_text(f"# Training cost vs. lowest adapted layer\n\n{md}\n\n"
                                      f"R² predicted vs measured: {result['r2_predicted_vs_measured']}\n")
    print(md)
    print(f"R² predicted vs measured: {result['r2_predicted_vs_measured']}  → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
