"""Ray Tune's ASHA with rung records that survive ``Tuner.restore``.

``Tuner.restore`` rebuilds the scheduler from ``tuner.pkl``, pickled when the experiment started, so
a plain ``ASHAScheduler`` comes back with empty rungs: every trial reaching a rung after the resume is
compared only with those that reached it after the resume, and trials an uninterrupted run would
stop train on. :class:`PersistentASHA` writes its rung records (per bracket: milestone → {trial id:
reward}) and the trials it stopped (trial id → milestone) to a JSON file each time they change, and
reads them back when it is unpickled. Restored trials keep their trial ids, so the records apply to
them as before the interruption.

The file lives beside the search's other driver-side logs (``OUT``), not in Tune's storage: the
storage may be a URI, and the scheduler runs in the driver, which owns ``OUT``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from layercard.atomic import atomic_write_json
from layercard.errors import LayercardError

STATE_VERSION = 1


class PersistentASHA(ASHAScheduler):
    """``ASHAScheduler`` (same arguments) whose rung records and stop decisions are kept in ``state_path``.

    A new instance starts the file afresh (an earlier experiment's records never leak in); an
    unpickled one (``Tuner.restore``) loads it. A trial stopped at a rung and run again after a
    hard kill (the experiment state saved before the stop) is stopped again when it reaches that
    rung: ASHA alone would let it go on, since it is already recorded there."""

    def __init__(self, state_path: str | Path, **asha):
        super().__init__(**asha)
        self._state_path = str(state_path)
        self._stopped: dict[str, float] = {}
        self._save()

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {"version": STATE_VERSION,
                "brackets": [[[m, {t: float(q) for t, q in rec.items()}] for m, rec in b._rungs]
                             for b in self._brackets],
                "stopped": dict(self._stopped)}

    def _save(self) -> None:
        atomic_write_json(self._state_path, self.state(), indent=1)

    def load_state(self) -> None:
        """Replace the records with those in ``state_path`` (nothing to do when the file is missing)."""
        path = Path(self._state_path)
        if not path.is_file():
            return
        try:
            doc = json.loads(path.read_text())
            brackets = doc["brackets"]
            stopped = {str(k): float(v) for k, v in doc["stopped"].items()}
            got = [[m for m, _ in b] for b in brackets]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LayercardError(f"ASHA state '{path}' is unreadable ({e}); start a new search") from None
        want = [[m for m, _ in b._rungs] for b in self._brackets]
        if len(got) != len(want) or any(len(g) != len(w) or not all(math.isclose(x, y) for x, y in zip(g, w))
                                        for g, w in zip(got, want)):
            raise LayercardError(f"ASHA state '{path}' has rungs at {got}, this scheduler at {want}: the "
                                 "schedule changed since the search started; start a new search")
        for b, saved in zip(self._brackets, brackets):
            b._rungs = [(m, {str(t): float(q) for t, q in rec.items()}) for (m, _), (_, rec) in zip(b._rungs, saved)]
        self._stopped = stopped

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.load_state()

    def _n_recorded(self) -> int:
        return sum(len(rec) for b in self._brackets for _, rec in b._rungs)

    # ------------------------------------------------------------------ ASHA hooks
    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        for b in self._brackets:        # a restored trial goes back to the bracket that recorded it
            if any(trial.trial_id in rec for _, rec in b._rungs):
                self._trial_info[trial.trial_id] = b
                break

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        tid = trial.trial_id
        at = result.get(self._time_attr)
        if tid in self._stopped and at is not None and at >= self._stopped[tid]:
            return TrialScheduler.STOP
        bracket = self._trial_info.get(tid)
        before = {m for m, rec in bracket._rungs if tid in rec} if bracket else set()
        action = super().on_trial_result(tune_controller, trial, result)
        new = {m for m, rec in bracket._rungs if tid in rec} - before if bracket else set()
        if new:
            if action == TrialScheduler.STOP:
                self._stopped[tid] = max(new)
            self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        n = self._n_recorded()
        super().on_trial_complete(tune_controller, trial, result)
        if self._n_recorded() != n:
            self._save()


__all__ = ["PersistentASHA"]
