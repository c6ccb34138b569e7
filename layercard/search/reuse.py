"""Reuse of finished training runs across searches (config key ``reuse``).

Training is deterministic per seed: a trial whose worker config (recipe, layers, LoRA config, seed, rung
steps), model weights and data are those of a trial an earlier search ran reports exactly what that trial
reported. Such a trial replays the earlier reports to Tune instead of training, so the scheduler sees the
same numbers at no cost; an ablation over a pool that shares most sets with the search it ablates costs
only the sets it does not share.

A trial is matched by :func:`fingerprint`: a digest of everything the worker's numbers depend on. When the
earlier trial ended before the step the new search takes it to (ASHA stopped it at a rung the new search
promotes it past), its reports are replayed and the trial then trains from the start, silent up to the
last replayed step (:attr:`layercard.train.worker.WorkerConfig.silent_through`).

Every report records the versions of the libraries the run's numbers depend on
(:data:`NUMERIC_LIBRARIES`); a run is not replayed under others. A run of a layercard that did not
record them is replayed on trust.

A source is a search's OUT or a *run-record file* (``*.jsonl``, :func:`export_runs`, ``layercard
export-runs``): one line per run, its fingerprint and reports. A record file outlives the search's
directory: kept beside the results (or in object storage), it lets a search on another machine, or a
search restarted from nothing, replay every run already paid for.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from layercard.errors import LayercardError

# Keys Tune adds to every reported result; a replay reports the trial's own metrics only.
_TUNE_KEYS = frozenset({"trial_id", "done", "experiment_tag", "should_checkpoint", "episodes_total",
                        "timesteps_total", "timesteps_since_restore"})
# Not part of what the worker computes: where its fault marker lives, a cached base eval (the same numbers).
_NOT_FINGERPRINTED = ("fault_marker", "initial_eval", "silent_through")
# Where the model's files lie (the cache root differs between machines): the weights' hash names the model.
_MODEL_LOCATION = ("path", "gguf_file", "cache_dir")
REUSED_FROM = "reused_from"     # the metric a replayed report carries: the search it came from
RECORD_SUFFIX = ".jsonl"        # a run-record file (export_runs)
_RECORD_KEYS = ("fingerprint", "source", "key", "complete", "reports")
NUMERIC_LIBRARIES = ("layercard", "torch", "transformers", "peft", "deepspeed")


def version_mismatch(reports: list[dict], here: dict[str, str]) -> str | None:
    """'torch 2.12.0 (here 2.13.0)' when the run's recorded library versions differ from ``here``."""
    recorded = next((r["library_versions"] for r in reversed(reports) if isinstance(r.get("library_versions"), dict)),
                    None)
    if recorded is None:
        return None
    for lib in NUMERIC_LIBRARIES:
        if recorded.get(lib) != here.get(lib):
            return f"{lib} {recorded.get(lib)} (here {here.get(lib)})"
    return None


@dataclass
class Replay:
    reports: list[dict]          # the earlier trial's reports, in order, without Tune's keys
    source: str                  # the earlier search's OUT
    key: str                     # the earlier trial's key
    complete: bool               # its last report is the final one (trained to train.steps)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(data: dict) -> dict:
    """Digest of each dataset a trial reads (train, eval, rung_eval)."""
    return {name: None if rows is None else _digest(rows) for name, rows in sorted(data.items())}


def fingerprint(base: dict, weights_hash: str, data: dict[str, str | None], trial: dict) -> str:
    """Everything a trial's reported numbers depend on: the worker config (``base``, a
    :class:`~layercard.train.worker.WorkerConfig` dict, with the trial's layers, LoRA config and seed), the
    model weights' hash and the datasets' digests (:func:`data_digest`). Not where the model's files lie:
    a run made from ``/root/.cache/layercard/models/M`` replays for a search that loads the same weights
    (the same hash) from anywhere else."""
    cfg = {k: v for k, v in base.items() if k not in _NOT_FINGERPRINTED}
    if isinstance(cfg.get("model"), dict):
        cfg["model"] = {k: v for k, v in cfg["model"].items() if k not in _MODEL_LOCATION}
    cfg.update(lora=trial["lora"], layers=trial["layers"], seed=trial["seed"])
    return _digest({"worker": cfg, "weights_hash": weights_hash, "data": data})


