"""One record per finished search (``RESULTS/searches/TASK/NAME.json``): what it trained, on which card
source and recipe, and its rows; the table merges the records of every comparable search of a task."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.paper.events import search_minutes
from benchmarks.paper.rows import LEGACY_SCORE, paper_rows, score_of, set_key
from benchmarks.paper.tables import uneven_sharing
from benchmarks.provenance import machine
from layercard.data.task_recipes import TASKS


ARCHIVE = "searches"   # under --results: one record per finished search (search_record)


# train keys that change how a trial is scheduled, checkpointed or cached, not what it learns
SCHEDULING_KEYS = ("cpus_per_worker", "report_every", "checkpoint_every", "max_failures", "base_eval_cache")


def recipe_budget(records: list[dict]) -> float | None:
    """ρ = Σ lr_t of the task's recipe (one per table: :func:`search_records` refuses a mix)."""
    from layercard.profile.adam_step import step_budget

    r = records[0]["recipe"] if records else None
    return step_budget(r["lr"], r["steps"], r["warmup_steps"]) if r else None


# sequence-format keys at the values every sequence had before they existed (no EOS, no template):
# a recipe that sets them so trains on the same tokens as one that does not name them
LEGACY_SEQUENCE_KEYS = {"answer_eos": False, "chat_template": False}


def recipe_of(config: dict) -> dict:
    """A search config's training recipe: its ``train`` section less the scheduling keys, its data
    sections less sequence-format keys at their legacy values."""
    label = config["train"].get("loss") == "label"     # an unset answer_eos is off for the label loss

    def legacy(k, v):
        return k in LEGACY_SEQUENCE_KEYS and (v == LEGACY_SEQUENCE_KEYS[k] or (v is None and (label or k != "answer_eos")))

    def data(d):
        return {k: v for k, v in d.items() if not legacy(k, v)} if isinstance(d, dict) else d

    return {k: data(v) if k in ("data", "eval_data") else v for k, v in config["train"].items()
            if k not in SCHEDULING_KEYS}


def finished_searches(task_dir: Path) -> list[Path]:
    """The task's finished searches under ``task_dir`` (``search``, then ``search-*`` by name); one that
    has not finished (no results.parquet) is left out with a note."""
    dirs = sorted((d for d in task_dir.glob("search*") if (d / "search.json").is_file()),
                  key=lambda d: (d.name != "search", d.name))
    done = [d for d in dirs if (d / "results.parquet").is_file()]
    for d in dirs:
        if d not in done:
            print(f"note: {d} has not finished (no results.parquet); the table leaves it out", flush=True)
    return done



# where files were on the machine that profiled: the weights and data hashes already say what they held;
# and keys that change no number the table compares: the data hash covers the tokens answer_eos and
# chat_template shape, coupling.adam only adds the sign-step columns, profile.save_stats says whether
# the statistics are written and ray.fail_once_in is test-only fault injection
LOCATION_KEYS = ("path", "cache_dir", "answer_eos", "chat_template", "adam", "save_stats", "fail_once_in")


def card_source(doc: dict) -> dict:
    """What a search's card was profiled from: the weights and calibration data (content hashes), the
    profile config less the files' locations and the layer count.

    The table needs one source, not one card file: profiling the same source on another CPU gives a card
    equal up to float rounding (another card_id) — :func:`check_sets` then catches any set it would pick
    differently. A search whose card is gone is known by its card_id alone."""
    from layercard.card.layer_card import LayerCard
    from layercard.card.store import config_hash

    path = Path(doc.get("card") or "")
    if not (path / "card.json").is_file():
        return {"card_id": doc["card_id"]}
    card = LayerCard.load(path, with_stats=False)
    meta = card.meta

    def content(node):
        return {k: content(v) for k, v in node.items() if k not in LOCATION_KEYS} if isinstance(node, dict) else node

    kind = {"weights_hash_kind": meta["weights_hash_kind"]} if "weights_hash_kind" in meta else {}
    sampled = {"weights_hash_sampled": meta["weights_hash_sampled"]} if "weights_hash_sampled" in meta else {}
    return {"weights_hash": meta.get("weights_hash"), **kind, **sampled, "data_hash": meta.get("data_hash"),
            "config_hash": config_hash(content(meta.get("config") or {})), "n_layers": len(card.layers)}


def comparable_sources(a: dict, b: dict) -> tuple[dict, dict]:
    """Two card sources with weights hashes of one kind. A record without ``weights_hash_kind`` was
    written when the hash sampled each file's first and last MiB; a newer card keeps that fingerprint as
    ``weights_hash_sampled``, so the pair is compared on it — never a whole-file hash against a sampled one."""
    if a.get("weights_hash_kind") == b.get("weights_hash_kind"):
        return a, b

    def sampled(src: dict) -> dict:
        out = {k: v for k, v in src.items() if k not in ("weights_hash_kind", "weights_hash_sampled")}
        if src.get("weights_hash_kind") == "sha256":     # state-dict hashes of random models never changed
            out["weights_hash"] = src.get("weights_hash_sampled")
        return out
    return sampled(a), sampled(b)


