"""LoRA trials one after another in one process, without Ray: the loop every Ray Train worker runs
(:func:`layercard.train.worker.train_loop`) on one device, fed the same batches in the same order.

For a single machine where starting a Ray Train worker group per trial costs more than the trial (a
60-step SmolLM2-135M run takes seconds on a GPU), and for checking a Ray run: a seed gives the same
steps and losses on both (``tests/train/test_local.py``). No resume: a trial interrupted here starts over.

    from layercard.train.local import run_trials
    rows = run_trials(base, [{"key": "mid-s0", "layers": [12, 13, 14], "lora": lora, "seed": 0}], plan)

``base`` is the :class:`~layercard.train.worker.WorkerConfig` a search or ``layercard train`` would hand
its workers; each trial replaces its ``layers``, ``lora`` and ``seed``, as a search trial does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
from pathlib import Path

from layercard.train.worker import Plan, WorkerConfig, train_loop


class RowShard:
    """A list of tokenized examples read as a Ray Data shard is (``iter_batches`` in numpy format): in
    order, ``batch_size`` rows at a time, the last batch short."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy"):
        import numpy as np

        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i:i + batch_size]
            yield {"input_ids": [np.asarray(r["input_ids"]) for r in chunk],
                   "labels": [np.asarray(r["labels"]) for r in chunk]}


class LocalHost:
    """:func:`train_loop`'s host in this process: rank 0 of 1 on ``device``, the datasets as lists, every
    report kept in :attr:`reports`; the final checkpoint's adapter is copied to ``adapter_dir`` if given."""

    rank, world = 0, 1

    def __init__(self, device, datasets: dict[str, list[dict]], adapter_dir: str | Path | None = None):
        self.device = device
        self.datasets = datasets
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.reports: list[dict] = []

    def shard(self, name: str) -> RowShard:
        return RowShard(self.datasets[name])

    @contextlib.contextmanager
    def resume_dir(self):
        yield None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and name and name.endswith("_final") and self.adapter_dir is not None:
            shutil.copytree(Path(checkpoint_dir) / "adapter", self.adapter_dir, dirs_exist_ok=True)

    def commit_reports(self) -> None:
        pass


def default_device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def init_process_group(device) -> None:
    """A one-process torch.distributed group (DeepSpeed needs one), once per process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def run_trial(base: WorkerConfig, trial: dict, plan: Plan, *, rung_eval: list[dict] | None = None,
              adapter_dir: str | Path | None = None, device=None) -> list[dict]:
    """Train one trial (``layers``, ``lora``, ``seed`` replacing ``base``'s) here; its reports, the last
    one the final metrics (those a Ray trial reports)."""
    device = device or default_device()
    init_process_group(device)
    cfg = dataclasses.replace(base, **{k: trial[k] for k in ("layers", "lora", "seed") if k in trial})
    datasets = {"train": plan.train, "eval": plan.eval, **({"rung_eval": rung_eval} if rung_eval else {})}
    host = LocalHost(device, datasets, adapter_dir)
    train_loop(cfg, host)
    _release(device)
    return host.reports


def run_trials(base: WorkerConfig, trials: list[dict], plan: Plan, *, device=None, on_result=None) -> list[dict]:
    """:func:`run_trial` over ``trials`` in order; the base model's eval is measured once and reused (as
    a search's base-eval cache does). One row per trial: its ``key`` and final metrics; ``on_result(row)``
    is called as each finishes (to write it down before the next starts)."""
    from layercard.train.base_eval import INITIAL_KEYS

    rows = []
    for trial in trials:
        metrics = run_trial(base, trial, plan, device=device)[-1]
        if base.initial_eval is None:
            base = dataclasses.replace(base, initial_eval={f"initial_{k}": metrics[f"initial_{k}"] for k in INITIAL_KEYS})
        row = {"key": trial.get("key"), "layers": trial.get("layers"), "seed": trial.get("seed"), **metrics}
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
