"""One Ray Train worker of LoRA training (:func:`train_func`) and what the driver prepares for it.

The driver checks the inputs (selection made for this model, data, answer tokens) and tokenizes the
data (:func:`prepare`), then hands every worker a :class:`WorkerConfig` (:func:`worker_config`):
``layercard train`` once, the layer-subset search once per trial with the trial's ``layers``,
``lora``, ``seed`` ... replaced. Workers receive its dict form and rebuild the typed config, so a
config written for another version of this module fails at once, naming the key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

from layercard.card.layer_card import library_versions
from layercard.config import from_dict
from layercard.data.examples import check_sequence_format, load_examples, sequence_format
from layercard.errors import LayercardError
from layercard.models import ModelConfig
from layercard.train.base_eval import INITIAL_KEYS
from layercard.train.config import TrainConfig
from layercard.train.label_loss import check_answer_tokens

FAULT_MARKER = ".fault_injected"
WORKER_SCHEMA_VERSION = 2
"""Bumped whenever a :class:`WorkerConfig` field changes meaning, appears or goes."""


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

# --------------------------------------------------------------------------- what a worker is given
@dataclasses.dataclass
class WorkerConfig:
    """Everything :func:`train_func` reads; JSON-able in its dict form (Tune may replace any value)."""

    schema_version: int
    model: ModelConfig
    lora: dict | None                  # LoraConfig dict, or None → every layer (strategy=all)
    layers: list[int] | None           # overrides lora's layers_to_transform when not None
    lora_r: int
    lora_alpha: float | None
    lora_dropout: float | None
    zero_stage: int
    ds_overrides: dict
    ds_shm_op: bool
    lr: float
    warmup_steps: int
    steps: int
    batch_size: int
    grad_clip: float
    weight_decay: float
    checkpoint_every: int
    report_every: int
    eval_every: int | None
    seed: int
    pad_id: int
    with_accuracy: bool
    label_token_ids: list[int] | None
    loss: str                          # lm | label (the label loss over label_token_ids)
    fail_at_step: int | None
    fault_marker: str
    initial_eval: dict | None = None   # the base model's eval numbers, when already known
    rung_steps: list[int] | None = None  # steps whose reports measure the rung quality on the "rung_eval"
                                         # dataset (explore's ASHA milestones); reports between carry the last
    silent_through: int = 0            # no metrics-only report up to this step (an earlier run's replay sent them)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorkerConfig:
        """The typed config, checked: the schema version this module reads, no unknown or missing key."""
        if not isinstance(data, dict):
            raise LayercardError(f"worker config must be a mapping, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != WORKER_SCHEMA_VERSION:
            raise LayercardError(f"worker config key 'schema_version' is {version!r}, this layercard reads "
                                 f"version {WORKER_SCHEMA_VERSION} (driver and workers run different versions?)")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise LayercardError(f"worker config key '{missing[0]}' is missing")
        return from_dict(cls, data, prefix="worker.")


def worker_config(cfg: TrainConfig, plan: Plan, storage_dir: Path) -> WorkerConfig:
    """The worker's config for ``cfg`` and ``plan``; its fault marker under ``storage_dir``."""
    return WorkerConfig(
        schema_version=WORKER_SCHEMA_VERSION, model=cfg.model, lora=plan.lora, layers=plan.layers,
        lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, zero_stage=cfg.zero_stage,
        ds_overrides=cfg.ds_overrides, ds_shm_op=cfg.ds_shm_op, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        steps=cfg.steps, batch_size=cfg.batch_size, grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay,
        checkpoint_every=cfg.checkpoint_every, report_every=cfg.report_every, eval_every=cfg.eval_every,
        seed=cfg.seed, pad_id=plan.pad_id, with_accuracy=plan.with_accuracy, label_token_ids=plan.label_token_ids,
        loss=cfg.loss, fail_at_step=cfg.fail_at_step, fault_marker=str(storage_dir / cfg.name / FAULT_MARKER))


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


