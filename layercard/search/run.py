"""A layer-subset search from start to finish: setup, the trials on Ray Tune, the outputs; and its
continuation after an interruption (``Tuner.restore``: finished trials are kept, unfinished ones run again)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from layercard.atomic import atomic_write_json, check_private, private_dir
from layercard.config import apply_overrides, from_dict
from layercard.errors import LayercardError
from layercard.search.config import SearchConfig
from layercard.search.publish import write_outputs
from layercard.search.setup import Setup, recipe_step_budget, setup
from layercard.search.trials import run_tune
from layercard.select.selection import resolve_model

SEARCH_FILE = "search.json"        # the config, card and candidates of the search in OUT
RESUME_OVERRIDES = ("stop_after_trials", "store", "max_concurrent_trials", "reuse", "records")
# config keys that name local files: saved absolute, so a search resumes or is reused from any directory
PATH_KEYS = (("card",), ("train", "model", "path"), ("train", "model", "gguf_file"), ("train", "data", "path"),
             ("train", "eval_data", "path"), ("train", "base_eval_cache"), ("explore", "paper_table"),
             ("storage_path",), ("records",))


def anchored(config: dict, cwd: Path) -> dict:
    """``config`` (a SearchConfig dict) with its local paths (``PATH_KEYS`` and ``reuse``) made absolute,
    relative ones against ``cwd``; ``cache:``, ``$VAR`` and URI paths are kept as written."""
    def fix(text):
        if not isinstance(text, str) or not text or text.startswith(("cache:", "$")) or "://" in text:
            return text
        return str((cwd / Path(text).expanduser()).resolve())

    config = json.loads(json.dumps(config, default=str))
    for *parents, key in PATH_KEYS:
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            node[key] = fix(node[key])
    if isinstance(config.get("reuse"), list):
        config["reuse"] = [fix(r) for r in config["reuse"]]
    return config


def resumed_config(saved: dict, overrides) -> SearchConfig:
    """The saved search's config with the few overrides ``--resume`` allows (the candidates are fixed)."""
    bad = [o for o in overrides if o.split("=", 1)[0] not in RESUME_OVERRIDES]
    if bad:
        raise LayercardError(f"--resume takes only {', '.join(RESUME_OVERRIDES)} overrides (the candidates are fixed), "
                             f"got {bad[0]!r}")
    data = {**saved["config"], "stop_after_trials": None, "resume": False}
    return from_dict(SearchConfig, apply_overrides(data, list(overrides)))


def check_resumed(s, saved: dict, out: Path) -> None:
    """The card and the trials of a resumed search are those it started with."""
    if s.card.card_id != saved["card_id"]:
        raise LayercardError(f"card '{s.cfg.card}' changed since the search started (card id {s.card.card_id}, "
                             f"was {saved['card_id']})")
    if sorted(s.trials) != sorted(saved["trials"]):
        raise LayercardError(f"the trials of '{out}' no longer match its config and card; start a new search")


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
    """Restoring a search unpickles Tune's state and resumes trials' checkpoints: refuse a search that
    moved since it started (that state, the driver's callbacks and ASHA's records name files under the
    original OUT) and a local storage directory that group or others can write to."""
    started = saved.get("out")
    if started and Path(started) != out:
        raise LayercardError(f"'{out}' was started as '{started}' and has moved since; the state Tune saved "
                             "names files under the old path: resume it there")
    storage = saved["config"].get("storage_path")
    if storage and "://" in str(storage):
        return
    check_private(Path(storage).expanduser().resolve() if storage else out / "tune", "search storage")


def with_replays(s: Setup) -> Setup:
    """``s`` with the replays of the earlier searches config key ``reuse`` names and of the run-record
    file config key ``records`` names (once it exists)."""
    from layercard.search.reuse import load_sources

    own = [r for r in s.cfg.reuse if Path(r).expanduser().resolve() == Path(s.out).resolve()]
    if own:
        raise LayercardError(f"config key 'reuse' names the search's own OUT '{own[0]}'; --resume continues it")
    sources = [*s.cfg.reuse, *([s.cfg.records] if s.cfg.records and Path(s.cfg.records).expanduser().is_file() else [])]
    if not sources:
        return s
    s = dataclasses.replace(s, replays=load_sources(sources))
    print(f"layercard search: {len(s.replays)} earlier runs to reuse from {len(sources)} search(es)", flush=True)
    return s


