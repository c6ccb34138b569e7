"""``PersistentASHA``: ASHA whose rung records survive ``Tuner.restore``. Pure: record, pickle as
``tuner.pkl`` does at the start, unpickle after records were written (the same rungs, the same
decisions); then a real Tune experiment interrupted after its first trial and restored, against
Ray's plain ``ASHAScheduler`` (which forgets the rungs)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from pathlib import Path

import pytest
from ray import cloudpickle
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from layercard.errors import LayercardError
from layercard.search.asha import PersistentASHA

ASHA = {"time_attr": "step", "metric": "q", "mode": "min", "max_t": 6, "grace_period": 2, "reduction_factor": 2}


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def _report(sched, trial, step, q):
    return sched.on_trial_result(None, trial, {"step": step, "q": q})


def _rungs(sched) -> list[dict]:
    return [{m: dict(rec) for m, rec in b._rungs} for b in sched._brackets]


def test_rung_records_survive_a_restore(tmp_path):
    path = tmp_path / "asha.json"
    sched = PersistentASHA(path, **ASHA)
    assert json.loads(path.read_text())["brackets"] == [[[4, {}], [2, {}]]]      # rungs at steps 2 and 4
    at_start = pickle.dumps(sched)               # tuner.pkl: pickled before any result
    plain_at_start = pickle.dumps(ASHAScheduler(**ASHA))
    a, b, c = FakeTrial("a"), FakeTrial("b"), FakeTrial("c")
    for t in (a, b):
        sched.on_trial_add(None, t)
    assert _report(sched, a, 1, 5.0) == TrialScheduler.CONTINUE            # below the first rung: nothing recorded
    assert _report(sched, a, 2, 1.0) == TrialScheduler.CONTINUE
    assert _report(sched, a, 4, 0.9) == TrialScheduler.CONTINUE
    assert _report(sched, b, 2, 0.5) == TrialScheduler.CONTINUE
    sched.on_trial_complete(None, a, {"step": 6, "q": 0.8})

    restored = pickle.loads(at_start)            # Tuner.restore: the scheduler as it was at the start ...
    assert _rungs(restored) == _rungs(sched) == [{4: {"a": -0.9}, 2: {"a": -1.0, "b": -0.5}}]   # ... with the records
    for t in (a, b, c):
        restored.on_trial_add(None, t)
    assert _report(restored, c, 2, 2.0) == TrialScheduler.STOP               # worse than the rung's median
    assert _report(restored, b, 4, 1.5) == TrialScheduler.STOP               # b continued at 2; 4 holds a's 0.9

    plain = pickle.loads(plain_at_start)         # Ray's ASHA comes back empty and lets c go on
    plain.on_trial_add(None, c)
    assert _report(plain, c, 2, 2.0) == TrialScheduler.CONTINUE

    # a stop decision outlives a restore: c run again after a hard kill is stopped at the same rung,
    # though ASHA alone skips a rung that already holds the trial
    again = pickle.loads(at_start)
    assert again._stopped == {"c": 2, "b": 4}
    again.on_trial_add(None, c)
    assert _report(again, c, 1, 0.1) == TrialScheduler.CONTINUE
    assert _report(again, c, 2, 0.1) == TrialScheduler.STOP
    assert again._trial_info["c"] is again._brackets[0]


def test_a_new_scheduler_starts_afresh_and_a_changed_schedule_is_refused(tmp_path):
    path = tmp_path / "asha.json"
    sched = PersistentASHA(path, **ASHA)
    at_start = pickle.dumps(sched)
    sched.on_trial_add(None, FakeTrial("a"))
    _report(sched, FakeTrial("a"), 2, 1.0)
    assert json.loads(path.read_text())["brackets"][0][1] == [2, {"a": -1.0}]
    PersistentASHA(path, **ASHA)                 # a new experiment at the same path: no records carried in
    assert _rungs(pickle.loads(at_start)) == [{4: {}, 2: {}}]

    PersistentASHA(path, **{**ASHA, "grace_period": 1})                     # rungs at 1, 2, 4
    with pytest.raises(LayercardError, match="schedule changed"):
        pickle.loads(at_start)
    path.write_text("{not json")
    with pytest.raises(LayercardError, match="unreadable"):
        pickle.loads(at_start)
    path.unlink()
    assert _rungs(pickle.loads(at_start)) == [{4: {}, 2: {}}]               # no file: nothing recorded yet


# --------------------------------------------------------------------------- real Tune, restored
QUALITY = {"a": 1.0, "b": 3.0}          # at every step: b is worse than a at each rung


def _trainable(config):
    from ray import tune

    for step in range(1, 7):
        tune.report({"step": step, "q": QUALITY[config["name"]]})


class StopAfterFirst(Callback):
    """Logs each trial's start (its trial id) and interrupts the driver as Ctrl+C would once the first
    trial completed (the search's TrialLog does the same with STOP_FILE)."""

    def __init__(self, path: str):
        self.path = path

    def on_trial_start(self, iteration, trials, trial, **info):
        with open(self.path, "a") as f:
            f.write(json.dumps({"name": trial.config["name"], "trial_id": trial.trial_id}) + "\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = Path(self.path + ".done")
        if not done.exists():
            done.write_text("")
            os.kill(os.getpid(), signal.SIGUSR1)       # Tune's graceful stop: state saved, trials unfinished


# Ray workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "plain-ray-asha"])
def test_a_restored_experiment_stops_the_trial_an_uninterrupted_one_stops(ray_local, tmp_path, persistent):
    from ray import tune

    state = tmp_path / "asha.json"
    log = str(tmp_path / "starts.jsonl")
    sched = PersistentASHA(state, **ASHA) if persistent else ASHAScheduler(**ASHA)
    tuner = tune.Tuner(_trainable, param_space={"name": tune.grid_search(["a", "b"])},
                       tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=1, reuse_actors=False),
                       run_config=tune.RunConfig(name="x", storage_path=str(tmp_path / "tune"), verbose=0,
                                                 callbacks=[StopAfterFirst(log)]))
    tuner.fit()
    starts = [json.loads(l) for l in Path(log).read_text().splitlines()]
    assert starts[0]["name"] == "a"                                         # a ran first, to the end
    if persistent:                                                          # only a reached a rung before the cut
        assert json.loads(state.read_text())["brackets"] == [[[4, {starts[0]["trial_id"]: -1.0}],
                                                              [2, {starts[0]["trial_id"]: -1.0}]]]
    grid = tune.Tuner.restore(str(tmp_path / "tune" / "x"), trainable=_trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False).fit()
    steps = {r.config["name"]: r.metrics["step"] for r in grid}
    ids = {r.config["name"]: r.metrics["trial_id"] for r in grid}
    starts = [json.loads(l) for l in Path(log).read_text().splitlines()]
    assert {s["trial_id"] for s in starts if s["name"] == "b"} == {ids["b"]}  # restored trials keep their ids
    assert steps["a"] == 6
    # uninterrupted, b is stopped at the first rung (worse than a there); Ray's ASHA forgets a's record
    assert steps["b"] == (2 if persistent else 6)


def test_trial_line_tells_finished_from_stopped():
    from layercard.search.trials import trial_line

    assert trial_line("k5c00-s0", {"step": 60, "quality": 0.41234, "quality_name": "label_loss",
                                   "rung_quality": 0.5}) == "k5c00-s0 finished at step 60: label_loss 0.4123"
    assert trial_line("k5c01-s0", {"step": 30, "rung_quality": 0.61239}) == \
        "k5c01-s0 stopped at step 30 (rung quality 0.6124)"
    assert trial_line("k5c02-s0", {"step": 10}) == "k5c02-s0 stopped at step 10"


def test_progress_counts_the_whole_phase_and_old_trial_logs_unpickle():
    """Tune creates a grid's trials as slots free up: the total is the phase's, not the trials made so far;
    a TrialLog pickled before it had a total (a search resumed across versions) still prints."""
    from types import SimpleNamespace

    from layercard.search.trials import TrialLog, _progress

    made = [SimpleNamespace(status=st) for st in ("TERMINATED", "ERROR", "RUNNING", "PENDING")]
    assert _progress(made, made[2], total=48) == "[3/48]"
    assert _progress(made, made[2]) == "[3/4]"
    log = TrialLog("/nonexistent", None, 48)
    state = {k: v for k, v in vars(log).items() if k != "total"}
    old = TrialLog.__new__(TrialLog)
    old.__dict__.update(pickle.loads(pickle.dumps(state)))
    assert log.total == 48 and old.total is None


def test_frontier_labels_compress_layer_runs_and_name_the_candidate_kinds():
    from layercard.search.plots import _kind, layer_label

    assert layer_label([16, 12, 13, 14, 15], 30) == "12–16" and layer_label(range(30), 30) == "all"
    assert layer_label([2, 9, 10, 11, 28], 30) == "2,9–11,28" and layer_label([5], 30) == "5"
    row = {"card_guided": True, "baseline": False}
    assert _kind({**row, "labels": ["max-quality k=5"]}) == "card-guided"
    assert _kind({**row, "labels": ["shift k=5 #1", "swap k=5 #2"]}) == "card neighbour"
    assert _kind({"card_guided": False, "baseline": True, "labels": ["mid k=5"]}) == "baseline"
    assert _kind({"card_guided": True, "baseline": True, "labels": ["mid k=5", "max-quality k=5"]}) == "both"
    assert _kind({"card_guided": False, "baseline": False, "labels": ["stratified k=5 #3"]}) == "stratified random"
    assert _kind({"card_guided": False, "baseline": True, "labels": ["given 12,13,14"]}) == "given"
    assert _kind({"card_guided": False, "baseline": True, "labels": ["mid k=3", "given 12,13,14"]}) == "baseline"
