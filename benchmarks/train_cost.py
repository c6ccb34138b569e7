"""Measured LoRA training cost vs. the lowest adapted layer (docs/design.md §1, Cost).

    python benchmarks/train_cost.py                      # 8-layer random Qwen3, 1 worker, ~8 min on 2 cores
    python benchmarks/train_cost.py --smoke              # hidden 64, 4 steps
    python benchmarks/train_cost.py --card CARD_DIR      # use this card's cost model instead of profiling one

Runs the real pipeline (``layercard.train.run.run_training``: Ray Train + DeepSpeed ZeRO) once per layer set:
``k`` adjacent layers starting at l0 = 0, L/4, L/2, 3L/4, and all layers. Frozen blocks below l0
need no backward, so step time and activation memory should fall as l0 rises. Writes
``benchmarks/results/train_cost.json`` and ``.md`` and prints the table, with the card's predicted
cost beside each set (a card of the same model is profiled first unless ``--card``/``--no-card``).
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


def profile_card(mcfg, rank: int, seq: int):
    """A card of the benchmark model (configs/tiny.yaml's data, no coupling pass) with its cost model."""
    from layercard.config import load_config
    from layercard.profile.config import ProfileConfig
    from layercard.profile.run import run_profile

    cfg = load_config(ProfileConfig, ROOT / "configs" / "tiny.yaml",
                      [f"model.config={json.dumps(mcfg.config)}", f"profile.rank={rank}", f"data.max_seq_len={seq}",
                       "coupling.enabled=false", "cost.points=4"])
    return run_profile(cfg, progress=False)


def predicted(card, layers: list[int]) -> dict:
    """The card's predicted cost of a layer set: calibrated seconds/step (None if the card timed
    nothing) and analytic FLOPs/token."""
    if card is None:
        return {"predicted_step_s": None, "predicted_flops_per_token": None}
    from layercard.profile.cost import predicted_cost

    cost = predicted_cost(card, layers)
    return {"predicted_step_s": cost.get("step_seconds"), "predicted_flops_per_token": cost["flops_per_token"]}


def r_squared(x: list[float], y: list[float]) -> float | None:
    """R² of the least-squares line y ≈ a + b·x (the squared Pearson correlation): the card predicts
    in-process step time or FLOPs, the pipeline measures Ray-worker step time, so only the shape is
    compared, not the scale."""
    import numpy as np

    if len(x) < 3:
        return None
    c = np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1]
    return float(c * c)


def table(rows: list[dict]) -> str:
    head = ("| set | layers | lowest | median step s | × all | tokens/s | peak RSS MiB | trainable "
            "| predicted step s | predicted GFLOPs/token |")
    lines = [head, "|" + "---|" * 10]
    base = next(r for r in rows if r["set"] == "all")["median_step_s"]
    for r in rows:
        fmt = lambda v, scale=1.0: f"{v / scale:.4g}" if v is not None else "–"  # noqa: E731
        lines.append(f"| {r['set']} | {r['layers'][0]}..{r['layers'][-1]} | {r['lowest']} | {r['median_step_s']:.4f} | "
                     f"{r['median_step_s'] / base:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['trainable']} | {fmt(r['predicted_step_s'])} | {fmt(r['predicted_flops_per_token'], 1e9)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=2, help="adjacent layers per set")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--card", default=None, help="card of this model (default: profile one here)")
    p.add_argument("--no-card", action="store_true", help="measure only, no predicted column")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_cost.json"))
    p.add_argument("--smoke", action="store_true", help="8 layers, hidden 64, 4 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.steps, args.seq, args.batch_size = 64, 4, 32, 4
    if args.layers < 8:
        p.error("--layers must be >= 8")

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from layercard.data.examples import DataConfig
    from layercard.models import ModelConfig, load_model
    from layercard.train.config import TrainConfig
    from layercard.train.run import run_training

    mcfg = ModelConfig(config=model_config(args.layers, args.hidden))
    whash = load_model(mcfg).weights_hash
    card = None
    if args.card:
        from layercard.card.layer_card import LayerCard

        card = LayerCard.load(args.card, with_stats=False)
    elif not args.no_card:
        card = profile_card(mcfg, args.rank, args.seq)
    if card is not None and card.meta.get("weights_hash") not in (None, whash):
        p.error(f"--card was profiled on another model (weights {card.meta.get('weights_hash')}, this one {whash})")
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
            m = run_training(cfg, Path(tmp) / f"run-{name}")
            rows.append({"set": name, "layers": layers, "lowest": layers[0], "median_step_s": m["median_step_s"],
                         "tokens_per_s": m["train_tokens_per_s"], "peak_mib": max(m["peak_memory_bytes"]) / 2 ** 20,
                         "peak_memory_bytes": m["peak_memory_bytes"], "trainable": m["trainable_params"],
                         "eval_loss": m["eval_loss"], "initial_eval_loss": m["initial_eval_loss"]})
            rows[-1].update(predicted(card, layers))
            print(f"{name}: median step {m['median_step_s']:.4f} s", flush=True)
    measured = [r["median_step_s"] for r in rows]

    def r2_of(key: str) -> float | None:
        pred = [r[key] for r in rows]
        return r_squared(pred, measured) if None not in pred else None

    result = {"model": mcfg.config, "args": vars(args), "rows": rows, "card_id": card.card_id if card else None,
              "r2_step_s": r2_of("predicted_step_s"), "r2_flops": r2_of("predicted_flops_per_token"),
              "versions": __import__("layercard.card.layer_card", fromlist=["library_versions"]).library_versions()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = table(rows)
    r2 = f"R² vs measured median step time: predicted step s {result['r2_step_s']}, FLOPs/token {result['r2_flops']}"
    out.with_suffix(".md").write_text(f"# Training cost vs. lowest adapted layer\n\n{md}\n\n{r2}\n")
    print(md)
    print(f"{r2}  → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
