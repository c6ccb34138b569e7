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
    print(result_table(metrics))
    print(f"layercard train: wrote {args.out}: metrics.json, adapter/ (PeftModel.from_pretrained)")
    return 0


COLUMNS = (("adapter_layers", "layers", "{}"), ("steps", "steps", "{}"), ("final_train_loss", "train loss", "{:.4f}"),
           ("eval_loss", "eval loss", "{:.4f}"), ("label_loss", "label loss", "{:.4f}"), ("metric", "metric", "{:.4f}"),
           ("median_step_s", "s/step", "{:.3f}"), ("train_tokens_per_s", "tokens/s", "{:.0f}"))


def result_table(metrics: dict) -> str:
    """The run's result as a two-row markdown table (columns the run has a value for)."""
    cols = [(key, head, fmt) for key, head, fmt in COLUMNS if metrics.get(key) is not None]
    cells = [fmt.format(metrics[key]) for key, _, fmt in cols]
    return "\n".join(["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols),
                      "| " + " | ".join(cells) + " |"])


if __name__ == "__main__":
    sys.exit(run_main(main))   # --verbose like every command