def recorded(records: str | None, out: Path, run):
    """``run()``; then, whether it finished or not, every run the search in OUT reported merged into the
    run-record file ``records`` (config key ``records``; nothing when None). When ``run`` raised (an
    interruption, a failure), a record that cannot be written is reported on stderr and the search's own
    error stands."""
    if not records:
        return run()
    try:
        result = run()
    except BaseException:
        _keep_runs(records, out, quiet=True)
        raise
    _keep_runs(records, out)
    return result


def _keep_runs(records: str, out: Path, quiet: bool = False) -> None:
    from layercard.search.reuse import export_runs

    if not (out / SEARCH_FILE).is_file():
        return
    try:
        counts = export_runs([str(out)], records)
    except (LayercardError, OSError) as err:
        if not quiet:
            raise
        print(f"layercard search: the runs were not added to '{records}': {err}", file=sys.stderr, flush=True)
        return
    print(f"layercard search: {counts['runs']} runs in {records} ({counts['new']} new or longer)", flush=True)


def save_search(s: Setup) -> None:
    doc = {"config": s.cfg.to_dict(), "out": str(Path(s.out).resolve()), "card_id": s.card.card_id, "card": str(Path(s.cfg.card).expanduser().resolve()),
           "quality_model": resolve_model(s.card, s.cfg.model), "step_budget": recipe_step_budget(s.cfg.train_config),
           "candidates": [c.to_dict() for c in s.candidates], "trials": s.trials}
    atomic_write_json(s.out / SEARCH_FILE, doc, default=str)


def run_search(cfg: SearchConfig, out: str | Path) -> dict:
    """A fresh search in OUT (or, with ``resume=true`` and a search there, its continuation)."""
    out = Path(out).expanduser().resolve()
    if (out / SEARCH_FILE).exists():
        if cfg.resume:
            return resume_search(out)
        raise LayercardError(f"'{out}' already holds a search; resume it with `layercard search --resume {out}` "
                             "or choose another --out")
    # local paths saved absolute: the search resumes, and is reused, from any working directory
    cfg = from_dict(SearchConfig, anchored(cfg.to_dict(), Path.cwd()))
    return recorded(cfg.records, out, lambda: _run_search(cfg, out))


def _run_search(cfg: SearchConfig, out: Path) -> dict:
    if cfg.mode == "explore":
        from layercard.search.explore import run_explore

        return run_explore(cfg, out)
    s = with_replays(setup(cfg, out))
    out.mkdir(parents=True, exist_ok=True)
    if "://" not in s.storage:
        private_dir(s.storage)      # resuming unpickles what Tune keeps here: owner-writable only
    save_search(s)
    over = sum(c.over_budget for c in s.candidates)
    print(f"layercard search: {len(s.candidates)} candidates ({over} over budget), {len(s.trials)} trials -> {out}",
          flush=True)
    return write_outputs(s, run_tune(s, restore=False))


def resume_search(out: str | Path, overrides: list[str] = ()) -> dict:
    """Continue the search in OUT with ``Tuner.restore``: finished trials are kept, the rest run."""
    out = Path(out).expanduser().resolve()
    saved = read_saved_search(out)
    check_resumable(out, saved)
    cfg = resumed_config(saved, overrides)
    return recorded(cfg.records, out, lambda: _resume_search(out, saved, cfg, overrides))


def _resume_search(out: Path, saved: dict, cfg: SearchConfig, overrides) -> dict:
    if saved["config"].get("mode") == "explore":
        from layercard.search.explore import resume_explore

        return resume_explore(out, overrides)
    s = setup(cfg, out)
    check_resumed(s, saved, out)
    s = with_replays(s)
    exists = _exists(s.experiment)
    return write_outputs(s, run_tune(s, restore=exists))


def _exists(path: str) -> bool:
    """Whether ``path`` (a local path or a pyarrow filesystem URI) exists."""
    if "://" not in path:
        return Path(path).exists()
    from pyarrow import fs as pafs

    fs, inner = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound
