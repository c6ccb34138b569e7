"""Layer-subset search on Ray Tune under cost budgets; the measured frontier goes back into the card.

    layercard search --config configs/search-tiny.yaml --out runs/search card=runs/tiny-card budget=7e5
    layercard search --config configs/search-tiny.yaml --out runs/layers card=runs/tiny-card mode=per-layer
    layercard search --config configs/search-tiny.yaml --out runs/explore card=runs/tiny-card mode=explore \
        budget=null ks=[2]
    layercard search --resume runs/search

``mode=explore`` (a card-seeded pool per k under successive halving, the best set trained on every
seed, ``explore.json``) runs in :mod:`pipelines.explore` on the parts below.
Setup → search → write. The driver checks everything before any Ray work: the card was profiled on
the configured model (same weights hash), the candidates (:mod:`layercard.select.candidates`) include one
within the budget. Then one Tune trial per (candidate within budget, training seed): a Tune function
that builds and fits a ``TorchTrainer`` running the training pipeline's own worker,
:func:`pipelines.train.train_func`, on the config dict of :func:`pipelines.train.worker_config`
with the trial's layers (the Ray 2.60 / Train V2 way: ``TuneReportCallback`` forwards the workers'
reports, so ASHA stops trials on their quality: the label loss where the train config has
``label_answers``, else the eval loss). Over-budget candidates are recorded, never trained.

OUT gets ``results.parquet`` (one row per candidate), ``trials.parquet`` (one per trial),
``frontier.png``, ``summary.md`` and ``card/``: a new card version with the measured columns
(``measured_eval_loss``, ``measured_quality``, ``measured_gain``, ``measured_step_seconds`` per layer, where that layer
was trained alone) and ``frontier.parquet``; the input card is left as it was. Tune keeps its
state under ``OUT/tune`` (``storage_path``); an interrupted search resumes with ``--resume OUT``
(``Tuner.restore``): completed trials are kept, unfinished ones run again.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.tune import Callback

from layercard.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, check_private, \
    private_dir
from layercard.select.candidates import (Candidate, build_candidates, check_budget_fits, pareto_mask, per_layer_correlations,
                                  training_order)
from layercard.card.layer_card import LayerCard
from layercard.config import apply_overrides, from_dict, load_config
from layercard.errors import LayercardError
from layercard.models import legacy_hash_note
from layercard.search.config import SearchConfig

SEARCH_FILE = "search.json"        # the config, card and candidates of the search in OUT
EVENTS_FILE = "trial_events.jsonl"  # start / complete / error of every trial, as the driver saw them
STOP_FILE = ".stop_after_trials"    # test-only switch, read by TrialLog
STATUSES = ("trained", "over_budget", "stopped_early", "failed")
RESUME_OVERRIDES = ("stop_after_trials", "store", "max_concurrent_trials")
_UNIT_WORDS = {"flops": "FLOPs/token", "seconds": "s/step"}


class SearchInterrupted(LayercardError):
    """The driver stopped before every trial finished; ``--resume OUT`` continues."""


# --------------------------------------------------------------------------- setup (no Ray)
@dataclass
class Setup:
    cfg: SearchConfig
    out: Path
    card: LayerCard
    candidates: list[Candidate]
    plan: object                       # pipelines.train.Plan: model identity and tokenized data
    trials: dict[str, dict]            # trial key → {candidate, seed, layers, lora}
    rungs: list[int] | None = None     # mode=explore: the successive-halving milestones (steps)
    extra_summary: list[str] | None = None   # mode=explore: its section of summary.md

    @property
    def storage(self) -> str:
        path = self.cfg.storage_path
        if path and "://" in path:
            return path
        return str(Path(path).expanduser().resolve()) if path else str(self.out / "tune")

    @property
    def experiment(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.cfg.name}"


def trial_key(candidate_id: str, seed: int) -> str:
    return f"{candidate_id}-s{seed}"


def check_card_for_model(card: LayerCard, card_dir: str, model_id: str, weights_hash: str) -> None:
    """The card must describe the model the trials train (its weights hash, docs/design.md §2)."""
    have = card.meta.get("weights_hash")
    if have != weights_hash:
        raise LayercardError(f"card '{card_dir}' was profiled on another model: its weights hash is {have} "
                             f"(model {card.meta.get('model_id')}), the search's train.model has weights hash "
                             f"{weights_hash} (model {model_id}){legacy_hash_note(card.meta)}")


def _trial_lora(card: LayerCard, layers: list[int], cfg) -> tuple[dict, list[int] | None]:
    """The PEFT LoraConfig ``layercard select`` would write for ``layers``, as a JSON dict; the layers
    to pass the worker (None when the config names its layers in a regex: PEFT forbids both)."""
    from layercard.select.lora_config import build_lora_config
    from layercard.train.training import lora_to_dict

    t = cfg.train_config
    lora, _ = build_lora_config(card, layers, r=t.lora_r, alpha=t.lora_alpha)
    data = lora_to_dict(lora)
    return data, (None if isinstance(data.get("target_modules"), str) else list(layers))


def setup(cfg: SearchConfig, out: Path) -> Setup:
    """Load and check the card, build the candidates, tokenize the data: every input error before Ray."""
    from layercard.data.examples import check_sequence_format
    from pipelines.train import prepare

    if not cfg.card:
        raise LayercardError("search: give card=CARD_DIR (the Layer Card to search over)")
    card = LayerCard.load(Path(cfg.card).expanduser(), with_stats=False)
    plan = prepare(cfg.train_config)
    check_card_for_model(card, cfg.card, plan.model_id, plan.weights_hash)
    check_sequence_format(card.meta.get("sequences"), plan.sequences, f"card '{cfg.card}'")
    candidates = build_candidates(card, mode=cfg.mode, ks=cfg.ks, budget=cfg.budget, budget_unit=cfg.budget_unit,
                                  budget_fractions=cfg.budget_fractions, targets=cfg.targets,
                                  strategies=cfg.strategies, random_seeds=cfg.random_seeds,
                                  model=cfg.model, step_budget=recipe_step_budget(cfg.train_config))
    check_budget_fits(candidates, cfg.budget, cfg.budget_unit)
    trials = {}
    for c in training_order(candidates):        # Tune starts trials in this order
        if c.over_budget:
            continue
        lora, layers = _trial_lora(card, c.layers, cfg)
        for seed in cfg.seeds:
            trials[trial_key(c.id, seed)] = {"candidate": c.id, "seed": seed, "layers": layers, "lora": lora}
    return Setup(cfg, out, card, candidates, plan, trials)


# --------------------------------------------------------------------------- one trial (a Tune function)
def trial_function(config: dict, *, trials: dict, base: dict, data: dict, run: dict) -> None:
    """One Tune trial: a ``TorchTrainer`` running :func:`pipelines.train.train_func` on the trial's
    layers; ``TuneReportCallback`` forwards rank 0's reports (eval loss along the way) to Tune."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train import FAULT_MARKER, read_base_eval, train_func

    key = config["trial"]
    trial = trials[key]
    nw = run["num_workers"]
    loop = {**base, "lora": trial["lora"], "layers": trial["layers"], "seed": trial["seed"],
            "fault_marker": f"{run['train_storage']}/{key}/{FAULT_MARKER}",
            "initial_eval": read_base_eval(run["base_eval_cache"], run["base_eval_key"])}
    ray.data.DataContext.get_current().enable_progress_bars = False

    def dataset(rows):
        return ray.data.from_items(rows, override_num_blocks=max(nw, min(len(rows), 4 * nw)))

    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if run["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=nw, use_gpu=run["use_gpu"],
                                     resources_per_worker={"CPU": run["cpus_per_worker"],
                                                           **({"GPU": 1} if run["use_gpu"] else {})}),
        # The run's name is the trial's: a trial restarted after an interruption resumes its checkpoint.
        run_config=RunConfig(name=key, storage_path=run["train_storage"], callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=run["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train": dataset(data["train"]), "eval": dataset(data["eval"]),
                  **({"rung_eval": dataset(data["rung_eval"])} if data.get("rung_eval") else {})},
    )
    # raises when training fails: Tune marks the trial ERROR. Nothing may follow: Tune can end this
    # function once the final result arrives (the driver's TrialLog caches the base-model eval)
    trainer.fit()


