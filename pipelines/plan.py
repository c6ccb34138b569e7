"""``layercard plan --config configs/qwen3-8b.yaml --gpus N --gpu-mem-gb M``

Builds the model on ``meta`` (no weights, no memory), prints the statistics memory per layer
slice and the actor layout, and exits 2 if the layout cannot fit, saying how many GPUs it needs.
"""
from __future__ import annotations

import argparse
import sys

from layercard.config import load_config
from layercard.discovery import discover
from layercard.errors import LayercardError
from layercard.models import DTYPES, build_meta_model
from layercard.plan import GIB, plan_layout
from layercard.profile_config import ProfileConfig
from pipelines.common import run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layercard plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem-gb", type=float, required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.gpus < 1 or args.gpu_mem_gb <= 0:
        raise LayercardError("--gpus must be >= 1 and --gpu-mem-gb > 0")
    cfg = load_config(ProfileConfig, args.config, args.overrides)
    model = build_meta_model(cfg.model)
    layout = discover(model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    elt = DTYPES[cfg.model.dtype].itemsize
    weights = sum(t.numel() for t in {id(q): q for q in model.parameters()}.values()) * elt
    hc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    plan = plan_layout(layout, weights_bytes=weights, hidden=hc.hidden_size, vocab=hc.vocab_size,
                       tokens=cfg.data.batch_size * cfg.data.max_seq_len, elt=elt, gpus=args.gpus,
                       gpu_mem_gb=args.gpu_mem_gb, seq_len=cfg.data.max_seq_len,
                       heads=hc.num_attention_heads if cfg.model.attn_implementation == "eager" else 0)
    print(f"model {type(model).__name__}: {len(layout.layers)} layers, weights {weights / GIB:.1f} GiB ({cfg.model.dtype})")
    print(plan.table() if plan.fits else plan.table().splitlines()[0] + "\n" + "\n".join(plan.table().splitlines()[1:4]) + "\n  …")
    if not plan.fits:
        need = f"at least {plan.gpus_needed} GPUs of {args.gpu_mem_gb:g} GB" if plan.gpus_needed else \
            f"GPUs with more than {args.gpu_mem_gb:g} GB (one layer per actor does not fit; lower data.batch_size)"
        raise LayercardError(f"layout does not fit on {args.gpus} × {args.gpu_mem_gb:g} GB: needs {need} "
                             f"(largest actor {max(plan.per_actor_bytes) / GIB:.1f} GiB)")
    print(f"fits: ray.num_actors={args.gpus} ray.layer_slices={plan.layer_slices} "
          f"({plan.replicas} data replica(s) per slice), ray.num_gpus_per_actor=1")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
