"""LoRA on the selected layers with Ray Train + DeepSpeed ZeRO, with measured cost.

    layercard train --config configs/train-tiny.yaml --out runs/train selection=SEL_DIR
    layercard train --config configs/train-tiny.yaml --out runs/train strategy=all zero_stage=3

Setup → fit → cleanup: the driver checks the inputs (selection made for this model, ZeRO stage,
workers vs. CPUs) before any Ray work, tokenizes the data into Ray Data, and runs
:func:`train_func` on every worker. Writes ``OUT/metrics.json`` and ``OUT/adapter/`` (loads with
``PeftModel.from_pretrained``).

:func:`train_func` reads everything from its ``config`` dict (built by :func:`worker_config`), so
the layer-subset search reuses it per trial and may vary ``layers``, ``lr``, ``zero_stage`` ...
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from layercard.atomic import atomic_dir, atomic_write_json, check_private, private_dir
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.train.label_loss import check_answer_tokens
from layercard.train.config import TrainConfig

FAULT_MARKER = ".fault_injected"


# --------------------------------------------------------------------------- setup (no Ray)
@dataclasses.dataclass
class Plan:
    """What the driver prepares before any Ray work: identity checks passed, data tokenized."""

    model_id: str
    weights_hash: str
    pad_id: int
    lora: dict | None                  # a selection's LoraConfig dict; None for strategy=all
    layers: list[int] | None           # the selection's layers (None: all)
    card_id: str | None
    train: list[dict]
    eval: list[dict]
    with_accuracy: bool
    label_token_ids: list[int] | None = None
    sequences: dict | None = None      # how the training data's sequences are built (data.sequence_format)


def split_eval(examples: list[dict], fraction: float, seed: int, num_workers: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the last ``fraction`` is held out (at least one example per worker)."""
    import random

    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_eval = max(num_workers, round(fraction * len(examples)))
    if len(examples) - n_eval < num_workers:
        raise LayercardError(f"data has {len(examples)} examples: too few to hold out {n_eval} for eval "
                             f"and give each of {num_workers} workers a training example")
    return examples[:-n_eval], examples[-n_eval:]


def prepare(cfg: TrainConfig) -> Plan:
    from layercard.train import training
    from layercard.data.examples import check_sequence_format, load_examples, sequence_format

    tokenizer, model_id, weights_hash = training.model_identity(cfg.model)
    sequences = sequence_format(tokenizer, cfg.data)
    lora, layers, card_id = None, None, None
    if cfg.selection:
        sel = training.read_selection(cfg.selection)
        training.check_selection_for_model(sel, weights_hash)
        check_sequence_format(sel.sequences, sequences, f"selection '{sel.path}' (card {sel.card_id})")
        lora, layers, card_id = sel.lora, sel.layers, sel.card_id
    train = load_examples(cfg.data, tokenizer)
    if cfg.eval_data is not None:
        evals = load_examples(cfg.eval_data, tokenizer)
        if len(evals) < cfg.num_workers:
            raise LayercardError(f"eval_data has {len(evals)} examples, fewer than num_workers={cfg.num_workers}")
    else:
        train, evals = split_eval(train, cfg.eval_fraction, cfg.seed, cfg.num_workers)
    if len(train) < cfg.num_workers:
        raise LayercardError(f"data has {len(train)} training examples, fewer than num_workers={cfg.num_workers}")
    eval_cfg = cfg.eval_data or cfg.data
    label_ids = check_answer_tokens(cfg.label_answers, tokenizer, evals, "eval") if cfg.label_answers else None
    if cfg.loss == "label":
        check_answer_tokens(cfg.label_answers, tokenizer, train, "training")
    return Plan(model_id, weights_hash, int(tokenizer.pad_id), lora, layers, card_id, train, evals,
                with_accuracy=eval_cfg.prompt_column is not None, label_token_ids=label_ids, sequences=sequences)


