"""Profiling overhead: wall time of pass 1 (and 1+2) over one plain forward+backward of the same tokens.

    python benchmarks/profile_overhead.py [--layers 8 --hidden 256 --records 256 --repeats 3]

Single process and on a local Ray with 1 and 2 actors, measured side by side in one run (this
machine is noisy: compare ratios, not seconds). Ray times include actor start-up (model load), which
is what a user waits for. Writes benchmarks/results/profile_overhead.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from layercard.config import load_config
from layercard.data import batches_of, load_examples
from layercard.discovery import discover
from layercard.losses import lm_loss_sum
from layercard.models import load_model
from layercard.profile_config import ProfileConfig
from pipelines.profile import add_coupling_local, profile_local

ROOT = Path(__file__).resolve().parents[1]


def overrides(args) -> list[str]:
    h = args.hidden
    return [f"model.config={{model_type: qwen3, hidden_size: {h}, num_hidden_layers: {args.layers}, "
            f"num_attention_heads: 8, num_key_value_heads: 4, head_dim: {h // 8}, intermediate_size: {4 * h}, "
            f"vocab_size: 512}}",
            f"data.path={ROOT / 'configs/data/tiny.jsonl'}", "data.prompt_column=null", "data.answer_column=null",
            f"data.num_samples={args.records}", "data.max_seq_len=64", "data.batch_size=16",
            "coupling.probe_samples=32", "cost.measure=false",
            "ray.num_cpus_per_actor=0.5"]  # 2 actors + Ray Data's shuffle on 2 CPUs


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
    rows = {}

    def single(pass2: bool):
        card, lm, ex = profile_local(cfg, progress=False)
        if pass2:
            add_coupling_local(card, cfg, lm, ex, progress=False)

    runs = {"plain fwd+bwd": lambda: plain_forward_backward(cfg),
            "single: pass 1": lambda: single(False), "single: pass 1+2": lambda: single(True)}
    if not args.no_ray:
        import ray

        from pipelines.ray_profile import profile_on_ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for n in (1, 2):
            for pass2 in (False, True):
                c = load_config(ProfileConfig, ROOT / "configs/tiny.yaml",
                                base + [f"ray.num_actors={n}", f"coupling.enabled={str(pass2).lower()}"])
                runs[f"ray {n} actor(s): pass 1{'+2' if pass2 else ''}"] = (lambda c=c: profile_on_ray(c, progress=False))
    for _ in range(args.repeats):   # interleaved, so drift in machine load hits every row alike
        for name, fn in runs.items():
            rows.setdefault(name, []).append(timed(fn))
    plain = statistics.median(rows["plain fwd+bwd"])
    table = [{"run": k, "median_s": statistics.median(v), "ratio_to_plain": statistics.median(v) / plain,
              "times_s": v} for k, v in rows.items()]
    print(f"{'run':<28} {'median s':>9} {'× plain':>8}")
    for r in table:
        print(f"{r['run']:<28} {r['median_s']:>9.2f} {r['ratio_to_plain']:>8.2f}")
    out = ROOT / "benchmarks/results/profile_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                               "torch": torch.__version__, "rows": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
