"""LoRA on the selected layers with Ray Train + DeepSpeed ZeRO, with measured cost.

    layercard train --config configs/train-tiny.yaml --out runs/train selection=SEL_DIR
    layercard train --config configs/train-tiny.yaml --out runs/train strategy=all zero_stage=3

Setup → fit → cleanup: the driver checks the inputs (selection made for this model, ZeRO stage,
workers vs. CPUs) before any Ray work, tokenizes the data into Ray Data, and runs
:func:`layercard.train.worker.train_func` on every worker. Writes ``OUT/metrics.json`` and ``OUT/adapter/`` (loads with
``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import argparse
import json
import sys

from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.runtime import run_main
from layercard.train.config import TrainConfig
from layercard.train.run import run_training


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="layercard train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (configs/train-*.yaml)")
    p.add_argument("--out", required=True, help="output dir: metrics.json and adapter/")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. selection=SEL_DIR or strategy=all")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, *extra])
        metrics = run_training(cfg, args.out)
    except LayercardError as err:
        print(f"layercard train: error: {err}", file=sys.stderr)
        return 2
    summary = {k: metrics.get(k) for k in ("steps", "final_train_loss", "eval_loss", "metric",
                                           "median_step_s", "train_tokens_per_s", "adapter_layers")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))   # --verbose like every command