def worker_config(cfg: TrainConfig, plan: Plan, storage_dir: Path) -> dict:
    """The plain dict :func:`train_func` reads (JSON-able; Tune may replace any value)."""
    return {
        "model": dataclasses.asdict(cfg.model),
        "lora": plan.lora,                     # LoraConfig dict, or None → every layer (strategy=all)
        "layers": plan.layers,                 # overrides lora's layers_to_transform when not None
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "zero_stage": cfg.zero_stage,
        "ds_overrides": cfg.ds_overrides,
        "ds_shm_op": cfg.ds_shm_op,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "grad_clip": cfg.grad_clip,
        "weight_decay": cfg.weight_decay,
        "checkpoint_every": cfg.checkpoint_every,
        "report_every": cfg.report_every,
        "eval_every": cfg.eval_every,
        "seed": cfg.seed,
        "pad_id": plan.pad_id,
        "with_accuracy": plan.with_accuracy,
        "label_token_ids": plan.label_token_ids,
        "loss": cfg.loss,                      # lm | label (the label loss over label_token_ids)
        "fail_at_step": cfg.fail_at_step,
        "fault_marker": str(storage_dir / cfg.name / FAULT_MARKER),
        "initial_eval": None,                  # the base model's eval numbers, when already known
        "rung_eval_every": None,               # steps between rung evals on the "rung_eval" dataset (explore)
    }


# --------------------------------------------------------------------------- the base model's eval, once
INITIAL_KEYS = ("eval_loss", "label_loss", "metric", "quality")


def base_eval_key(cfg: TrainConfig, plan: Plan) -> str:
    """What the base model's eval numbers depend on: weights, eval examples and how they are batched,
    the label answers, dtype and device kind, workers (each sums its own eval shard)."""
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


# --------------------------------------------------------------------------- the Ray Train worker
def _batches_once(shard, batch_size: int, pad_id: int):
    """One pass over a Ray Data shard of tokenized examples, as padded micro-batches."""
    from layercard.data.examples import collate

    for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield collate([{"input_ids": list(ids), "labels": list(lab)}
                       for ids, lab in zip(rows["input_ids"], rows["labels"])], pad_id)


def _batches(shard, batch_size: int, pad_id: int, skip: int = 0):
    """Endless micro-batches, epoch after epoch; the first ``skip`` are dropped (a resumed run
    continues where its checkpoint left off)."""
    while True:
        seen = 0
        for batch in _batches_once(shard, batch_size, pad_id):
            seen += 1
            if skip:
                skip -= 1
                continue
            yield batch
        if seen == 0:
            raise LayercardError("a training worker got an empty data shard")