def read_reports(trial_dir: Path) -> list[dict]:
    """A Tune trial directory's reports (``result.json``), Tune's own keys dropped. A trial restarted
    after an interruption appends its second attempt; only the last attempt (from the last step that
    does not follow its predecessor) is kept."""
    from ray.tune.result import AUTO_RESULT_KEYS

    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break           # a line cut by a kill: what precedes it stands
    start = 0
    for i in range(1, len(rows)):
        if (rows[i].get("step") or 0) <= (rows[i - 1].get("step") or 0):
            start = i
    drop = _TUNE_KEYS | set(AUTO_RESULT_KEYS) | {REUSED_FROM}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows[start:]]


def _trial_dirs(experiment: Path):
    """(trial key, directory) of every trial Tune ran in ``experiment``."""
    for params in sorted(experiment.glob("*/params.json")):
        try:
            key = json.loads(params.read_text()).get("trial")
        except (OSError, ValueError):
            continue
        if isinstance(key, str):
            yield key, params.parent


def _source_phases(src: Path):
    """The earlier search in ``src`` as (setup, {experiment name: (trials, loop, rung_eval)}): what each
    of its Tune experiments trained, rebuilt from its saved config and card."""
    import pandas as pd

    from layercard.search.explore import REFERENCE, _trials, setup_explore
    from layercard.search.run import read_saved_search, resumed_config
    from layercard.search.setup import setup, trial_lora

    saved = read_saved_search(src)
    cfg = resumed_config(saved, ())
    if saved.get("card"):                # its resolved path: the config's may be relative to where it ran
        cfg = replace(cfg, card=saved["card"])
    if cfg.mode != "explore":
        s = setup(cfg, src)
        return s, {cfg.name: (s.trials, None, None)}
    s, p = setup_explore(cfg, src)
    layers = {c["id"]: c["layers"] for c in saved.get("candidates", [])}
    results = src / "results.parquet"
    if results.is_file():             # the second round's candidates exist only in the finished results
        frame = pd.read_parquet(results, columns=["candidate", "layers"])
        layers.update({c: [int(x) for x in ls] for c, ls in zip(frame["candidate"], frame["layers"])})
    layers[REFERENCE] = list(p.reference.layers)

    def trials_of(keys):
        out = {}
        for key in keys:
            cand, _, seed = key.rpartition("-s")
            if cand in layers and seed.isdigit():
                lora, ls = trial_lora(s.card, layers[cand], cfg)
                out[key] = {"candidate": cand, "seed": int(seed), "layers": ls, "lora": lora}
        return out

    rung_rows = s.plan.eval[:cfg.explore.rung_eval_examples]
    phases = {}
    for experiment in sorted(Path(s.storage).glob(f"{cfg.name}-*")):
        keys = [k for k, _ in _trial_dirs(experiment)]
        if experiment.name == f"{cfg.name}-final":
            phases[experiment.name] = (trials_of(keys), None, None)
        else:
            phases[experiment.name] = (trials_of(keys), {"rung_steps": p.milestones}, rung_rows)
    return s, phases


def _better(new: Replay, have: Replay | None) -> bool:
    """Whether ``new`` replaces ``have`` for one fingerprint: a complete run wins, else the longer one."""
    return have is None or new.complete or not have.complete and len(new.reports) >= len(have.reports)


def _index_search(path: Path) -> dict[str, Replay]:
    """fingerprint → :class:`Replay` of every run the search in ``path`` reported."""
    from layercard.search.trials import base_worker_config

    s, phases = _source_phases(path)
    index: dict[str, Replay] = {}
    for name, (trials, loop, rung_eval) in phases.items():
        base = base_worker_config(s, loop).to_dict()
        data = data_digest({"train": s.plan.train, "eval": s.plan.eval, "rung_eval": rung_eval})
        for key, trial_dir in _trial_dirs(Path(s.storage) / name):
            if key not in trials:
                continue
            reports = read_reports(trial_dir)
            if not reports:
                continue
            last = reports[-1]
            replay = Replay(reports, str(path), key, last.get("step") == base["steps"] and "num_adapter_layers" in last)
            fp = fingerprint(base, s.plan.weights_hash, data, trials[key])
            if _better(replay, index.get(fp)):
                index[fp] = replay
    return index