def _maybe_fail(cfg: WorkerConfig, step: int, host) -> None:
    """Test-only: rank 0 dies at ``fail_at_step`` once per run (a marker file stops the retry failing)."""
    if cfg.fail_at_step != step or host.rank != 0:
        return
    marker = Path(cfg.fault_marker)
    if marker.exists():
        return
    host.commit_reports()      # so the retry resumes from the last checkpoint reported
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker killed at step {step}\n")
    os._exit(1)  # a hard kill, like a lost node: no exception handling, no cleanup


def _build_engine(cfg: WorkerConfig, device, world: int):
    """Frozen base → PEFT LoRA on the configured layers (depth guard checked) → DeepSpeed engine."""
    import deepspeed

    from layercard.train import training
    from layercard.models import load_model

    model_cfg = cfg.model
    base = load_model(model_cfg).model
    lora = cfg.lora or training.all_layers_lora(
        base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout or 0.0, model_cfg.block_path)
    model = training.build_lora_model(base, lora, layers=cfg.layers, alpha=cfg.lora_alpha,
                                      dropout=cfg.lora_dropout, block_path=model_cfg.block_path)
    info = {"adapter_layers": training.adapted_layers(model, model_cfg.block_path),
            "trainable_params": training.trainable_parameters(model)}
    model.to(device).train()
    ds_config = training.deepspeed_config(
        zero_stage=cfg.zero_stage, lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps,
        batch_size=cfg.batch_size, world_size=world, bf16=device.type == "cuda",
        grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay, overrides=cfg.ds_overrides)
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


class RayHost:
    """What :func:`train_loop` needs from where it runs, here a Ray Train worker: the device, rank and world
    size, the named dataset shards, the checkpoint to resume from, and where reports go."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        self.device = ray.train.torch.get_device()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    @contextlib.contextmanager
    def resume_dir(self):
        """The directory of the checkpoint to resume from (None: start at step 0)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=name)

    def commit_reports(self) -> None:
        """Wait until every report so far is committed: the controller registers a reported checkpoint when
        it next polls the workers, and a kill within that window would lose it."""
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def train_func(config: dict) -> None:
    """One Ray Train worker: PEFT LoRA under DeepSpeed ZeRO, fed by this worker's Ray Data shard.

    ``config`` is a :class:`WorkerConfig` in its dict form (:meth:`WorkerConfig.to_dict`, what Ray Train
    and Tune pass on), validated here before any work. Reports metrics every
    ``report_every`` steps, a checkpoint (DeepSpeed state + step) every ``checkpoint_every``, and at
    the end the run's cost and quality with the adapter in the final checkpoint. Resumes from
    ``ray.train.get_checkpoint()`` after a worker-group restart.
    """
    entered = time.perf_counter()
    train_loop(WorkerConfig.from_dict(config), RayHost(), entered)


