"""Profiling overhead: wall time of pass 1 (and 1+2) over one plain forward+backward of the same tokens.

    python benchmarks/profile_overhead.py [--layers 8 --hidden 256 --records 256 --repeats 3]

Single process (one model, built once: the statistics collection, the solve for the card, and the
coupling pass timed apart) and on a local Ray with 1 and 2 actors (end to end, actor start-up and
model load included: what a user waits for), side by side in one run (this machine is noisy:
compare ratios, not seconds). Also the GEMM-FLOP floor of pass 1: the statistics are A = XᵀX per
input group and C = XᵀG per module (docs/design.md §1), i.e. one weight-gradient GEMM per module plus a
d_in² Gram per input — for an MLP down-projection (d_in = 4·hidden here) the Gram alone is 4× its
forward GEMM. So pass 1 cannot cost less than (plain + statistics FLOPs) / plain FLOPs times a plain
forward+backward, however it is implemented. Writes benchmarks/results/profile_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from layercard.config import load_config
from layercard.data.examples import batches_of, load_examples
from layercard.discovery import discover
from layercard.train.losses import lm_loss_sum
from layercard.profile.cost import backprop_flops_from, dims_from_model, forward_flops_per_token
from layercard.profile.coupling_pass import coupling_pass
from layercard.models import load_model
from layercard.profile.config import ProfileConfig
from layercard.profile.profiler import card_from_stats, collect_stats
from layercard.profile.run import probe_batches, sketch_for

ROOT = Path(__file__).resolve().parents[1]


def overrides(args) -> list[str]:
    h = args.hidden
    return [f"model.config={{model_type: qwen3, hidden_size: {h}, num_hidden_layers: {args.layers}, "
            f"num_attention_heads: 8, num_key_value_heads: 4, head_dim: {h // 8}, intermediate_size: {4 * h}, "
            f"vocab_size: 512}}",
            f"data.path={ROOT / 'configs/data/tiny.jsonl'}", "data.prompt_column=null", "data.answer_column=null",
            f"data.num_samples={args.records}", "data.max_seq_len=64", "data.batch_size=16",
            "coupling.probe_samples=32", "cost.measure=false",
            "ray.num_cpus_per_actor=1"]  # 2 actors on 2 CPUs


def plain_forward_backward(cfg) -> float:
    """The same tokens, the same backward depth (from the first block's input), no hooks."""
    lm = load_model(cfg.model)
    batches = batches_of(load_examples(cfg.data, lm.tokenizer), cfg.data.batch_size, lm.tokenizer.pad_id)
    block0 = lm.model.get_submodule(discover(lm.model).block_path)[0]

    def pre(module, args, kwargs):
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    h = block0.register_forward_pre_hook(pre, with_kwargs=True)
    t0 = time.perf_counter()
    for b in batches:
        out = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        lm_loss_sum(out.logits, b["labels"]).backward()
    h.remove()
    return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flop_floor(lm, layout, batches, stats) -> dict:
    """GEMM FLOPs of a plain forward + activation backward (padded slots, as the model computes them)
    and of the statistics (real tokens only), from the shapes; their ratio bounds pass 1 / plain."""
    dims = dims_from_model(lm.model, layout.block_path)
    seq = int(batches[0]["input_ids"].shape[1])
    slots = sum(int(b["input_ids"].numel()) for b in batches)
    plain = slots * (forward_flops_per_token(dims, seq) + backprop_flops_from(dims, 0, seq))
    gram = sum(2 * stats.n[g] * a.shape[0] ** 2 for g, a in stats.A.items())
    cross = sum(2 * stats.n[stats.group_of[k]] * c.shape[0] * c.shape[1] for k, c in stats.C.items())
    return {"plain_flops": plain, "gram_flops": gram, "cross_flops": cross,
            "floor_ratio": (plain + gram + cross) / plain, "statistics_gemm_s": statistics_gemm_seconds(stats)}


def statistics_gemm_seconds(stats) -> float:
    """Wall time of the statistics GEMMs alone on random data of the same shapes (every token of a
    group or module in one GEMM, no hooks, no copies): what pass 1 must add to a plain
    forward+backward on this machine, however the collection is written."""
    total = 0.0
    for g, a in stats.A.items():
        x = torch.randn(stats.n[g], a.shape[0])
        total += timed(lambda: x.T @ x)
    for k, c in stats.C.items():
        n = stats.n[stats.group_of[k]]
        x, y = torch.randn(n, c.shape[0]), torch.randn(n, c.shape[1])
        total += timed(lambda: x.T @ y)
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    base = overrides(args)
    cfg = load_config(ProfileConfig, ROOT / "configs/tiny.yaml", base)
    lm = load_model(cfg.model)
    examples = load_examples(cfg.data, lm.tokenizer)
    batches = batches_of(examples, cfg.data.batch_size, lm.tokenizer.pad_id)
    layout = discover(lm.model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    held = {}

    def collect():
        held["stats"] = collect_stats(lm.model, layout, batches)

    def solve():
        held["eigs"] = {}
        held["card"] = card_from_stats(layout, held["stats"], rank=cfg.profile.rank, ridge=cfg.profile.ridge,
                                       eigs=held["eigs"])

    def couple():
        coupling_pass(lm.model, layout, held["card"], probe_batches(cfg, examples, lm.tokenizer.pad_id),
                      sketch=sketch_for(cfg, lm.model.config.vocab_size), eigs=held["eigs"])

    runs = {"plain fwd+bwd": lambda: plain_forward_backward(cfg),
            "single: pass 1 statistics": collect, "single: pass 1 solve": solve, "single: pass 2": couple}
    if not args.no_ray:
        import ray

        from layercard.profile.distributed import profile_on_ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for n in (1, 2):
            for pass2 in (False, True):
                c = load_config(ProfileConfig, ROOT / "configs/tiny.yaml",
                                base + [f"ray.num_actors={n}", f"coupling.enabled={str(pass2).lower()}"])
                runs[f"ray {n} actor(s): pass 1{'+2' if pass2 else ''}"] = (lambda c=c: profile_on_ray(c, progress=False))
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):   # interleaved, so drift in machine load hits every row alike
        for name, fn in runs.items():
            rows.setdefault(name, []).append(timed(fn))
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["single: pass 1 (statistics + solve)"] = med["single: pass 1 statistics"] + med["single: pass 1 solve"]
    med["single: pass 1+2"] = med["single: pass 1 (statistics + solve)"] + med["single: pass 2"]
    plain = med["plain fwd+bwd"]
    floor = flop_floor(lm, layout, batches, held["stats"])
    table = [{"run": k, "median_s": v, "ratio_to_plain": v / plain, "times_s": rows.get(k)} for k, v in med.items()]
    print(f"{'run':<36} {'median s':>9} {'× plain':>8}")
    for r in table:
        print(f"{r['run']:<36} {r['median_s']:>9.2f} {r['ratio_to_plain']:>8.2f}")
    floor["time_floor_ratio"] = (plain + floor["statistics_gemm_s"]) / plain
    print(f"floor of pass 1 statistics / plain: FLOPs {floor['floor_ratio']:.2f}× (Gram "
          f"{floor['gram_flops'] / floor['plain_flops']:.2f}, XᵀG {floor['cross_flops'] / floor['plain_flops']:.2f} "
          f"of the plain GEMM FLOPs); time {floor['time_floor_ratio']:.2f}× (plain + the statistics GEMMs alone, "
          f"{floor['statistics_gemm_s']:.2f}s); measured {med['single: pass 1 statistics'] / plain:.2f}×")
    import sys

    from layercard.atomic import atomic_write_json

    sys.path.insert(0, str(ROOT))
    from benchmarks.provenance import commit

    out = ROOT / "benchmarks/results/profile_overhead.json"
    atomic_write_json(out, {"command": "python benchmarks/profile_overhead.py " + " ".join(sys.argv[1:]), "commit": commit(),
                            "args": vars(args), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                            "torch": torch.__version__, "n_tokens": held["stats"].n_tokens,
                            "flop_floor": floor, "rows": table}, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