def read_records(path: Path) -> dict[str, Replay]:
    """fingerprint → :class:`Replay` of a run-record file; a line that is no record is a one-line error."""
    index: dict[str, Replay] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            replay = Replay(list(rec["reports"]), str(rec["source"]), str(rec["key"]), bool(rec["complete"]))
            fp = str(rec["fingerprint"])
            if not replay.reports or not all(isinstance(r, dict) for r in replay.reports):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise LayercardError(f"'{path}' line {n} is not a run record ({', '.join(_RECORD_KEYS)})") from None
        if _better(replay, index.get(fp)):
            index[fp] = replay
    return index


def _index(src: str) -> dict[str, Replay]:
    path = Path(src).expanduser().resolve()
    if path.is_file() and path.suffix == RECORD_SUFFIX:
        return read_records(path)
    if not (path / "search.json").is_file():
        raise LayercardError(f"config key 'reuse' names '{src}', which holds no search (no search.json) and is no "
                             f"run-record file (*{RECORD_SUFFIX})")
    return _index_search(path)


def load_sources(sources: list[str], check_versions: bool = True) -> dict[str, Replay]:
    """fingerprint → :class:`Replay` of every run the searches or run-record files in ``sources`` reported
    (a later source wins over an earlier one for the same fingerprint; a complete run over a partial one),
    less, with ``check_versions``, those trained under other library versions than these."""
    from layercard.card.layer_card import library_versions

    here = library_versions()
    index: dict[str, Replay] = {}
    for src in sources:
        skipped: list[str] = []
        for fp, replay in _index(src).items():
            mismatch = version_mismatch(replay.reports, here) if check_versions else None
            if mismatch:
                skipped.append(mismatch)
            elif _better(replay, index.get(fp)):
                index[fp] = replay
        if skipped:
            print(f"layercard search: reuse: {len(skipped)} run(s) of {Path(src).expanduser().resolve()} are not "
                  f"replayed: trained with {skipped[0]}", flush=True)
    return index


def export_runs(sources: list[str], dest: str | Path) -> dict[str, int]:
    """Merge the runs of ``sources`` (searches or run-record files) into the run-record file ``dest``,
    kept as it was where it already holds the same run or a longer one: runs are only added or
    extended, never dropped (whatever their library versions: :func:`load_sources` filters on reading).
    One JSON line per run, sorted by source and trial key; the write is atomic. Returns the counts of
    runs in ``dest`` (``runs``, ``complete``) and of those this call added or extended (``new``)."""
    from layercard.atomic import atomic_write_text

    dest = Path(dest).expanduser().resolve()
    if dest.suffix != RECORD_SUFFIX:
        raise LayercardError(f"run-record file '{dest}' must end in {RECORD_SUFFIX}")
    if dest.exists() and not dest.is_file():
        raise LayercardError(f"run-record file '{dest}' is a directory")
    if not sources:
        raise LayercardError("export-runs needs at least one search (OUT) or run-record file to read")
    have = read_records(dest) if dest.is_file() else {}
    index = dict(have)
    new = 0
    for fp, replay in load_sources(list(sources), check_versions=False).items():
        old = index.get(fp)
        if old is None or (replay.complete, len(replay.reports)) > (old.complete, len(old.reports)):
            index[fp] = Replay(replay.reports, _shown(replay.source), replay.key, replay.complete)
            new += 1
    lines = sorted((r.source, r.key, json.dumps({"fingerprint": fp, **asdict(r)}, sort_keys=True, default=str))
                   for fp, r in index.items())
    atomic_write_text(dest, "".join(line + "\n" for _, _, line in lines))
    return {"runs": len(index), "complete": sum(r.complete for r in index.values()), "new": new}


def _shown(source: str) -> str:
    """A source path as a record keeps it: relative to the working directory when it lies under it."""
    path, cwd = Path(source), Path.cwd()
    return os.path.relpath(path, cwd) if path.is_absolute() and path.is_relative_to(cwd) else source


def replays_for(s, base: dict, data: dict, index: dict[str, Replay]) -> dict[str, Replay]:
    """trial key → the :class:`Replay` of each of ``s.trials`` an earlier search ran."""
    if not index:
        return {}
    digests = data_digest(data)
    out = {}
    for key, trial in s.trials.items():
        replay = index.get(fingerprint(base, s.plan.weights_hash, digests, trial))
        if replay is not None:
            out[key] = replay
    return out
