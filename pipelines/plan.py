"""``layercard plan --config configs/qwen3-8b.yaml --gpus N --gpu-mem-gb M [--json FILE]``

Builds the model on ``meta`` (no weights, no memory), prints the memory per actor and layer slice
(pass 1 or its owner's solve, whichever is larger), the driver's memory and the slice owners' solve
time, and exits 2 if the actor layout cannot fit, saying how many GPUs it needs. A driver bigger than
``--head-mem-gb`` is a one-line warning (exit 0).
"""
from __future__ import annotations

import argparse
import sys

from layercard.config import load_config
from layercard.discovery import discover
from layercard.errors import LayercardError
from layercard.models import DTYPES, build_meta_model
from layercard.profile.plan import GIB, driver_memory, owner_solve_bytes, plan_layout, probe_rows_per_batch, probe_width
from layercard.profile.config import ProfileConfig, should_save_stats
from layercard.runtime import run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layercard plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem-gb", type=float, required=True)
    p.add_argument("--head-mem-gb", type=float, default=128.0,
                   help="memory of the node the driver runs on (default 128: cluster/'s head)")
    p.add_argument("--cpu-gflops", type=float, default=100.0,
                   help="float64 GFLOP/s assumed for a slice owner's eigh/SVD (default 100: a CPU; a GPU does more)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.gpus < 1 or args.gpu_mem_gb <= 0:
        raise LayercardError("--gpus must be >= 1 and --gpu-mem-gb > 0")
    if args.head_mem_gb <= 0 or args.cpu_gflops <= 0:
        raise LayercardError("--head-mem-gb and --cpu-gflops must be > 0")
    cfg = load_config(ProfileConfig, args.config, args.overrides)
    model = build_meta_model(cfg.model)
    layout = discover(model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    elt = DTYPES[cfg.model.dtype].itemsize
    weights = sum(t.numel() for t in {id(q): q for q in model.parameters()}.values()) * elt
    hc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    coupling, adam = cfg.coupling.enabled, cfg.coupling.enabled and cfg.coupling.adam
    plan = plan_layout(layout, weights_bytes=weights, hidden=hc.hidden_size, vocab=hc.vocab_size,
                       tokens=cfg.data.batch_size * cfg.data.max_seq_len, elt=elt, gpus=args.gpus,
                       gpu_mem_gb=args.gpu_mem_gb, seq_len=cfg.data.max_seq_len,
                       heads=hc.num_attention_heads if cfg.model.attn_implementation == "eager" else 0,
                       coupling=coupling, adam=adam)
    print(f"model {type(model).__name__}: {len(layout.layers)} layers, weights {weights / GIB:.1f} GiB ({cfg.model.dtype})")
    print(plan.table() if plan.fits else plan.table().splitlines()[0] + "\n" + "\n".join(plan.table().splitlines()[1:4]) + "\n  …")
    records = cfg.data.num_samples or 0
    drv = driver_memory(layout, plan.slices, coupling=coupling, adam=adam, records=records,
                        seq_len=cfg.data.max_seq_len,
                        rows_per_batch=probe_rows_per_batch(loss=cfg.profile.loss, batch_size=cfg.data.batch_size,
                                                            seq_len=cfg.data.max_seq_len),
                        width=probe_width(loss=cfg.profile.loss, answers=len(cfg.profile.label_answers or []),
                                          vocab=hc.vocab_size, sketch_dim=cfg.coupling.sketch_dim,
                                          sketch_above_vocab=cfg.coupling.sketch_above_vocab))
    solve_s = drv.solve_flops / (args.cpu_gflops * 1e9)
    print(f"driver: {drv.peak_bytes / GIB:.2f} GiB at peak ({drv.peak_phase}): token ids of {records} records "
          f"{drv.token_bytes / GIB:.2f}, card rows {drv.rows_bytes / GIB:.3f}, K {drv.k_bytes / GIB:.3f}, "
          f"a micro-batch of pass-2 directions {drv.chunk_bytes / GIB:.2f}")
    print(f"solve on the slice owners: {drv.solve_flops:.2e} float64 FLOPs on the largest slice (eigh solved "
          f"{drv.eigh_solves}×), ~{_duration(solve_s)} at an assumed {args.cpu_gflops:g} GFLOP/s")
    stats_bytes = sum(plan.stat_bytes)
    saved = should_save_stats(cfg.profile.save_stats, stats_bytes)
    print(f"statistics: {stats_bytes / GIB:.1f} GiB, " + ("written by the slice owners" if saved else "not written")
          + f" (profile.save_stats={_yaml(cfg.profile.save_stats)})")
    if args.json:
        _write_json(args.json, {
            "stats_file_bytes": stats_bytes if saved else 0,
            "driver_bytes": drv.peak_bytes, "actor_bytes": max(plan.per_actor_bytes),
            "actor_bytes_per_slice": plan.per_actor_bytes, "stat_bytes_per_slice": plan.stat_bytes,
            "owner_solve_bytes_per_slice": [owner_solve_bytes(layout, sl, coupling=coupling, adam=adam, elt=elt)
                                            for sl in plan.slices],
            "weights_bytes": weights, "layer_slices": plan.layer_slices, "replicas": plan.replicas,
            "slices": plan.slices, "fits": plan.fits, "gpus": args.gpus, "gpu_mem_gb": args.gpu_mem_gb,
            "driver_peak_phase": drv.peak_phase, "driver_phases_bytes": drv.phases,
            "driver_token_bytes": drv.token_bytes, "driver_rows_bytes": drv.rows_bytes,
            "driver_k_bytes": drv.k_bytes, "driver_chunk_bytes": drv.chunk_bytes, "head_mem_gb": args.head_mem_gb,
            "solve_flops": drv.solve_flops, "solve_s": solve_s, "cpu_gflops_assumed": args.cpu_gflops})
    if not plan.fits:
        need = f"at least {plan.gpus_needed} GPUs of {args.gpu_mem_gb:g} GB" if plan.gpus_needed else \
            f"GPUs with more than {args.gpu_mem_gb:g} GB (one layer per actor does not fit; lower data.batch_size)"
        raise LayercardError(f"layout does not fit on {args.gpus} × {args.gpu_mem_gb:g} GB: needs {need} "
                             f"(largest actor {max(plan.per_actor_bytes) / GIB:.1f} GiB)")
    print(f"fits: ray.num_actors={args.gpus} ray.layer_slices={plan.layer_slices} "
          f"({plan.replicas} data replica(s) per slice), ray.num_gpus_per_actor=1")
    if drv.peak_bytes > args.head_mem_gb * GIB:
        print(f"warning: the driver needs {drv.peak_bytes / GIB:.0f} GiB ({drv.peak_phase}), more than the head's "
              f"{args.head_mem_gb:g} GiB (--head-mem-gb): lower data.num_samples or coupling.probe_samples' "
              f"micro-batch (data.batch_size)", file=sys.stderr)
    return 0


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower()


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _write_json(path: str, obj: dict) -> None:
    import json
    from pathlib import Path

    try:
        Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    except OSError as err:
        raise LayercardError(f"cannot write --json '{path}': {err.strerror}") from None


if __name__ == "__main__":
    sys.exit(run_main(main))
