"""The paper-style table: card-guided layer sets vs baselines, trained and measured on SmolLM2-135M.

    python benchmarks/paper_table.py                      # both tasks, k ∈ {3, 5, 8}, 3 seeds (hours)
    python benchmarks/paper_table.py --quick              # sentiment, k = 5, 3 seeds, 5 baselines, 60 steps
    python benchmarks/paper_table.py --quick --tasks sentiment headline   # the same for both tasks
    python benchmarks/paper_table.py --tasks sentiment --seeds 0 1 2 --ks 3 5 8
    python benchmarks/paper_table.py --missing            # what the scope lacks beside the finished searches
    python benchmarks/paper_table.py --ks 3 8 --search-name search-k38 "strategies=[top, all]"   # another scope
    python benchmarks/paper_table.py --rebuild            # the table from the finished searches, nothing trains

For each task: profile SmolLM2 on the task's calibration split (a Layer Card; reused when present),
then one ``layercard search`` (into ``WORK/TASK/SEARCH_NAME``) over card-guided sets (max-quality at each k, min-cost at each
target) and every baseline at matching k plus all layers, each trained once per seed with the
same data order across strategies (the seed sets the order). Every number in the table comes from
those runs: nothing here trains or measures on its own. The table merges every finished search of a
task (``--search-name`` runs another scope beside them, e.g. more baselines), provided they share the
card and the training recipe; each search trains its own all-layer reference.

Writes ``benchmarks/results/paper_table.json`` (one row per strategy, k and seed), ``paper_table.md``
(means ± sd over seeds), ``frontier_<task>.png`` and ``searches/TASK/NAME.json``, one record per finished
search: the table merges those records with the searches under ``--work``, so it survives the loss of
``--work`` and grows on another machine (same card source and recipe). Searches and cards stay under
``--work``. Every run a search reports, finished or cut by an interruption, is kept in
``RESULTS/records/paper_<task>.jsonl`` (``--records``; the search config key ``records``) and replayed from
there: an unfinished scope continues on another machine training only what no record holds.
Needs ``layercard fetch --prepare sentiment headline`` first (``make fetch``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper.plots import plot_frontier  # noqa: E402
from benchmarks.paper.records import (ARCHIVE, archive_searches, finished_searches, machine, merged_rows,  # noqa: E402
                                      recipe_budget, scope_of, search_record, search_records, table_tasks)
from benchmarks.paper.rows import card_guided, card_predictor, score_of, strategy_of  # noqa: E402
from benchmarks.paper.tables import card_rivals, grouped, markdown, prediction_agreement  # noqa: E402
from layercard.data.task_recipes import TASKS  # noqa: E402  (the tasks' recipes, shared with the other benchmarks)


def ensure_card(task: str, work: Path, extra: list[str]) -> Path:
    from layercard.data.task_recipes import ensure_card as ensure

    return ensure(task, work, extra, ROOT / "configs" / "profile-smollm2.yaml")


def search_config(task: str, card_dir: Path, args):
    """The SearchConfig of this scope: configs/search-smollm2.yaml + the task's and the command's overrides."""
    from layercard.config import load_config
    from layercard.search.config import SearchConfig

    # one base-model eval per task, shared by its searches (the file is keyed by weights, eval data, batching)
    overrides = [f"card={card_dir}", f"ks={json.dumps(args.ks)}", f"targets={json.dumps(args.targets)}",
                 f"seeds={json.dumps(args.seeds)}", f"train.base_eval_cache={Path(card_dir).parent / 'base_eval.json'}",
                 *TASKS[task]["train"], f"records={records_file(task, args)}", *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    return load_config(SearchConfig, ROOT / "configs" / "search-smollm2.yaml", overrides)


def missing_rows(card_dir: Path, cfg, rows: list[dict]) -> tuple[dict[tuple, list[int]], int]:
    """((strategy, score, k) → the seeds this scope asks for that no finished search has trained yet, rows the scope asks for)."""
    from layercard.select.candidates import build_candidates
    from layercard.card.layer_card import LayerCard

    from layercard.profile.adam_step import step_budget
    from layercard.select.selection import resolve_model

    card = LayerCard.load(card_dir, with_stats=False)
    have = {(r["strategy"], score_of(r), r["k"], r["seed"]) for r in rows}
    score = resolve_model(card, cfg.model)
    t = cfg.train_config
    out: dict[tuple[str, int], list[int]] = {}
    wanted = set()
    for c in build_candidates(card, ks=cfg.ks, targets=cfg.targets, strategies=cfg.strategies,
                              random_seeds=cfg.random_seeds, budget_fractions=cfg.budget_fractions,
                              model=cfg.model, step_budget=step_budget(t.lr, t.steps, t.warmup_steps)):
        for label in c.labels:
            parsed = strategy_of(label, len(c.layers))
            if parsed is None:
                continue
            strategy, k = parsed
            k = len(c.layers) if strategy.startswith("min-cost") else k
            key = (strategy, score if card_guided(strategy) else None, k)
            wanted |= {(*key, seed) for seed in cfg.seeds}
            seeds = [seed for seed in cfg.seeds if (*key, seed) not in have]
            if seeds:
                out[key] = seeds
    return out, len(wanted)


def records_file(task: str, args) -> Path:
    """The run-record file of the task's searches (config key ``records``): every run they report is kept
    there and replayed from there, so a scope interrupted on one machine continues on another."""
    return Path(args.records or Path(args.results) / "records" / f"paper_{task}.jsonl").resolve()


def run_search(task: str, card_dir: Path, work: Path, args) -> Path:
    """Run (or resume) this scope's search in WORK/TASK/SEARCH_NAME; a finished one there is reused
    only if it ran the same scope, else the error says to pick another ``--search-name``."""
    from layercard.search import run as search

    out = work / task / args.search_name
    cfg = search_config(task, card_dir, args)
    if (out / search.SEARCH_FILE).exists():
        saved = scope_of(json.loads((out / search.SEARCH_FILE).read_text())["config"])
        wanted = scope_of(cfg.to_dict())
        diff = [k for k in wanted if wanted[k] != saved[k]]
        if diff:
            raise SystemExit(f"error: {out} holds a search of another scope ({diff[0]}: {saved[diff[0]]!r}, asked "
                             f"{wanted[diff[0]]!r}); pass --search-name NEW to run this scope beside it")
        if not (out / "results.parquet").exists():
            search.resume_search(out, [f"records={cfg.records}"])
        return out
    print(f"== {task}: search ({len(args.ks)} ks, {len(args.seeds)} seeds) → {out}", flush=True)
    search.run_search(cfg, out)
    return out


def print_missing(args) -> int:
    """What this scope still lacks per task (nothing trains or profiles)."""
    for task in args.tasks:
        task_dir = Path(args.work) / task
        if not (task_dir / "card" / "card.json").is_file():
            print(f"{task}: no card under {task_dir} yet: everything (profile first)")
            continue
        cfg = search_config(task, task_dir / "card", args)
        archive = Path(args.results) / ARCHIVE
        rows = merged_rows(search_records(task, Path(args.work), archive)) if task in table_tasks(
            Path(args.work), archive, []) else []
        lacking, wanted = missing_rows(task_dir / "card", cfg, rows)
        print(f"{task}: {sum(len(v) for v in lacking.values())} of {wanted} rows missing")
        for (strategy, score, k), seeds in lacking.items():
            print(f"  {strategy}{f' ({score})' if score else ''} k={k}: seeds {seeds}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS),
                   help="the tasks to train; default: sentiment and headline (sentiment only with --quick). The written table "
                        "covers every task with a finished search")
    p.add_argument("--ks", nargs="+", type=int, default=[3, 5, 8])
    p.add_argument("--targets", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the search config's)")
    p.add_argument("--quick", action="store_true",
                   help="k=5, target 0.95, seeds 0 1 2, baselines top/bottom/mid/uniform/all (sentiment unless "
                        "--tasks says otherwise), "
                        "the search config's steps and eval items")
    p.add_argument("--work", default=str(ROOT / "runs" / "paper"), help="cards and searches (reused when present)")
    p.add_argument("--search-name", default="search",
                   help="the search's directory under WORK/TASK: a new name runs another scope beside the finished "
                        "ones (the table merges every finished search of the task)")
    p.add_argument("--missing", action="store_true",
                   help="train nothing: list the (strategy, k, seeds) of this scope that no finished search "
                        "holds yet")
    p.add_argument("--rebuild", action="store_true",
                   help="train nothing: write the table from the finished searches (archived under "
                        "RESULTS/searches and under --work)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                   help="where the table goes; RESULTS/searches/TASK/NAME.json keeps every finished search's "
                        "record, so the table can grow on another machine")
    p.add_argument("--records", default=None, metavar="FILE",
                   help="run-record file the searches replay and keep their runs in (default: "
                        "RESULTS/records/paper_<task>.jsonl)")
    p.add_argument("--profile-override", dest="profile_overrides", action="append", default=[])
    p.add_argument("overrides", nargs="*", help="search config key=value overrides")
    args = p.parse_args(argv)
    args.tasks = args.tasks if args.tasks or args.quick else ["sentiment", "headline"]
    if args.quick:
        args.tasks = args.tasks or ["sentiment"]
        args.ks, args.targets, args.seeds = [5], [0.95], [0, 1, 2]
        args.overrides = ["strategies=[top, bottom, mid, uniform, all]", *args.overrides]
    if args.missing:
        return print_missing(args)
    if not args.rebuild:
        from layercard.data.fetch import verify
        from layercard.data.tasks import prepare_task

        verify(None, ["smollm2", "vader", "news"] if "headline" in args.tasks else ["smollm2", "vader"])
        for task in args.tasks:
            prepare_task(task)
    started = time.time()
    from benchmarks.provenance import commit

    code = commit()         # the code this run trains with (read before training: edits during it do not count)
    command = "python benchmarks/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    work = Path(args.work)
    if not args.rebuild:
        from layercard.search.results import SearchInterrupted

        try:
            for task in args.tasks:
                run_search(task, ensure_card(task, work, args.profile_overrides), work, args)
        except SearchInterrupted as err:      # its runs are in the record file: the same command continues
            print(f"paper_table: {err}; continue with the same command", file=sys.stderr)
            return 3
    from layercard.atomic import atomic_write_text
    from layercard.card.layer_card import LayerCard

    results = Path(args.results)
    archive = results / ARCHIVE
    tasks = table_tasks(work, archive, args.tasks)
    rows, minutes, names, untimed, agreement = [], {}, {}, {}, {}
    for task in tasks:
        live = [search_record(task, d) for d in finished_searches(work / task)]
        records = search_records(task, work, archive, live)
        card_dir = work / task / "card"
        card = LayerCard.load(card_dir, with_stats=False) if (card_dir / "card.json").is_file() else None
        if card is None:
            print(f"note: no card under {card_dir}: predicted gain fractions as each search recorded them", flush=True)
        task_rows = merged_rows(records, card_predictor(card, recipe_budget(records)) if card else None)
        rows += task_rows
        agreement[task] = prediction_agreement(grouped(task_rows), card_rivals(card) if card else None)
        minutes[task] = sum(r["minutes"] or 0.0 for r in records)
        names[task] = [r["search"] for r in records]
        untimed[task] = [r["search"] for r in records if r["minutes"] is None]
        archive_searches(task, live, archive)
    meta = {"command": command, "commit": code, "machine": machine(), "runtime_min": (time.time() - started) / 60,
            "tasks": tasks,
            "trained": [] if args.rebuild else args.tasks, "ks": args.ks, "seeds": args.seeds,
            "targets": args.targets, "quick": args.quick, "rebuild": args.rebuild,
            "search_minutes": minutes, "searches": names, "untimed_searches": untimed,
            "prediction_agreement": agreement}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "paper_table.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(results / "paper_table_meta.json", json.dumps(meta, indent=2) + "\n")
    text = markdown(rows, meta)
    atomic_write_text(results / "paper_table.md", text)
    for task in tasks:
        plot_frontier(rows, task, results / f"frontier_{task}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
