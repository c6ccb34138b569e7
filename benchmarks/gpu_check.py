"""GPU path check (run on a CUDA machine): bf16 profiling, forward-mode AD on CUDA attention
backends, sketched coupling, measured cost, NCCL — with real timings.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Uses a random-weight model of a real architecture built from its config (no download).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import numpy as np
import torch


def timed(fn, sync=True):
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def batches(vocab, n_batches, bs, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (bs, seq), generator=g)
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": ids.clone().cuda()})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args()
    from layercard.profile.coupling_pass import coupling_terms, layer_deltas, make_sketch
    from layercard.discovery import discover
    from layercard.models import ModelConfig, load_model
    from profile_overhead_gpu import plain_fwd_bwd_seconds   # benchmarks/ is sys.path[0]
    from layercard.profile.profiler import card_from_stats, collect_stats

    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    arch = dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=args.layers, intermediate_size=3072,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                tie_word_embeddings=True)   # Qwen3-0.6B's shape
    data = batches(arch["vocab_size"], 8, 8, 512)

    for dtype in ("bfloat16", "float32"):
        lm = load_model(ModelConfig(config=arch, dtype=dtype, device="cuda", attn_implementation="sdpa"))
        model = lm.model
        layout = discover(model)
        t_plain = plain_fwd_bwd_seconds(model, layout, data, lambda fn: timed(fn)[1])
        torch.cuda.reset_peak_memory_stats()
        stats, t_pass1 = timed(lambda: collect_stats(model, layout, data))
        peak = torch.cuda.max_memory_allocated()
        card, t_solve = timed(lambda: card_from_stats(layout, stats, rank=16, ridge=1e-3), sync=False)
        tokens = sum(int(b["attention_mask"].sum()) for b in data)
        row = {"tokens": tokens, "plain_fwd_bwd_s": t_plain, "pass1_s": t_pass1, "pass1_over_plain": t_pass1 / t_plain,
               "pass1_tokens_per_s": tokens / t_pass1, "solve_s": t_solve, "pass1_peak_gib": peak / 2**30,
               "res_frac": card.layers["res_frac"].tolist(), "kappa": card.layers["kappa"].tolist()}
        # pass 2: sketched directions through the JVP (eager switch inside directions.py)
        probe = batches(arch["vocab_size"], 2, 4, 256, seed=1)
        deltas = layer_deltas(model, layout, stats, rank=16, ridge=1e-3)
        sketch = make_sketch(arch["vocab_size"], 1024, 32768, 0)
        try:
            (K, b), t_pass2 = timed(lambda: coupling_terms(model, deltas, probe, list(layout.layers), sketch))
            row.update({"pass2_s": t_pass2, "pass2_layer_tokens_per_s": len(layout.layers) * 2 * 4 * 255 / t_pass2,
                        "b": b.tolist(), "k_diag": np.diag(K).tolist(),
                        "gain_singleton": (b ** 2 / (2 * np.diag(K))).tolist()})
        except Exception as err:  # noqa: BLE001 - recorded, the check goes on
            row["pass2_error"] = "".join(traceback.format_exception_only(type(err), err))
        res[dtype] = row
        print(dtype, {k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
        del model, lm, stats, card
        torch.cuda.empty_cache()

    # bf16 vs fp32 agreement of the layer ranking (what a user profiling in bf16 relies on)
    from scipy.stats import spearmanr
    for col in ("res_frac", "gain_singleton"):
        if col in res["bfloat16"] and col in res["float32"]:
            a, f = np.array(res["bfloat16"][col]), np.array(res["float32"][col])
            res[f"bf16_vs_fp32_{col}"] = {"spearman": float(spearmanr(a, f).statistic),
                                         "max_rel": float(np.max(np.abs(a - f) / np.abs(f)))}
    # forward-mode AD through CUDA SDPA backends
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, 8, 128, 64, device="cuda", dtype=torch.bfloat16)
    tq = torch.randn_like(q)
    for name, backend in [("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                torch.func.jvp(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True),
                               (q,), (tq,))
            res[f"jvp_sdpa_{name}"] = "ok"
        except Exception as err:  # noqa: BLE001
            res[f"jvp_sdpa_{name}"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    # NCCL, one rank
    try:
        import torch.distributed as dist
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
        x = torch.ones(1024, device="cuda")
        dist.all_reduce(x)
        res["nccl"] = f"ok, all_reduce sum {float(x.sum())}"
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001
        res["nccl"] = f"{type(err).__name__}: {err}"
    print({k: v for k, v in res.items() if k not in ("bfloat16", "float32")})
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
