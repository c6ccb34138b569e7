"""The base model's eval numbers, computed once per model, eval set and setup and shared by every run
that trains on them (the demo's runs, a search's trials): each gain is measured against them."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from layercard.atomic import atomic_write_json

INITIAL_KEYS = ("eval_loss", "label_loss", "metric", "quality")


def base_eval_key(cfg, plan) -> str:
    """What the base model's eval numbers depend on: weights, eval examples and how they are batched,
    the label answers, dtype and device kind, workers (each sums its own eval shard). ``cfg`` is a
    :class:`~layercard.train.config.TrainConfig`, ``plan`` a :class:`~layercard.train.worker.Plan`."""
    import hashlib

    from layercard.data.examples import examples_hash

    ident = {"weights": plan.weights_hash, "eval": examples_hash(plan.eval), "labels": plan.label_token_ids,
             "accuracy": plan.with_accuracy, "dtype": cfg.model.dtype, "gpu": cfg.use_gpu,
             "workers": cfg.num_workers, "batch": cfg.batch_size}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def read_base_eval(path: str | Path | None, key: str) -> dict | None:
    """The cached ``initial_*`` metrics when ``path`` holds them for ``key`` (else None)."""
    try:
        data = json.loads(Path(path).read_text()) if path else None
    except (OSError, json.JSONDecodeError):
        return None
    return data["initial"] if isinstance(data, dict) and data.get("key") == key else None


def write_base_eval(path: str | Path | None, key: str, metrics: dict) -> None:
    """Keep a finished run's ``initial_*`` metrics (atomically; the first writer wins, later ones agree).
    Best effort: a path this process cannot write (a trial on another node of a cluster, a read-only
    directory) only means the next run evaluates the base model again."""
    initial = {f"initial_{k}": metrics.get(f"initial_{k}") for k in INITIAL_KEYS}
    if not path or initial["initial_eval_loss"] is None or read_base_eval(path, key) is not None:
        return
    with contextlib.suppress(OSError):
        atomic_write_json(path, {"key": key, "initial": initial})



