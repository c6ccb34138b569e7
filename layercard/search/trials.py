"""A search's trials on Ray Tune: one Tune function per trial fitting a ``TorchTrainer`` of the
training workers, the driver-side callback that logs them, and the placement groups stopped trials leave."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from layercard.errors import LayercardError
from layercard.runtime import alive_nodes, check_storage_reachable, connect_ray
from layercard.search.config import SearchConfig
from layercard.search.events import EVENTS_FILE, STOP_FILE, read_events
from layercard.search.setup import Setup
from layercard.train.base_eval import base_eval_key, read_base_eval, write_base_eval
from layercard.train.worker import FAULT_MARKER, WorkerConfig, train_func, worker_config


def trial_function(config: dict, *, trials: dict, base: WorkerConfig, data: dict, run: dict,
                   replays: dict | None = None) -> None:
    """One Tune trial: a ``TorchTrainer`` running :func:`layercard.train.worker.train_func` on ``base``
    with the trial's layers and seed; ``TuneReportCallback`` forwards rank 0's reports (eval loss along
    the way) to Tune. A trial in ``replays`` (an earlier search ran it) reports that run's reports
    instead; when that run ended before this trial is stopped, it then trains from the start, silent
    up to the last replayed step."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from layercard.search.reuse import REUSED_FROM

    key = config["trial"]
    trial = trials[key]
    nw = run["num_workers"]
    silent = 0
    replay = (replays or {}).get(key)
    if replay:
        from ray import tune

        for metrics in replay["reports"]:
            tune.report({**metrics, REUSED_FROM: replay["source"]})
        if replay["complete"]:
            return
        silent = int(replay["reports"][-1].get("step") or 0)
    loop = dataclasses.replace(base, lora=trial["lora"], layers=trial["layers"], seed=trial["seed"],
                               fault_marker=f"{run['train_storage']}/{key}/{FAULT_MARKER}",
                               initial_eval=read_base_eval(run["base_eval_cache"], run["base_eval_key"]),
                               silent_through=silent)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def dataset(rows):
        return ray.data.from_items(rows, override_num_blocks=max(nw, min(len(rows), 4 * nw)))

    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop.to_dict(),
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


REAP_EVERY_S = 2.0
ASHA_STATE = "asha.json"         # OUT/asha.json: the fixed search's ASHA rung records (PersistentASHA)


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


def settle(timeout_s: float = 30.0) -> None:
    """After a search: wait (bounded) for stopped trials' controllers to die, freeing their groups."""
    end = time.monotonic() + timeout_s
    while True:
        _, live = reap_orphaned_placement_groups()
        if not live or time.monotonic() > end:
            return
        time.sleep(0.5)


def trial_line(key: str, result: dict) -> str:
    """One trial's end as a person reads it: trained to the end (its quality), or stopped at a rung."""
    quality = result.get("quality")
    reused = " (reused)" if result.get("reused_from") else ""
    if quality is not None:
        return (f"{key} finished at step {result.get('step')}: {result.get('quality_name') or 'eval_loss'} "
                f"{quality:.4f}{reused}")
    rung = result.get("rung_quality")
    return (f"{key} stopped at step {result.get('step')}"
            + ("" if rung is None else f" (rung quality {rung:.4f})") + reused)


def _progress(trials, trial, total: int | None = None) -> str:
    """``[done/total]`` over the phase's trials, counting ``trial`` as done. ``total``: the phase's trial
    count (Tune creates a grid's trials as slots free up, so ``trials`` may not hold them all yet)."""
    done = sum(1 for t in trials if t is trial or t.status in ("TERMINATED", "ERROR"))
    return f"[{done}/{max(total or 0, len(trials))}]"


class TrialLog(Callback):
    """Driver-side Tune callback: appends start / complete / error events to ``EVENTS_FILE`` (they
    survive ``Tuner.restore``, so the log counts every attempt), frees the placement groups of
    stopped trials (:func:`reap_orphaned_placement_groups`) and, when ``STOP_FILE`` holds N,
    interrupts the driver the way Ctrl+C does once N trials have completed (a test-only switch)."""

    total: int | None = None         # class default: a TrialLog pickled by an older search has none

    def __init__(self, out: str, base_eval: tuple[str, str] | None = None, total: int | None = None):
        self.out = out
        self.base_eval = base_eval   # (cache path, key): the first trial's base-model eval, for the rest
        self.total = total           # the phase's trial count, for the [done/total] lines
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
            write_base_eval(*self.base_eval, result)
        print(f"layercard search: {_progress(trials, trial, self.total)} {trial_line(trial.config.get('trial'), result)}", flush=True)
        self._maybe_interrupt()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._append(trial, "error", error=str(getattr(trial, "error_msg", None) or "")[:500])
        print(f"layercard search: {_progress(trials, trial, self.total)} {trial.config.get('trial')} failed", flush=True)
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


