"""Measured training cost: seconds per LoRA step and peak memory, by lowest adapted layer.

Each measurement is a real training step: a PEFT LoRA model (``get_peft_model`` with
``layers_to_transform``), the model's own causal-LM loss on a real batch, backward, and a torch
AdamW step. The median over ``steps`` timed steps after ``warmup`` steps is kept.

**Which adapters are measured.** The card column for layer ℓ is the step with an adapter on ℓ
*only*: the lowest adapted layer is ℓ and the adapter count is held at one, so the column isolates
what docs/design.md §1 says drives cost — the depth of the backward. With ``suffix_sets`` the adapters on
ℓ..L−1 are measured too (ℓ = first gives all layers); those points vary the adapter count at a
fixed depth, which is what lets :func:`layercard.profile.cost.calibrate_step_time` separate the
per-adapter cost from the backprop cost. Unmeasured layers are linearly interpolated.

**Peak memory** (``peak_bytes``) is what training adds on top of the loaded frozen model
(adapters, their gradients and Adam state, activations kept for backward, logits). On CUDA it is
``torch.cuda.max_memory_allocated`` during one step minus the allocation before the PEFT model was
built. On CPU it is the peak resident set size (RSS, sampled every ~1 ms by a thread during one
extra untimed step) minus the RSS before the PEFT model was built, with freed heap returned to the
OS first (glibc ``malloc_trim``) so earlier measurements do not hide later ones; tracemalloc
cannot see torch's allocations.

The base model is left as it was: the PEFT wrapper is unloaded after each measurement (the
tests check the weights hash and the module types).
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from layercard.discovery import ModelLayout, discover
from layercard.errors import LayercardError
from layercard.train.losses import supervised_count, supervised_loss_sum

STEP_COLUMNS = ["step_seconds", "peak_bytes", "step_measured"]


@dataclass
class StepTimingConfig:
    """How step time is measured."""

    points: int = 3
    """Lowest-adapted-layer positions measured: first, last and evenly spaced between (>= 2)."""
    steps: int = 5
    """Timed steps per measurement; the median is kept."""
    warmup: int = 2
    """Untimed steps first (allocator, Adam state, lazy kernels)."""
    lr: float = 1e-4
    """AdamW learning rate (the value does not change the cost, only makes the step real)."""
    suffix_sets: bool = True
    """Also measure adapters on ℓ..L−1 at each measured ℓ (calibrates the per-adapter cost)."""
    memory: bool = True
    """Measure peak memory (one extra untimed step per measurement)."""

    def __post_init__(self):
        if self.points < 2:
            raise LayercardError(f"step_timing.points must be >= 2 (first and last layer), got {self.points}")
        if self.steps < 1:
            raise LayercardError(f"step_timing.steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise LayercardError(f"step_timing.warmup must be >= 0, got {self.warmup}")


@dataclass
class StepMeasurement:
    layers: list[int]
    step_seconds: float            # median seconds per step
    peak_bytes: float | None       # None when memory was not measured
    times: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "step_seconds": self.step_seconds,
                "peak_bytes": self.peak_bytes, "times": list(self.times)}


def measured_layers(layer_ids: list[int], points: int) -> list[int]:
    """First, last and evenly spaced between (distinct, sorted)."""
    if not layer_ids:
        raise LayercardError("no layers to measure")
    pos = np.unique(np.round(np.linspace(0, len(layer_ids) - 1, min(points, len(layer_ids)))).astype(int))
    return [layer_ids[i] for i in pos]


# ---------------------------------------------------------------------------------------------
# Memory probes
# ---------------------------------------------------------------------------------------------
def _release_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas may under-count after the first point
        pass


class _RssSampler:
    """Peak RSS of this process while active, sampled by a daemon thread."""

    def __init__(self, interval: float = 1e-3):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self.rss()

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lora_model(model: nn.Module, layout: ModelLayout, layers: list[int], rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=layout.targets,
                        layers_to_transform=list(layers), layers_pattern=layout.layers_pattern, bias="none")
    return get_peft_model(model, config)


def measure_step(model: nn.Module, layout: ModelLayout, batch: dict, layers: list[int], *, rank: int,
                 config: StepTimingConfig | None = None) -> StepMeasurement:
    """Median seconds per LoRA training step with adapters on ``layers``, and peak memory."""
    cfg = config or StepTimingConfig()
    layers = sorted({int(l) for l in layers})
    bad = [l for l in layers if l not in layout.layers]
    if not layers or bad:
        raise LayercardError(f"cannot measure adapters on layers {bad or layers}: the layout has layers "
                             f"{list(layout.layers)}")
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    n_supervised = supervised_count(inputs["labels"])
    if n_supervised == 0:
        raise LayercardError("step timing batch has no supervised token (all labels are -100)")
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]  # PEFT freezes the base; unload does not undo it

    _release_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base_bytes = torch.cuda.memory_allocated(device)
    rss_base = _RssSampler().rss() if cfg.memory and device.type != "cuda" else 0
    peft_model = _lora_model(model, layout, layers, rank)
    try:
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr)

        def step():
            loss = supervised_loss_sum(peft_model, **inputs, use_cache=False) / n_supervised   # as training does
            if not torch.isfinite(loss):
                raise LayercardError("non-finite loss in a step-timing step (check the model dtype and batch)")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(cfg.warmup):
            step()
        times = []
        for _ in range(cfg.steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = None
        if cfg.memory:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step()
                _sync(device)
                peak = float(torch.cuda.max_memory_allocated(device) - base_bytes)
            else:
                with _RssSampler() as sampler:
                    step()
                peak = float(max(sampler.peak - rss_base, 0))
        del opt, params
    finally:
        peft_model.unload()  # puts the original modules back into ``model``
        del peft_model
        model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    return StepMeasurement(layers, float(statistics.median(times)), peak, times)


def measure_step_times(model: nn.Module, layout: ModelLayout, batch: dict, *, rank: int,
                       config: StepTimingConfig | None = None) -> list[StepMeasurement]:
    """Measure {ℓ} (and ℓ..L−1 with ``suffix_sets``) at the configured lowest layers ℓ, highest first."""
    cfg = config or StepTimingConfig()
    ids = list(layout.layers)
    sets: list[list[int]] = []
    for l in reversed(measured_layers(ids, cfg.points)):  # least memory first: RSS only grows
        sets.append([l])
        suffix = [i for i in ids if i >= l]
        if cfg.suffix_sets and len(suffix) > 1:
            sets.append(suffix)
    # one throw-away step first: one-time allocations (lazy imports, kernel caches, the first
    # Adam state) would otherwise land in the first measurement's time and RSS
    prime = StepTimingConfig(points=cfg.points, steps=1, warmup=1, lr=cfg.lr, memory=False)
    measure_step(model, layout, batch, sets[0], rank=rank, config=prime)
    return [measure_step(model, layout, batch, s, rank=rank, config=cfg) for s in sets]


# ---------------------------------------------------------------------------------------------
# Card columns
# ---------------------------------------------------------------------------------------------
def add_step_columns(card, measurements: list[StepMeasurement], *, batch_shape=None):
    """Columns ``step_seconds``, ``peak_bytes`` (single-adapter measurements at their layer, linearly
    interpolated between) and ``step_measured``; stores every point in ``meta["step_timing"]`` and,
    when the analytic cost columns are present, calibrates the cost model (``meta["cost_r2"]``)."""
    from layercard.profile.cost import calibrate_step_time

    single = {m.layers[0]: m for m in measurements if len(m.layers) == 1}
    if len(single) < 1:
        raise LayercardError("no single-layer step measurement to build the step_seconds column from")
    ids = card.layer_ids
    card.positions(sorted(single))  # every measured layer must be a card layer
    xs = sorted(single)
    card.layers["step_seconds"] = np.interp(ids, xs, [single[x].step_seconds for x in xs])
    if all(single[x].peak_bytes is not None for x in xs):
        card.layers["peak_bytes"] = np.interp(ids, xs, [single[x].peak_bytes for x in xs])
    else:
        card.layers["peak_bytes"] = np.nan
    card.layers["step_measured"] = [l in single for l in ids]
    card.meta["step_timing"] = {
        "points": [m.to_dict() for m in measurements],
        "batch_shape": list(batch_shape) if batch_shape is not None else None,
        "adapters": "single layer per column; suffix sets for calibration",
    }
    if "backprop_flops_per_token" in card.layers.columns:
        calibrate_step_time(card)
    return card


def measure_card_cost(card, model: nn.Module, batch: dict, *, rank: int | None = None,
                      config: StepTimingConfig | None = None, layout: ModelLayout | None = None):
    """Analytic cost columns + measured step time in one call (the model must be the profiled one)."""
    from layercard.profile.cost import add_cost_columns, dims_from_model

    meta = card.meta
    if layout is None:
        layout = discover(model, meta.get("target_modules"), card.layer_ids, meta.get("block_path"))
    rank = int(meta.get("rank", 8) if rank is None else rank)
    add_cost_columns(card, layout, dims_from_model(model, layout.block_path), rank=rank,
                     seq_len=int(batch["input_ids"].shape[1]))
    points = measure_step_times(model, layout, batch, rank=rank, config=config)
    return add_step_columns(card, points, batch_shape=tuple(batch["input_ids"].shape))
