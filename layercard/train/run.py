"""LoRA on the selected layers with Ray Train + DeepSpeed ZeRO, with measured cost: the driver.

Setup → fit → cleanup: the driver checks the inputs (selection made for this model, ZeRO stage,
workers vs. CPUs) before any Ray work, tokenizes the data into Ray Data, and runs
:func:`layercard.train.worker.train_func` on every worker. Writes ``OUT/metrics.json`` and
``OUT/adapter/`` (loads with ``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from layercard.atomic import atomic_dir, atomic_write_json, check_private, private_dir
from layercard.errors import LayercardError
from layercard.runtime import alive_nodes, check_storage_reachable, connect_ray
from layercard.train.base_eval import base_eval_key, read_base_eval, write_base_eval
from layercard.train.config import TrainConfig
from layercard.train.worker import Plan, prepare, train_func, worker_config


def check_resources(cfg: TrainConfig) -> None:
    """Error out (instead of waiting forever for resources) when the cluster cannot fit the workers."""
    import ray

    total = ray.cluster_resources()
    need = cfg.num_workers * cfg.cpus_per_worker
    have = total.get("CPU", 0.0)
    if need > have + 1e-9:
        raise LayercardError(f"num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker} needs "
                             f"{need:g} CPUs but the Ray cluster has {have:g}")
    if cfg.use_gpu and cfg.num_workers > total.get("GPU", 0.0):
        raise LayercardError(f"num_workers={cfg.num_workers} GPU workers but the Ray cluster has "
                             f"{total.get('GPU', 0.0):g} GPUs")


def fit(cfg: TrainConfig, plan: Plan, storage_dir: Path):
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # per-step bars drown the worker logs

    def dataset(rows: list[dict]):
        return ray.data.from_items(rows, override_num_blocks=max(cfg.num_workers, min(len(rows), 4 * cfg.num_workers)))

    key = base_eval_key(cfg, plan)
    loop = dataclasses.replace(worker_config(cfg, plan, storage_dir),
                               initial_eval=read_base_eval(cfg.base_eval_cache, key))
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(storage_path=str(storage_dir), name=cfg.name,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset(plan.train), "eval": dataset(plan.eval)},
    )
    result = trainer.fit()
    if not result.error and result.metrics:
        write_base_eval(cfg.base_eval_cache, key, result.metrics)
    return result


def run_training(cfg: TrainConfig, out: str | Path) -> dict:
    """Check inputs, train, and write ``OUT/metrics.json`` and ``OUT/adapter/``; returns the metrics."""
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise LayercardError(f"output '{out}' already exists (choose another --out: a finished run is never replaced)")
    storage = Path(cfg.storage_path).expanduser().resolve() if cfg.storage_path else out / "ray"
    # A run already under storage_path is resumed, and resuming unpickles its DeepSpeed checkpoint:
    # only a directory nobody else can write to is trusted.
    check_private(storage / cfg.name, "training run")
    plan = prepare(cfg)                       # bad selection / data fail here, before Ray starts
    connect_ray(cfg.address)
    check_storage_reachable(str(storage), alive_nodes(), "storage_path", uri_ok=False)
    check_resources(cfg)
    out.mkdir(parents=True)
    private_dir(storage)
    t0 = time.perf_counter()
    print(f"training: {cfg.steps} steps on {cfg.num_workers} Ray Train worker(s), adapted layers "
          f"{plan.layers if plan.layers else 'all'} ...", flush=True)
    result = fit(cfg, plan, storage)
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    if result.checkpoint is None or not result.metrics:
        raise LayercardError(f"training run '{cfg.name}' finished without a final report")
    with result.checkpoint.as_directory() as d, atomic_dir(out / "adapter") as tmp:
        shutil.copytree(Path(d) / "adapter", tmp, dirs_exist_ok=True)
    metrics = {**result.metrics, "wall_time_s": wall, "model_id": plan.model_id, "weights_hash": plan.weights_hash,
               "selection": cfg.selection, "strategy": cfg.strategy, "selection_layers": plan.layers,
               "card_id": plan.card_id, "checkpoint": result.checkpoint.path,
               "config": dataclasses.asdict(cfg)}
    atomic_write_json(out / "metrics.json", metrics, default=str)
    return metrics