def check_trial_fits(cfg: SearchConfig) -> None:
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


def trial_base_eval(s: Setup) -> tuple[str, str]:
    """(absolute cache path, key) of the base-model eval the trials share. Absolute: a trial runs in a
    working directory of its own, where a relative path would name a private file."""
    t = s.cfg.train_config
    path = Path(t.base_eval_cache or Path(s.out) / "base_eval.json").expanduser().resolve()
    return str(path), base_eval_key(t, s.plan)


def base_worker_config(s: Setup, loop: dict | None = None) -> WorkerConfig:
    """The worker config every trial of ``s`` shares (layers, LoRA config, seed and fault marker are set per
    trial); ``loop`` overrides its fields."""
    return dataclasses.replace(worker_config(s.cfg.train_config, s.plan, Path(tempfile.gettempdir())), **(loop or {}))


def tune_trainable(s: Setup, base_eval: tuple[str, str], loop: dict | None = None, rung_eval: list[dict] | None = None):
    """The Tune function of ``s.trials``; ``loop`` overrides :class:`WorkerConfig` fields, ``rung_eval``
    is the fixed eval subset of the rung quality (mode=explore). Trials an earlier search ran
    (``s.replays``, config key ``reuse``) replay its reports (:mod:`layercard.search.reuse`)."""
    from ray import tune

    from layercard.search.reuse import replays_for

    t = s.cfg.train_config
    train_storage = f"{s.experiment}/train_runs"
    base = base_worker_config(s, loop)
    data = {"train": s.plan.train, "eval": s.plan.eval, "rung_eval": rung_eval}
    replays = {k: dataclasses.asdict(r) for k, r in replays_for(s, base.to_dict(), data, s.replays or {}).items()}
    cache, key = base_eval
    run = {"num_workers": t.num_workers, "use_gpu": t.use_gpu, "cpus_per_worker": t.cpus_per_worker,
           "max_failures": t.max_failures, "train_storage": train_storage,
           "base_eval_cache": cache, "base_eval_key": key}
    fn = tune.with_parameters(trial_function, trials=s.trials, base=base, data=data, run=run, replays=replays)
    return tune.with_resources(fn, {"CPU": s.cfg.trial_cpus})


def _tuner(s: Setup, restore: bool):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from layercard.search.asha import PersistentASHA

    base_eval = trial_base_eval(s)
    trainable = tune_trainable(s, base_eval)
    if restore:
        # Completed trials are kept; those the interruption left unfinished, and those that failed, start again.
        return tune.Tuner.restore(s.experiment, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=True)
    cfg, t = s.cfg, s.cfg.train_config
    scheduler = FIFOScheduler()
    if cfg.use_asha:
        # its rung records outlive an interruption (a resumed search prunes as an uninterrupted one would)
        scheduler = PersistentASHA(Path(s.out) / ASHA_STATE, time_attr="step", metric="quality", mode="min",
                                   max_t=cfg.asha.max_t or t.steps, grace_period=cfg.asha.grace_period,
                                   reduction_factor=cfg.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(s.trials))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=cfg.name, storage_path=s.storage, callbacks=[TrialLog(str(s.out), base_eval, len(s.trials))],
                                  verbose=0),
    )


def run_tune(s: Setup, restore: bool):
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")   # each report waits for one (NOTES)
    connect_ray(s.cfg.train_config.address)
    check_storage_reachable(s.storage, alive_nodes(), "storage_path")
    check_trial_fits(s.cfg)
    stop = s.out / STOP_FILE
    if s.cfg.stop_after_trials:
        stop.write_text(str(s.cfg.stop_after_trials))
    elif stop.exists():
        stop.unlink()
    try:
        return _tuner(s, restore).fit()
    finally:
        settle()