def search_record(task: str, search_dir: Path) -> dict:
    """What the table needs of a finished search, in one JSON-able record: its card (id and source), recipe
    and scope, its trial minutes and its rows (:func:`paper_rows`, the predicted gain fraction as the search
    recorded it). Records are archived beside the table (:func:`archive_searches`), so the table outlives
    ``--work``."""
    doc = json.loads((search_dir / "search.json").read_text())
    return {"task": task, "search": search_dir.name, "card_id": doc["card_id"], "card": card_source(doc),
            "recipe": recipe_of(doc["config"]),
            "scope": {k: doc["config"].get(k) for k in SCOPE_KEYS}, "minutes": search_minutes(search_dir),
            "machine": machine(), "rows": paper_rows(task, search_dir)}


def archive_searches(task: str, live: list[dict], archive: Path) -> None:
    """Write the records of the finished searches under ``--work`` (``live``) to ``archive/TASK/NAME.json``
    (whole or not at all: written beside, then renamed)."""
    from layercard.atomic import atomic_write_json

    for rec in live:
        path = archive / task / f"{rec['search']}.json"
        atomic_write_json(path, rec, indent=1)


def first_difference(a: dict, b: dict) -> str | None:
    """The first key (sorted) whose value differs between ``a`` and ``b``, else None."""
    return next((k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)), None)


def search_records(task: str, work: Path, archive: Path, live: list[dict] | None = None) -> list[dict]:
    """Every finished search of the task the table merges: the archived records and the finished searches
    under ``work`` (a live search replaces its archived record), ``search`` first, then by name.

    Every one must come from a card of the same source (:func:`card_source`) and the same training recipe:
    training is deterministic per seed, so their rows compare directly (each search trains its own all-layer
    reference, so ratios stay side by side within one run). A different card source or recipe, or a
    strategy that picked other layers in another search (:func:`check_sets`), is an error naming the search
    and the key. ``live``: the records of the searches under ``work``, when the caller has them."""
    records = {p.name[:-len(".json")]: json.loads(p.read_text()) for p in sorted((archive / task).glob("*.json"))}
    if live is None:
        live = [search_record(task, d) for d in finished_searches(work / task)]
    records.update({rec["search"]: rec for rec in live})
    if not records:
        raise SystemExit(f"error: no finished search of {task} under {work / task} or {archive / task}")
    done = [records[n] for n in sorted(records, key=lambda n: (n != "search", n))]
    first = done[0]
    for rec in done[1:]:
        a, b = comparable_sources(first["card"], rec["card"])
        if (key := first_difference(a, b)) is not None:
            raise SystemExit(f"error: {rec['search']} searched a card with {key}={b.get(key)!r}, "
                             f"{first['search']} one with {a.get(key)!r}: one table needs one card")
        a, b = first["recipe"], rec["recipe"]
        if (key := first_difference(a, b)) is not None:
            raise SystemExit(f"error: {rec['search']} trained with train.{key}={b.get(key)!r}, "
                             f"{first['search']} with {a.get(key)!r}: one table needs one recipe")
    check_sets(done)
    return done


def check_sets(records: list[dict]) -> None:
    """A (strategy, k) must name the same layers in every search: two cards of one source could, in
    principle, pick a near-tie differently, and then their rows are not one strategy."""
    seen: dict[tuple, tuple[list[int], str]] = {}
    for rec in records:
        for r in rec["rows"]:
            key = set_key(r)
            layers, where = seen.setdefault(key, (r["layers"], rec["search"]))
            if layers != r["layers"]:
                what = key[0] if key[1] in (None, LEGACY_SCORE) else f"{key[0]} ({key[1]})"
                raise SystemExit(f"error: {what} k={key[2]} is layers {r['layers']} in {rec['search']} but "
                                 f"{layers} in {where}: one table needs one set per strategy")


def table_tasks(work: Path, archive: Path, requested: list[str]) -> list[str]:
    """The tasks the written table covers: the requested ones and every other task with a finished search
    under ``work`` or an archived one, so running one task's scope does not drop the other's rows from
    ``benchmarks/results``."""
    def has_table(task: str) -> bool:
        return (any((s / "results.parquet").is_file() for s in (work / task).glob("search*"))
                or any((archive / task).glob("*.json")))

    return [t for t in TASKS if t in requested or has_table(t)]


def merged_rows(records: list[dict], predict=None) -> list[dict]:
    """The rows of every search record (:func:`search_records`), each tagged with its search, the predicted
    gain fraction from ``predict(layers)`` where given. A (strategy, k, seed) found in more than one search
    is the same deterministic training run again: the first is kept, unless a later one measured its
    step-time ratio like with like (:func:`uneven_sharing`) and the first did not."""
    rows, at = [], {}
    for rec in records:
        for r in rec["rows"]:
            key, r = (*set_key(r), r["seed"]), {**r, "score": score_of(r), "search": rec["search"]}
            if predict is not None:
                r["predicted_gain_fraction"] = predict(r["layers"])
            if key not in at:
                at[key] = len(rows)
                rows.append(r)
            elif uneven_sharing(rows[at[key]]) and not uneven_sharing(r):
                rows[at[key]] = r
    return rows


SCOPE_KEYS = ("mode", "ks", "targets", "strategies", "random_seeds", "seeds", "budget", "budget_fractions")


def scope_of(config: dict) -> dict:
    """What a search trains: its candidates' scope and its recipe (scheduling keys aside)."""
    return {**{k: config.get(k) for k in SCOPE_KEYS},
            "train": recipe_of(config)}