def train_loop(cfg: WorkerConfig, host, entered: float | None = None) -> None:
    """The training run itself, wherever it runs: ``host`` is a :class:`RayHost` in a Ray Train worker,
    or :class:`layercard.train.local.LocalHost` for trials run one after another in one process (the
    same steps, evals and reports)."""
    entered = time.perf_counter() if entered is None else entered
    import torch

    device, rank, world = host.device, host.rank, host.world
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    from layercard.train import training

    training.skip_shm_op_build(force=not cfg.ds_shm_op)
    torch.manual_seed(cfg.seed)
    engine, info = _build_engine(cfg, device, world)
    steps, bs, pad = cfg.steps, cfg.batch_size, cfg.pad_id
    train_label_ids = cfg.label_token_ids if cfg.loss == "label" else None

    start, client = 0, {}
    with host.resume_dir() as d:
        if d is not None:
            _, client = engine.load_checkpoint(d, load_module_strict=False)
            start = int(client["step"])
    checkpoint = d is not None
    batches = _batches(host.shard("train"), bs, pad, skip=start)
    eval_shard = host.shard("eval")

    def run_eval() -> dict:
        engine.eval()
        fwd = lambda ids, mask: engine(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        sums = training.evaluate(fwd, _batches_once(eval_shard, bs, pad), device, cfg.label_token_ids)
        engine.train()
        return training.eval_metrics(_all_sum(sums, device), cfg.with_accuracy)

    rung_steps = set(cfg.rung_steps or ())
    rung_shard = host.shard("rung_eval") if rung_steps else None
    last_rung: dict = {}

    def run_rung_eval(step: int) -> dict:
        # The quality successive halving compares, on a fixed eval subset. Under fork_rng: evaluating must
        # not move the RNG the training steps draw from, so a run with rung evals trains as one without.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            engine.eval()
            fwd = lambda ids, mask: engine(input_ids=ids, attention_mask=mask).logits  # noqa: E731
            sums = training.evaluate(fwd, _batches_once(rung_shard, bs, pad), device, cfg.label_token_ids)
            engine.train()
        return {"rung_quality": training.eval_metrics(_all_sum(sums, device), False)["quality"], "rung_step": step}

    def rung_metrics(step: int) -> dict:
        # Measured at the milestones only (ASHA decides there). Every report must carry the scheduler's
        # metric, so one between milestones repeats the last (``rung_step`` says where it was measured;
        # ASHA reads it only where a report first reaches a milestone); measured once if none yet.
        nonlocal last_rung
        if step in rung_steps or not last_rung:
            last_rung = run_rung_eval(step)
        return last_rung

    # The base model's eval loss: the gain of this layer set is measured against it.
    initial = client["initial_eval"] if checkpoint else (cfg.initial_eval or _initial_metrics(run_eval()))

    def report(metrics: dict, step: int, final: bool = False) -> None:
        adapter = training.adapter_state_dict(engine.module) if final else None   # collective under ZeRO-3
        with tempfile.TemporaryDirectory() as tmp:
            # the final checkpoint keeps the final metrics: a run interrupted after saving it reports them again
            engine.save_checkpoint(tmp, tag=f"step{step}", exclude_frozen_parameters=True,
                                   client_state={"step": step, "initial_eval": initial,
                                                 "final_metrics": metrics if final else None})
            if final and rank == 0:
                engine.module.save_pretrained(str(Path(tmp) / "adapter"), state_dict=adapter)
            host.report(metrics, tmp, f"checkpoint_step{step:06d}{'_final' if final else ''}")

    if client.get("final_metrics") is not None:
        report(client["final_metrics"], steps, final=True)   # every step and the final eval were done
        return

    setup_s = time.perf_counter() - entered          # imports, model, DeepSpeed, data, initial eval
    versions = library_versions()                     # in every report: a replay of it checks them (search reuse)
    losses, step_s, tokens, window = [], [], 0, []
    for step in range(start + 1, steps + 1):
        batch = next(batches)
        _maybe_fail(cfg, step, host)
        t0 = time.perf_counter()
        loss, n_tokens = _train_step(engine, batch, device, train_label_ids)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        window.append(loss)
        tokens += n_tokens
        if step == steps:
            break  # the final report below carries everything
        do_ckpt = step % cfg.checkpoint_every == 0
        do_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0
        do_rung = step in rung_steps
        if not (do_ckpt or do_eval or do_rung or step % cfg.report_every == 0):
            continue
        metrics = {"step": step, "lr": engine.get_lr()[0], **initial, "library_versions": versions,
                   "train_loss": _all_sum({"l": sum(window) / len(window)}, device)["l"] / world,
                   "median_step_s": statistics.median(step_s[min(2, len(step_s) - 1):])}
        window = []
        if do_eval:
            metrics.update(run_eval())
        if rung_steps:      # in every report: Tune refuses a report without the scheduler's metric
            metrics.update(rung_metrics(step))
        if do_ckpt:
            report(metrics, step)
        elif step > cfg.silent_through:
            host.report(metrics)

    final = {**run_eval(), **(rung_metrics(steps) if rung_steps else {})}
    stats = _all_gather({"losses": losses, "step_s": step_s, "tokens": tokens, "setup_s": setup_s,
                         "peak_bytes": training.peak_memory_bytes(device)})
    metrics = {**_summary(stats, start, steps), **final, **info, **initial,
               "step": steps, "num_adapter_layers": len(info["adapter_layers"]),
               "lowest_adapted_layer": info["adapter_layers"][0], "zero_stage": cfg.zero_stage,
               "num_workers": world, "device": device.type, "initial_from_cache": bool(cfg.initial_eval),
               "library_versions": versions}
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
