"""Pass-1 overhead on a GPU: profiling wall time over one plain forward+backward, bf16 and fp32,
with the statistics GEMMs on tensor cores (bf16 in, float32 accumulate) and with the old float32
upcast — and how far the two sets of statistics differ.

    python benchmarks/profile_overhead_gpu.py --out benchmarks/results/profile_overhead_h200.json

A random-weight model of a real architecture (Qwen3-0.6B's shape by default), built from its config.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
}


def timed(fn, repeats: int):
    out, best = None, float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def make_batches(vocab: int, n: int, bs: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (bs, seq), generator=g).cuda()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def plain_fwd_bwd_seconds(model, layout, data: list[dict], time_fn) -> float:
    """``time_fn(fn)`` of one plain forward+backward over ``data`` (after a warm-up pass), the
    backward stopping at block 0's input as profiling's does: the baseline of every overhead ratio."""
    from layercard.train.losses import lm_loss_sum

    block0 = model.get_submodule(layout.block_path)[0]
    handle = block0.register_forward_pre_hook(lambda m, a, k: ((a[0].detach().requires_grad_(True), *a[1:]), k),
                                              with_kwargs=True)

    def plain():
        for b in data:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            lm_loss_sum(out.logits, b["labels"]).backward()

    try:
        plain()
        return time_fn(plain)
    finally:
        handle.remove()


def rel(a: dict, b: dict) -> float:
    return max(float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(b[k])) for k in a)


def run_shape(name: str, dtype: str, data: list[dict], repeats: int) -> dict:
    from scipy.stats import spearmanr

    from layercard.discovery import discover
    from layercard.models import ModelConfig, load_model
    from layercard.profile.profiler import card_from_stats, collect_stats

    model = load_model(ModelConfig(config=SHAPES[name], dtype=dtype, device="cuda", attn_implementation="sdpa")).model
    layout = discover(model)
    t_plain = plain_fwd_bwd_seconds(model, layout, data, lambda fn: timed(fn, repeats)[1])
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    row = {"model": name, "dtype": dtype, "tokens": tokens, "plain_fwd_bwd_s": t_plain}
    cards = {}
    for half_gemm in ((True, False) if dtype != "float32" else (True,)):
        collect_stats(model, layout, data[:1], half_gemm=half_gemm)      # warm-up
        torch.cuda.reset_peak_memory_stats()
        stats, t = timed(lambda: collect_stats(model, layout, data, half_gemm=half_gemm), repeats)
        key = "tensor_core" if half_gemm else "fp32_upcast"
        row[f"pass1_{key}_s"] = t
        row[f"pass1_{key}_over_plain"] = t / t_plain
        row[f"pass1_{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        cards[key] = (stats, card_from_stats(layout, stats, rank=16, ridge=1e-3))
    if len(cards) == 2:
        (s1, c1), (s2, c2) = cards["tensor_core"], cards["fp32_upcast"]
        row["max_rel_diff_A"] = rel(s1.A, s2.A)
        row["max_rel_diff_C"] = rel(s1.C, s2.C)
        row["res_frac_spearman"] = float(spearmanr(c1.layers["res_frac"], c2.layers["res_frac"]).statistic)
        row["res_frac_max_rel"] = float(np.max(np.abs(c1.layers["res_frac"] - c2.layers["res_frac"])
                                               / np.abs(c2.layers["res_frac"])))
    print(json.dumps(row), flush=True)
    return row


def trace(name: str, dtype: str, data: list[dict]) -> None:
    """Where pass 1's time goes beyond the plain forward+backward: the top CUDA ops."""
    from torch.profiler import ProfilerActivity, profile

    from layercard.discovery import discover
    from layercard.models import ModelConfig, load_model
    from layercard.profile.profiler import collect_stats

    model = load_model(ModelConfig(config=SHAPES[name], dtype=dtype, device="cuda", attn_implementation="sdpa")).model
    layout = discover(model)
    collect_stats(model, layout, data[:1])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        collect_stats(model, layout, data)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="profile_overhead_gpu.json")
    p.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--trace", action="store_true", help="print the top CUDA ops of pass 1 (torch.profiler) and exit")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False   # float32 means float32 here
    data = make_batches(151936, args.batches, args.batch_size, args.seq)
    if args.trace:
        trace(args.shapes[0], args.dtypes[0], data)
        return
    rows = []
    for name in args.shapes:
        for dtype in args.dtypes:
            rows.append(run_shape(name, dtype, data, args.repeats))
            torch.cuda.empty_cache()
            res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
            with open(args.out, "w") as f:           # after every row: a cut-short run keeps what it measured
                json.dump(res, f, indent=2)
    print(f"\n{'model':<12} {'dtype':<9} {'plain s':>8} {'pass1 TC ×':>10} {'pass1 fp32-upcast ×':>20} {'ΔA rel':>8} {'ΔC rel':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['dtype']:<9} {r['plain_fwd_bwd_s']:>8.3f} {r['pass1_tensor_core_over_plain']:>10.2f} "
              f"{r.get('pass1_fp32_upcast_over_plain', float('nan')):>20.2f} {r.get('max_rel_diff_A', float('nan')):>8.1e} "
              f"{r.get('max_rel_diff_C', float('nan')):>8.1e}")


if __name__ == "__main__":
    main()
