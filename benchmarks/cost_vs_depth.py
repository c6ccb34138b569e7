"""Does LoRA step time fall as the lowest adapted layer rises, as the cost model says?

    python benchmarks/cost_vs_depth.py                      # CPU preset: 8-layer qwen3, hidden 256
    python benchmarks/cost_vs_depth.py --preset gpu         # 24-layer qwen3, hidden 2048, bf16, CUDA
    python benchmarks/cost_vs_depth.py --model-path DIR     # a local Hugging Face model directory

Builds a randomly initialised model from a transformers config (nothing is downloaded), measures
real PEFT LoRA training steps (layercard.train.step_timing) with an adapter on ℓ alone at several ℓ and
on ℓ..L−1, fits the analytic cost model to them (layercard.profile.cost), prints a table and writes JSON
(default benchmarks/results/cost_vs_depth.json). The headline numbers are the measured and the
analytic ratio step(adapter on the last layer) / step(adapter on layer 0), and the R².
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layercard.profile import cost  # noqa: E402
from layercard.card.layer_card import LayerCard  # noqa: E402
from layercard.discovery import discover  # noqa: E402
from layercard.train.step_timing import StepTimingConfig, measure_card_cost  # noqa: E402

PRESETS = {
    "cpu": dict(config=dict(model_type="qwen3", hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=32, intermediate_size=768, vocab_size=2048),
                dtype="float32", batch=4, seq=128, points=4, steps=5, warmup=2, attn="eager"),
    "gpu": dict(config=dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=32000),
                dtype="bfloat16", batch=8, seq=512, points=5, steps=10, warmup=3, attn="sdpa"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(args, preset):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[args.dtype or preset["dtype"]]
    attn = args.attn or preset["attn"]
    if args.model_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, local_files_only=True,
                                                     attn_implementation=attn).to(args.device)
    else:
        kwargs = dict(preset["config"])
        hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        hf_config._attn_implementation = attn
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def skeleton_card(layout, rank: int) -> LayerCard:
    """A card with only the layer/module tables the cost columns need (no profiling pass)."""
    layers = pd.DataFrame({"layer": list(layout.layers)})
    modules = pd.DataFrame([{"layer": m.layer, "module": m.name, "target": m.target, "d_in": m.d_in,
                             "d_out": m.d_out} for m in layout.modules])
    meta = {"rank": rank, "target_modules": layout.targets, "block_path": layout.block_path,
            "layers_pattern": layout.layers_pattern, "layers": list(layout.layers)}
    L = len(layout.layers)
    return LayerCard(layers, modules, np.zeros((L, L)), None, meta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-path", default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--attn", default=None, help="attention implementation (eager, sdpa)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--points", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1 is steadiest on a shared box)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cost_vs_depth.json"))
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    batch_size, seq = args.batch or preset["batch"], args.seq or preset["seq"]

    t0 = time.perf_counter()
    model = build_model(args, preset)
    layout = discover(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    card = skeleton_card(layout, args.rank)
    cfg = StepTimingConfig(points=args.points or preset["points"], steps=args.steps or preset["steps"],
                           warmup=args.warmup if args.warmup is not None else preset["warmup"])
    measure_card_cost(card, model, batch, rank=args.rank, config=cfg, layout=layout)
    elapsed = time.perf_counter() - t0

    rows, fwd = [], card.meta["cost_model"]["forward_flops_per_token"]
    first = next(p_ for p_ in card.meta["step_timing"]["points"] if p_["layers"] == [layout.layers[0]])
    first_flops = cost.predicted_cost(card, first["layers"])["flops_per_token"]
    for pt in card.meta["step_timing"]["points"]:
        pred = cost.predicted_cost(card, pt["layers"])
        rows.append({"lowest": min(pt["layers"]), "n_adapted": len(pt["layers"]),
                     "step_s": pt["step_seconds"], "step_ratio": pt["step_seconds"] / first["step_seconds"],
                     "mflops_tok": pred["flops_per_token"] / 1e6, "flops_ratio": pred["flops_per_token"] / first_flops,
                     "peak_mb": (pt["peak_bytes"] or float("nan")) / 2**20,
                     "act_mb_analytic": float(card.layers.set_index("layer").loc[min(pt["layers"]),
                                                                               "act_bytes_per_token"]) * ids.numel() / 2**20,
                     "pred_s": pred["step_seconds"],
                     "iqr_s": float(np.subtract(*np.percentile(pt["times"], [75, 25])))})
    table = pd.DataFrame(rows)
    table = table.assign(_suffix=table["n_adapted"] > 1).sort_values(["_suffix", "lowest"]).drop(columns="_suffix")
    singles = table[table["n_adapted"] == 1].sort_values("lowest")
    last = singles.iloc[-1]
    summary = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "model": args.model_path or preset["config"], "dtype": str(next(model.parameters()).dtype),
        "num_layers": layout.num_layers, "batch": [batch_size, seq], "rank": args.rank,
        "ratio_last_over_first_measured": float(last["step_ratio"]),
        "ratio_last_over_first_analytic_flops": float(last["flops_ratio"]),
        "single_adapter_step_time_decreasing": bool((np.diff(singles["step_s"].to_numpy()) < 0).all()),
        "cost_r2": card.meta["cost_r2"], "cost_fit": card.meta["cost_fit"], "wall_seconds": elapsed,
        "points": table.to_dict(orient="records"),
    }
    with pd.option_context("display.width", 160, "display.float_format", lambda v: f"{v:.4g}"):
        print(table.to_string(index=False))
    print(f"\nstep(adapter on layer {int(last['lowest'])}) / step(adapter on layer {layout.layers[0]}): "
          f"measured {last['step_ratio']:.3f}, analytic FLOPs {last['flops_ratio']:.3f};  "
          f"R² = {card.meta['cost_r2']};  decreasing: {summary['single_adapter_step_time_decreasing']};  "
          f"{elapsed:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