# --------------------------------------------------------------------------- the driver's trial log
REAP_EVERY_S = 2.0


def reap_orphaned_placement_groups() -> tuple[int, int]:
    """Remove this job's placement groups whose creating actor is dead: (removed, still held by a
    live actor).

    Why: Tune stops a trial (ASHA, an interruption) by ending its Tune function, which takes the
    Train V2 controller it owns down with it. The controller's worker placement group is scoped to
    the job, not to the controller, so it keeps its CPUs until the driver exits (Ray 2.60's
    PlacementGroupCleaner did not free it here, with or without the dashboard) and every later trial
    waits for workers forever. A group whose creating actor is dead serves no one.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = live = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or not by_actor
                or pg.creator_job_id.hex() != job):
            continue
        if not pg.creator_actor_dead:
            live += 1
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed, live


def _settle(timeout_s: float = 30.0) -> None:
    """After a search: wait (bounded) for stopped trials' controllers to die, freeing their groups."""
    end = time.monotonic() + timeout_s
    while True:
        _, live = reap_orphaned_placement_groups()
        if not live or time.monotonic() > end:
            return
        time.sleep(0.5)


class TrialLog(Callback):
    """Driver-side Tune callback: appends start / complete / error events to ``EVENTS_FILE`` (they
    survive ``Tuner.restore``, so the log counts every attempt), frees the placement groups of
    stopped trials (:func:`reap_orphaned_placement_groups`) and, when ``STOP_FILE`` holds N,
    interrupts the driver the way Ctrl+C does once N trials have completed (a test-only switch)."""

    def __init__(self, out: str, base_eval: tuple[str, str] | None = None):
        self.out = out
        self.base_eval = base_eval   # (cache path, key): the first trial's base-model eval, for the rest
        self._reaped = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._reaped >= REAP_EVERY_S:
            self._reaped = time.monotonic()
            reap_orphaned_placement_groups()

    def _append(self, trial, event: str, **extra) -> None:
        row = {"time": time.time(), "event": event, "trial_id": trial.trial_id, "key": trial.config.get("trial"),
               **extra}
        with open(Path(self.out) / EVENTS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._append(trial, "start")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._append(trial, "complete", step=result.get("step"))
        if self.base_eval:
            from pipelines.train import write_base_eval

            write_base_eval(*self.base_eval, result)
        print(f"layercard search: trial {trial.config.get('trial')} done at step {result.get('step')}, "
              f"{result.get('quality_name', 'eval_loss')} {result.get('quality')}", flush=True)
        self._maybe_interrupt()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._append(trial, "error", error=str(getattr(trial, "error_msg", None) or "")[:500])
        print(f"layercard search: trial {trial.config.get('trial')} failed", flush=True)
        self._maybe_interrupt()

    def _maybe_interrupt(self) -> None:
        stop = Path(self.out) / STOP_FILE
        if not stop.is_file():
            return
        done = sum(1 for e in read_events(Path(self.out)) if e["event"] in ("complete", "error"))
        # Tune installs a graceful handler for SIGUSR1 (like SIGINT) when it runs in the main thread:
        # it saves the experiment state with the running trials unfinished, then returns.
        if done >= int(stop.read_text()) and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
            stop.unlink()
            os.kill(os.getpid(), signal.SIGUSR1)


def read_events(out: Path) -> list[dict]:
    path = out / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- Ray on the driver
def _check_trial_fits(cfg: SearchConfig) -> None:
    import ray

    t = cfg.train_config
    total = ray.cluster_resources()
    need = t.num_workers * t.cpus_per_worker + cfg.trial_cpus
    if need > total.get("CPU", 0.0) + 1e-9:
        raise LayercardError(f"one trial needs train.num_workers={t.num_workers} x train.cpus_per_worker="
                             f"{t.cpus_per_worker} + trial_cpus={cfg.trial_cpus} = {need:g} CPUs but the Ray cluster "
                             f"has {total.get('CPU', 0.0):g}")
    if t.use_gpu and t.num_workers > total.get("GPU", 0.0):
        raise LayercardError(f"one trial needs {t.num_workers} GPUs but the Ray cluster has {total.get('GPU', 0.0):g}")


def _base_eval(s: Setup) -> tuple[str, str]:
    """(absolute cache path, key) of the base-model eval the trials share. Absolute: a trial runs in a
    working directory of its own, where a relative path would name a private file."""
    from pipelines.train import base_eval_key

    t = s.cfg.train_config
    path = Path(t.base_eval_cache or Path(s.out) / "base_eval.json").expanduser().resolve()
    return str(path), base_eval_key(t, s.plan)


def _trainable(s: Setup, base_eval: tuple[str, str], loop: dict | None = None, rung_eval: list[dict] | None = None):
    """The Tune function of ``s.trials``; ``loop`` overrides worker-config keys, ``rung_eval`` is the
    fixed eval subset of the rung quality (mode=explore)."""
    from ray import tune

    from pipelines.train import worker_config

    t = s.cfg.train_config
    train_storage = f"{s.experiment}/train_runs"
    base = {**worker_config(t, s.plan, Path(tempfile.gettempdir())), **(loop or {})}   # fault_marker: per trial
    cache, key = base_eval
    run = {"num_workers": t.num_workers, "use_gpu": t.use_gpu, "cpus_per_worker": t.cpus_per_worker,
           "max_failures": t.max_failures, "train_storage": train_storage,
           "base_eval_cache": cache, "base_eval_key": key}
    fn = tune.with_parameters(trial_function, trials=s.trials, base=base,
                              data={"train": s.plan.train, "eval": s.plan.eval, "rung_eval": rung_eval}, run=run)
    return tune.with_resources(fn, {"CPU": s.cfg.trial_cpus})


def _tuner(s: Setup, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base_eval = _base_eval(s)
    trainable = _trainable(s, base_eval)
    if restore:
        # Completed trials are kept; those the interruption left unfinished start again.
        return tune.Tuner.restore(s.experiment, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    cfg, t = s.cfg, s.cfg.train_config
    scheduler = FIFOScheduler()
    if cfg.use_asha:
        scheduler = ASHAScheduler(time_attr="step", metric="quality", mode="min", max_t=cfg.asha.max_t or t.steps,
                                  grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(s.trials))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=cfg.name, storage_path=s.storage, callbacks=[TrialLog(str(s.out), base_eval)],
                                  verbose=0),
    )


def _run_tune(s: Setup, restore: bool):
    from pipelines.train import connect_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")   # each report waits for one (NOTES)
    connect_ray(s.cfg.train_config.address)
    from pipelines.common import alive_nodes, check_storage_reachable

    check_storage_reachable(s.storage, alive_nodes(), "storage_path")
    _check_trial_fits(s.cfg)
    stop = s.out / STOP_FILE
    if s.cfg.stop_after_trials:
        stop.write_text(str(s.cfg.stop_after_trials))
    elif stop.exists():
        stop.unlink()
    try:
        return _tuner(s, restore).fit()
    finally:
        _settle()


# --------------------------------------------------------------------------- results
def _trial_rows(s: Setup, grid) -> list[dict]:
    """One row per trial; raises SearchInterrupted when a trial has not finished."""
    events = read_events(s.out)
    finished = {e["key"]: e for e in events if e["event"] in ("complete", "error")}
    attempts = {}
    for e in events:
        if e["event"] == "start":
            attempts[e["key"]] = attempts.get(e["key"], 0) + 1
    unfinished = [k for k in s.trials if k not in finished]
    if unfinished:
        raise SearchInterrupted(f"search interrupted with {len(s.trials) - len(unfinished)} of {len(s.trials)} trials "
                                f"finished; resume with `layercard search --resume {s.out}`")
    results = {r.config["trial"]: r for r in grid}
    steps = s.cfg.train_config.steps
    rows = []
    for key, trial in s.trials.items():
        r = results.get(key)
        m = dict(r.metrics or {}) if r is not None else {}
        event = finished[key]
        if event["event"] == "error" or (r is not None and r.error is not None):
            status = "failed"
        elif m.get("step") == steps and m.get("median_step_s") is not None:
            status = "trained"
        else:
            status = "stopped_early"
        peak = m.get("peak_memory_bytes")
        rows.append({
            "trial": key, "candidate": trial["candidate"], "seed": trial["seed"], "trial_id": event["trial_id"],
            "attempts": attempts.get(key, 0), "status": status, "steps_done": m.get("step"),
            "initial_eval_loss": m.get("initial_eval_loss"), "eval_loss": m.get("eval_loss"),
            "initial_quality": m.get("initial_quality", m.get("initial_eval_loss")),
            "quality": m.get("quality", m.get("eval_loss")), "quality_name": m.get("quality_name", "eval_loss"),
            "label_loss": m.get("label_loss"),
            "metric": m.get("metric"), "metric_name": m.get("metric_name"),
            "step_seconds": m.get("median_step_s"),
            "peak_memory_bytes": max(peak) if isinstance(peak, list) and peak else peak,
            "train_tokens_per_s": m.get("train_tokens_per_s"),
            "error": event.get("error") or (str(r.error).splitlines()[0][:500] if r is not None and r.error else None),
        })
    base = [r["initial_quality"] for r in rows if r["initial_quality"] is not None]
    # The base model's quality (label loss, else eval loss) does not depend on the layers (LoRA
    # starts at zero): one per search. Measured gain = how far a layer set brought it down.
    base_quality = float(np.median(base)) if base else None
    for row in rows:
        row["measured_gain"] = None if base_quality is None or row["quality"] is None else base_quality - row["quality"]
    return rows


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def candidate_rows(s: Setup, trial_rows: list[dict]) -> list[dict]:
    """One row per candidate: predictions, status, and measurements averaged over its trained trials
    (over its early-stopped ones when none trained)."""
    by_cand: dict[str, list[dict]] = {}
    for r in trial_rows:
        by_cand.setdefault(r["candidate"], []).append(r)
    out = []
    for c in s.candidates:
        trials = by_cand.get(c.id, [])
        statuses = {t["status"] for t in trials}
        status = ("over_budget" if c.over_budget else "failed" if "failed" in statuses
                  else "trained" if statuses == {"trained"} else "stopped_early")
        use = [t for t in trials if t["status"] == "trained"] or [t for t in trials if t["status"] == "stopped_early"]
        losses = [t["eval_loss"] for t in use if t["eval_loss"] is not None]
        out.append({
            "candidate": c.id, "layers": c.layers, "k": c.k, "labels": c.labels,
            "objective": ", ".join(c.objectives) or None, "strategy": ", ".join(c.strategies) or None,
            "card_guided": c.card_guided, "baseline": c.baseline,
            "predicted_gain": c.predicted_gain, "predicted_gain_fraction": c.predicted_gain_fraction,
            "predicted_cost": c.cost, "cost_unit": s.cfg.budget_unit,
            "predicted_flops_per_token": c.predicted_flops_per_token,
            "predicted_step_seconds": c.predicted_step_seconds,
            "over_budget": c.over_budget, "status": status, "n_trials": len(trials),
            "steps_done": _mean(t["steps_done"] for t in use),
            "eval_loss": _mean(losses), "eval_loss_std": float(np.std(losses)) if len(losses) > 1 else None,
            "quality": _mean(t["quality"] for t in use),
            "quality_name": next((t["quality_name"] for t in use if t["quality_name"]), None),
            "label_loss": _mean(t["label_loss"] for t in use),
            "measured_gain": _mean(t["measured_gain"] for t in use), "metric": _mean(t["metric"] for t in use),
            "metric_name": next((t["metric_name"] for t in use if t["metric_name"]), None),
            "step_seconds": _mean(t["step_seconds"] for t in use),
            "peak_memory_bytes": _mean(t["peak_memory_bytes"] for t in use),
            "trial_ids": [t["trial_id"] for t in trials],
            "error": next((t["error"] for t in trials if t["error"]), None),
        })
        if s.rungs is not None:
            out[-1]["rung_reached"] = rung_reached(s.rungs, [t["steps_done"] for t in trials], s.cfg.train_config.steps)
    trained = [r for r in out if r["status"] == "trained"]
    front = pareto_mask([r["step_seconds"] for r in trained], [r["measured_gain"] for r in trained])
    on_front = {r["candidate"] for r, f in zip(trained, front) if f}
    for r in out:
        r["on_measured_front"] = r["candidate"] in on_front
    return out


def rung_reached(rungs: list[int], steps_done: list, steps: int) -> int:
    """How far a candidate got through successive halving: the number of rungs whose milestone it
    reached, plus one when it trained to the end (0: never reached the first rung)."""
    done = max((int(x) for x in steps_done if x is not None and np.isfinite(x)), default=0)
    return sum(done >= m for m in rungs) + (done >= steps)


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def write_frontier_png(rows: list[dict], path: Path, title: str) -> None:
    """Measured gain vs measured seconds/step of the trained candidates; baselines marked, front drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = [r for r in rows if r["status"] == "trained" and r["step_seconds"] is not None
           and r["measured_gain"] is not None]
    styles = {"card-guided": dict(marker="o", color="tab:blue"), "baseline": dict(marker="s", color="tab:orange"),
              "both": dict(marker="D", color="tab:green")}
    for kind, style in styles.items():
        sel = [r for r in pts if _kind(r) == kind]
        if sel:
            ax.scatter([r["step_seconds"] for r in sel], [r["measured_gain"] for r in sel], label=kind, s=36,
                       zorder=3, **style)
    for r in pts:
        ax.annotate(f"{r['candidate']} {r['layers']}", (r["step_seconds"], r["measured_gain"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in pts if r["on_measured_front"]), key=lambda r: r["step_seconds"])
    if front:
        xs, ys = [r["step_seconds"] for r in front], [r["measured_gain"] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1, zorder=2)
        ax.scatter(xs, ys, s=130, facecolors="none", edgecolors="black", label="measured Pareto front", zorder=4)
    if not pts:
        ax.text(0.5, 0.5, "no trained candidate has a measured cost", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("measured seconds per training step (median)")
    ax.set_ylabel("measured gain (base eval loss − eval loss)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _kind(row: dict) -> str:
    return "both" if row["card_guided"] and row["baseline"] else "baseline" if row["baseline"] else "card-guided"


def _fmt(x, spec: str = ".4g") -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def summary_markdown(s: Setup, rows: list[dict], per_layer: dict | None, card_dir: Path) -> str:
    cfg, t = s.cfg, s.cfg.train_config
    unit = _UNIT_WORDS[cfg.budget_unit]
    counts = {st: sum(r["status"] == st for r in rows) for st in STATUSES}
    quality = next((r["quality_name"] for r in rows if r.get("quality_name")), "eval_loss").replace("_", " ")
    lines = [f"# Layer-subset search ({cfg.mode})", "",
             f"- card: `{cfg.card}` ({s.card.card_id}), model `{s.plan.model_id}` (weights {s.plan.weights_hash})",
             f"- budget: {_fmt(cfg.budget)} {unit}" if cfg.budget is not None else "- budget: none",
             f"- training: {t.steps} steps x batch {t.batch_size} x {t.num_workers} worker(s), ZeRO-{t.zero_stage}, "
             f"lr {t.lr:g}, seeds {cfg.seeds}; ASHA {'on' if cfg.use_asha else 'off'}",
             f"- candidates: {len(rows)} — " + ", ".join(f"{n} {st}" for st, n in counts.items() if n),
             f"- new card version: `{card_dir}`", "",
             f"| id | layers | proposed by | pred. gain (frac.) | pred. cost ({unit}) | status | {quality} | "
             "measured gain | s/step | peak MB | front |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        lines.append(f"| {r['candidate']} | {r['layers']} | {'; '.join(r['labels'])} | "
                     f"{_fmt(r['predicted_gain_fraction'], '.1%')} | {_fmt(r['predicted_cost'])} | {r['status']} | "
                     f"{_fmt(r['quality'])} | {_fmt(r['measured_gain'])} | {_fmt(r['step_seconds'], '.3g')} | "
                     f"{_fmt(peak, '.0f')} | {'★' if r['on_measured_front'] else ''} |")
    trained = [r for r in rows if r["status"] == "trained" and r["quality"] is not None]
    if trained:
        best = min(trained, key=lambda r: r["quality"])
        name = (best["quality_name"] or "eval_loss").replace("_", " ")
        lines += ["", f"Best measured {name}: {best['candidate']} {best['layers']} ({'; '.join(best['labels'])}) "
                      f"at {_fmt(best['quality'])}."]
    if per_layer:
        rho = per_layer["spearman"]
        verdict = {True: "beats both free predictors", False: "does not beat the free predictors",
                   None: "cannot be judged (too few layers or no spread)"}[per_layer["beats_free_predictors"]]
        lines += ["", "## Per-layer: does the card rank layers by their measured gain?", "",
                  "| predictor | Spearman ρ with measured gain |", "|---|---|",
                  f"| card's predicted gain Q({{ℓ}}) | {_fmt(rho['predicted_gain'], '.3f')} |",
                  f"| raw res2 | {_fmt(rho['res2'], '.3f')} |",
                  f"| layer depth | {_fmt(rho['depth'], '.3f')} |", "",
                  f"Over {per_layer['n_layers']} layers the card's prediction {verdict}."]
    lines += s.extra_summary or []
    return "\n".join(lines) + "\n"


def _per_layer(s: Setup, rows: list[dict]) -> tuple[dict[int, dict], dict | None]:
    """Measurements of every layer trained alone, and (per-layer mode) the Spearman comparison."""
    single = {r["layers"][0]: r for r in rows if r["k"] == 1 and r["status"] == "trained"}
    if s.cfg.mode != "per-layer":
        return single, None
    t = s.card.layers
    ids = s.card.layer_ids
    pred = {r["layers"][0]: r["predicted_gain"] for r in rows if r["k"] == 1}
    nan = float("nan")
    corr = per_layer_correlations(
        ids, [pred.get(l, nan) for l in ids], t["res2"].to_numpy(np.float64),
        [single[l]["measured_gain"] if l in single and single[l]["measured_gain"] is not None else nan for l in ids])
    return single, corr


def write_card_version(s: Setup, rows: list[dict], single: dict[int, dict], per_layer: dict | None) -> Path:
    """OUT/card: the input card plus measured columns and frontier.parquet, written atomically."""
    import pandas as pd

    card = LayerCard.load(Path(s.cfg.card).expanduser(), with_stats=False)
    nan = float("nan")
    col = lambda key: [(single[l][key] if l in single and single[l][key] is not None else nan)  # noqa: E731
                       for l in card.layer_ids]
    card.layers["measured_eval_loss"] = col("eval_loss")
    card.layers["measured_quality"] = col("quality")
    card.layers["measured_gain"] = col("measured_gain")
    card.layers["measured_step_seconds"] = col("step_seconds")
    front = pd.DataFrame([{k: r[k] for k in ("candidate", "layers", "labels", "k", "predicted_gain", "predicted_cost",
                                             "eval_loss", "quality", "measured_gain", "metric", "step_seconds",
                                             "peak_memory_bytes", "on_measured_front")}
                          for r in rows if r["status"] == "trained"],
                         columns=["candidate", "layers", "labels", "k", "predicted_gain", "predicted_cost", "eval_loss",
                                  "quality", "measured_gain", "metric", "step_seconds", "peak_memory_bytes", "on_measured_front"])
    buf = io.BytesIO()
    front.to_parquet(buf, index=False)
    frontier = buf.getvalue()
    t = s.cfg.train_config
    card.meta = {k: v for k, v in card.meta.items() if k not in ("files", "card_id", "created_at")}
    card.meta["parent_card_id"] = s.card.card_id
    card.meta["search"] = {
        "mode": s.cfg.mode, "budget": s.cfg.budget, "budget_unit": s.cfg.budget_unit, "steps": t.steps,
        "batch_size": t.batch_size, "lr": t.lr, "seeds": s.cfg.seeds, "zero_stage": t.zero_stage,
        "measured_columns": ["measured_eval_loss", "measured_quality", "measured_gain", "measured_step_seconds"],
        "quality": next((r["quality_name"] for r in rows if r.get("quality_name")), "eval_loss"),
        "frontier_file": "frontier.parquet", "frontier_sha256": hashlib.sha256(frontier).hexdigest(),
        "measured_front": [r["candidate"] for r in rows if r["on_measured_front"]],
        "per_layer": per_layer,
    }
    card.meta["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    final = s.out / "card"
    with atomic_dir(final, replace=True) as stage:     # the previous OUT/card stays until this one is whole
        card.save(stage, overwrite=True)
        (stage / "frontier.parquet").write_bytes(frontier)
    return final


def write_outputs(s: Setup, grid) -> dict:
    """results.parquet, trials.parquet, frontier.png, summary.md, card/ (and the store, when set)."""
    trials = _trial_rows(s, grid)
    rows = candidate_rows(s, trials)
    single, per_layer = _per_layer(s, rows)
    card_dir = write_card_version(s, rows, single, per_layer)
    atomic_write_bytes(s.out / "results.parquet", _parquet_bytes(_frame(rows)))
    atomic_write_bytes(s.out / "trials.parquet", _parquet_bytes(_frame(trials)))
    unit = _UNIT_WORDS[s.cfg.budget_unit]
    write_frontier_png(rows, s.out / "frontier.png",
                       f"{s.plan.model_id}: {sum(r['status'] == 'trained' for r in rows)} trained, budget "
                       f"{_fmt(s.cfg.budget)} {unit}")
    atomic_write_text(s.out / "summary.md", summary_markdown(s, rows, per_layer, card_dir))
    version = None
    if s.cfg.store:
        from layercard.card.store import CardStore

        version = CardStore(s.cfg.store).publish(card_dir, summary={"search": str(s.out)}).version
    counts = {st: sum(r["status"] == st for r in rows) for st in STATUSES}
    return {"out": str(s.out), "candidates": len(rows), **counts, "card": str(card_dir), "store_version": version,
            "per_layer": per_layer}


# --------------------------------------------------------------------------- the pipeline
def _parquet_bytes(frame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def read_saved_search(out: Path) -> dict:
    """OUT/search.json, checked: a truncated or edited file is a one-line error naming it."""
    path = out / SEARCH_FILE
    if not path.is_file():
        raise LayercardError(f"'{out}' holds no search to resume ({SEARCH_FILE} is missing)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LayercardError(f"'{path}' is unreadable ({type(err).__name__}); start a new search") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) \
            or not isinstance(saved.get("trials"), (dict, list)) or "card_id" not in saved:
        raise LayercardError(f"'{path}' is not a search record (config, card_id, trials); start a new search")
    return saved


def check_resumable(out: Path, saved: dict) -> None:
    """Restoring a search unpickles Tune's state and resumes trials' checkpoints: refuse a local
    storage directory that group or others can write to."""
    storage = saved["config"].get("storage_path")
    if storage and "://" in str(storage):
        return
    check_private(Path(storage).expanduser().resolve() if storage else out / "tune", "search storage")


def recipe_step_budget(train) -> float:
    """ρ = Σ lr_t of the trials' recipe (what the adam/coverage set models need)."""
    from layercard.profile.adam_step import step_budget

    return step_budget(train.lr, train.steps, train.warmup_steps)


def _save_search(s: Setup) -> None:
    from layercard.select.selection import resolve_model

    doc = {"config": s.cfg.to_dict(), "card_id": s.card.card_id, "card": str(Path(s.cfg.card).expanduser().resolve()),
           "quality_model": resolve_model(s.card, s.cfg.model), "step_budget": recipe_step_budget(s.cfg.train_config),
           "candidates": [c.to_dict() for c in s.candidates], "trials": s.trials}
    atomic_write_json(s.out / SEARCH_FILE, doc, default=str)


def run(cfg: SearchConfig, out: str | Path) -> dict:
    """A fresh search in OUT (or, with ``resume=true`` and a search there, its continuation)."""
    out = Path(out).expanduser().resolve()
    if (out / SEARCH_FILE).exists():
        if cfg.resume:
            return resume(out)
        raise LayercardError(f"'{out}' already holds a search; resume it with `layercard search --resume {out}` "
                             "or choose another --out")
    if cfg.mode == "explore":
        from pipelines.explore import run_explore

        return run_explore(cfg, out)
    s = setup(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if "://" not in s.storage:
        private_dir(s.storage)      # resuming unpickles what Tune keeps here: owner-writable only
    _save_search(s)
    over = sum(c.over_budget for c in s.candidates)
    print(f"layercard search: {len(s.candidates)} candidates ({over} over budget), {len(s.trials)} trials -> {out}",
          flush=True)
    return write_outputs(s, _run_tune(s, restore=False))


def resume(out: str | Path, overrides: list[str] = ()) -> dict:
    """Continue the search in OUT with ``Tuner.restore``: finished trials are kept, the rest run."""
    out = Path(out).expanduser().resolve()
    saved = read_saved_search(out)
    check_resumable(out, saved)
    if saved["config"].get("mode") == "explore":
        from pipelines.explore import resume_explore

        return resume_explore(out, overrides)
    bad = [o for o in overrides if o.split("=", 1)[0] not in RESUME_OVERRIDES]
    if bad:
        raise LayercardError(f"--resume takes only {', '.join(RESUME_OVERRIDES)} overrides (the candidates are fixed), "
                             f"got {bad[0]!r}")
    data = {**saved["config"], "stop_after_trials": None, "resume": False}
    cfg = from_dict(SearchConfig, apply_overrides(data, list(overrides)))
    s = setup(cfg, out)
    if s.card.card_id != saved["card_id"]:
        raise LayercardError(f"card '{cfg.card}' changed since the search started (card id {s.card.card_id}, "
                             f"was {saved['card_id']})")
    if sorted(s.trials) != sorted(saved["trials"]):
        raise LayercardError(f"the trials of '{out}' no longer match its config and card; start a new search")
    exists = _exists(s.experiment)
    return write_outputs(s, _run_tune(s, restore=exists))


def _exists(path: str) -> bool:
    """Whether ``path`` (a local path or a pyarrow filesystem URI) exists."""
    if "://" not in path:
        return Path(path).exists()
    from pyarrow import fs as pafs

    fs, inner = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="layercard search", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (configs/search-*.yaml)")
    p.add_argument("--out", help="output dir: results.parquet, frontier.png, summary.md, card/, tune/")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted search in DIR. Resuming unpickles Tune's state and the trials' "
                        "checkpoints (torch.load with weights_only=False): whoever can write to DIR/tune (or "
                        "storage_path) can run code as you. Refused when group or others can write there")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. card=CARD_DIR budget=7e5 mode=per-layer")
    a = p.parse_args(argv)
    if a.resume and (a.config or a.out):
        p.error("--resume DIR takes no --config or --out (the search in DIR keeps its own)")
    if not a.resume and not (a.config and a.out):
        p.error("give --config FILE --out DIR, or --resume DIR")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.resume:
            summary = resume(a.resume, a.overrides)
        else:
            summary = run(load_config(SearchConfig, a.config, a.overrides), a.out)
    except SearchInterrupted as err:
        print(f"layercard search: {err}", file=sys.stderr)
        return 3
    except LayercardError as err:
        print(f"layercard search: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "per_layer"}))
    if summary.get("per_layer"):
        print(json.dumps(summary["per_layer"]))
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main))   # --verbose like every command