def _all_sum(values: dict[str, float], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _maybe_fail(config: dict, step: int, rank: int) -> None:
    """Test-only: rank 0 dies at ``fail_at_step`` once per run (a marker file stops the retry failing)."""
    if config.get("fail_at_step") != step or rank != 0:
        return
    marker = Path(config["fault_marker"])
    if marker.exists():
        return
    # The controller registers a reported checkpoint when it next polls the workers: a kill within that
    # window would lose the last one, and the retry would start elsewhere on a fast machine than on a slow
    # one. Wait until every report so far is committed, so the retry resumes from the last checkpoint.
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker killed at step {step}\n")
    os._exit(1)  # a hard kill, like a lost node: no exception handling, no cleanup


def _build_engine(config: dict, device, world: int):
    """Frozen base → PEFT LoRA on the configured layers (depth guard checked) → DeepSpeed engine."""
    import deepspeed

    from layercard.train import training
    from layercard.models import ModelConfig, load_model

    model_cfg = ModelConfig(**config["model"])
    base = load_model(model_cfg).model
    lora = config["lora"] or training.all_layers_lora(
        base, config["lora_r"], config.get("lora_alpha"), config.get("lora_dropout") or 0.0, model_cfg.block_path)
    model = training.build_lora_model(base, lora, layers=config.get("layers"), alpha=config.get("lora_alpha"),
                                      dropout=config.get("lora_dropout"), block_path=model_cfg.block_path)
    info = {"adapter_layers": training.adapted_layers(model, model_cfg.block_path),
            "trainable_params": training.trainable_parameters(model)}
    model.to(device).train()
    ds_config = training.deepspeed_config(
        zero_stage=config["zero_stage"], lr=config["lr"], warmup_steps=config["warmup_steps"], steps=config["steps"],
        batch_size=config["batch_size"], world_size=world, bf16=device.type == "cuda",
        grad_clip=config["grad_clip"], weight_decay=config["weight_decay"], overrides=config.get("ds_overrides"))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    return engine, info


def _train_step(engine, batch: dict, device, label_ids=None) -> tuple[float, int]:
    """One optimizer step on one micro-batch: (mean loss over supervised tokens — or, with
    ``label_ids``, the mean label loss over examples —, non-pad tokens)."""
    import torch

    from layercard.train.losses import loss_count, supervised_loss_sum

    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    loss = supervised_loss_sum(engine, ids, mask, labels, label_ids) / max(loss_count(labels, label_ids), 1)
    engine.backward(loss)
    engine.step()  # clips, steps AdamW and the warm-up/decay schedule
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss.item(), int(mask.sum())


def train_func(config: dict) -> None:
    """One Ray Train worker: PEFT LoRA under DeepSpeed ZeRO, fed by this worker's Ray Data shard.

    Reads everything from ``config`` (see :func:`worker_config`). Reports metrics every
    ``report_every`` steps, a checkpoint (DeepSpeed state + step) every ``checkpoint_every``, and at
    the end the run's cost and quality with the adapter in the final checkpoint. Resumes from
    ``ray.train.get_checkpoint()`` after a worker-group restart.
    """
    entered = time.perf_counter()
    import torch

    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    from layercard.train import training

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    training.skip_shm_op_build(force=not config.get("ds_shm_op", False))
    torch.manual_seed(config["seed"])
    engine, info = _build_engine(config, device, world)
    steps, bs, pad = config["steps"], config["batch_size"], config["pad_id"]
    train_label_ids = config["label_token_ids"] if config.get("loss", "lm") == "label" else None

    start, client = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, load_module_strict=False)
            start = int(client["step"])
    batches = _batches(ray.train.get_dataset_shard("train"), bs, pad, skip=start)
    eval_shard = ray.train.get_dataset_shard("eval")

    def run_eval() -> dict:
        engine.eval()
        fwd = lambda ids, mask: engine(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        sums = training.evaluate(fwd, _batches_once(eval_shard, bs, pad), device, config.get("label_token_ids"))
        engine.train()
        return training.eval_metrics(_all_sum(sums, device), config["with_accuracy"])

    rung_every = config.get("rung_eval_every")
    rung_shard = ray.train.get_dataset_shard("rung_eval") if rung_every else None

    def run_rung_eval() -> dict:
        # The quality successive halving compares, on a fixed eval subset. Under fork_rng: evaluating must
        # not move the RNG the training steps draw from, so a run with rung evals trains as one without.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            engine.eval()
            fwd = lambda ids, mask: engine(input_ids=ids, attention_mask=mask).logits  # noqa: E731
            sums = training.evaluate(fwd, _batches_once(rung_shard, bs, pad), device, config.get("label_token_ids"))
            engine.train()
        return {"rung_quality": training.eval_metrics(_all_sum(sums, device), False)["quality"]}

    # The base model's eval loss: the gain of this layer set is measured against it.
    initial = client["initial_eval"] if checkpoint else (config.get("initial_eval") or _initial_metrics(run_eval()))

    def report(metrics: dict, step: int, final: bool = False) -> None:
        adapter = training.adapter_state_dict(engine.module) if final else None   # collective under ZeRO-3
        with tempfile.TemporaryDirectory() as tmp:
            # the final checkpoint keeps the final metrics: a run interrupted after saving it reports them again
            engine.save_checkpoint(tmp, tag=f"step{step}", exclude_frozen_parameters=True,
                                   client_state={"step": step, "initial_eval": initial,
                                                 "final_metrics": metrics if final else None})
            if final and rank == 0:
                engine.module.save_pretrained(str(Path(tmp) / "adapter"), state_dict=adapter)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{step:06d}{'_final' if final else ''}")

    if client.get("final_metrics") is not None:
        report(client["final_metrics"], steps, final=True)   # every step and the final eval were done
        return

    setup_s = time.perf_counter() - entered          # imports, model, DeepSpeed, data, initial eval
    losses, step_s, tokens, window = [], [], 0, []
    for step in range(start + 1, steps + 1):
        batch = next(batches)
        _maybe_fail(config, step, rank)
        t0 = time.perf_counter()
        loss, n_tokens = _train_step(engine, batch, device, train_label_ids)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        window.append(loss)
        tokens += n_tokens
        if step == steps:
            break  # the final report below carries everything
        do_ckpt = step % config["checkpoint_every"] == 0
        do_eval = bool(config.get("eval_every")) and step % config["eval_every"] == 0
        do_rung = bool(rung_every) and step % rung_every == 0
        if not (do_ckpt or do_eval or do_rung or step % config["report_every"] == 0):
            continue
        metrics = {"step": step, "lr": engine.get_lr()[0], **initial,
                   "train_loss": _all_sum({"l": sum(window) / len(window)}, device)["l"] / world,
                   "median_step_s": statistics.median(step_s[min(2, len(step_s) - 1):])}
        window = []
        if do_eval:
            metrics.update(run_eval())
        if rung_every:      # in every report: Tune refuses a report without the scheduler's metric
            metrics.update(run_rung_eval())
        if do_ckpt:
            report(metrics, step)
        else:
            ray.train.report(metrics)

    final = {**run_eval(), **(run_rung_eval() if rung_every else {})}
    stats = _all_gather({"losses": losses, "step_s": step_s, "tokens": tokens, "setup_s": setup_s,
                         "peak_bytes": training.peak_memory_bytes(device)})
    metrics = {**_summary(stats, start, steps), **final, **info, **initial,
               "step": steps, "num_adapter_layers": len(info["adapter_layers"]),
               "lowest_adapted_layer": info["adapter_layers"][0], "zero_stage": config["zero_stage"],
               "num_workers": world, "device": device.type, "initial_from_cache": bool(config.get("initial_eval"))}
    report(metrics, steps, final=True)


def _initial_metrics(evaluated: dict) -> dict:
    """The base model's eval numbers (before any step): the gain of a layer set is measured against them."""
    return {f"initial_{k}": evaluated[k] for k in INITIAL_KEYS}


def _summary(stats: list[dict], start: int, steps: int) -> dict:
    """Per-run cost from every worker's step times, tokens and peak memory (this attempt's steps only)."""
    n = min(len(s["step_s"]) for s in stats)
    per_step = [max(s["step_s"][i] for s in stats) for i in range(n)]  # the slowest worker sets the pace
    skip = min(2, n - 1) if n > 1 else 0                                # first steps allocate and warm caches
    history = [sum(s["losses"][i] for s in stats) / len(stats) for i in range(n)]
    busy = sum(per_step)
    return {
        "steps": steps,
        "resumed_from_step": start,
        "median_step_s": statistics.median(per_step[skip:]) if n else None,
        "train_tokens_per_s": sum(s["tokens"] for s in stats) / busy if busy else None,
        "peak_memory_bytes": [s["peak_bytes"] for s in stats],
        "worker_setup_s": max(s["setup_s"] for s in stats),
        "final_train_loss": history[-1] if history else None,
        "train_loss_history": history,
    }


# --------------------------------------------------------------------------- Ray on the driver
def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    from pipelines.common import ray_init_kwargs

    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             **ray_init_kwargs())


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
    loop = {**worker_config(cfg, plan, storage_dir), "initial_eval": read_base_eval(cfg.base_eval_cache, key)}
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop,
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


# --------------------------------------------------------------------------- the pipeline
def run(cfg: TrainConfig, out: str | Path) -> dict:
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
    from pipelines.common import alive_nodes, check_storage_reachable

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
        metrics = run(cfg, args.out)
    except LayercardError as err:
        print(f"layercard train: error: {err}", file=sys.stderr)
        return 2
    summary = {k: metrics.get(k) for k in ("steps", "final_train_loss", "eval_loss", "metric",
                                           "median_step_s", "train_tokens_per_s", "adapter_layers")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main))   # --verbose like every command
