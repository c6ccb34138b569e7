"""Layer-subset search on Ray Tune under cost budgets; the measured frontier goes back into the card.

    layercard search --config configs/search-tiny.yaml --out runs/search card=runs/tiny-card budget=7e5
    layercard search --config configs/search-tiny.yaml --out runs/layers card=runs/tiny-card mode=per-layer
    layercard search --config configs/search-tiny.yaml --out runs/explore card=runs/tiny-card mode=explore \
        budget=null ks=[2]
    layercard search --resume runs/search

``mode=explore`` (a card-seeded pool per k under successive halving, the best set trained on every
seed, ``explore.json``) runs in :mod:`layercard.search.explore` on the parts of :mod:`layercard.search`.
Setup → search → write. The driver checks everything before any Ray work: the card was profiled on
the configured model (same weights hash), the candidates (:mod:`layercard.select.candidates`) include one
within the budget. Then one Tune trial per (candidate within budget, training seed): a Tune function
that builds and fits a ``TorchTrainer`` running the training pipeline's own worker,
:func:`layercard.train.worker.train_func`, on the typed :class:`layercard.train.worker.WorkerConfig`
with the trial's layers (the Ray 2.60 / Train V2 way: ``TuneReportCallback`` forwards the workers'
reports, so ASHA stops trials on their quality: the label loss where the train config has
``label_answers``, else the eval loss). Over-budget candidates are recorded, never trained.

OUT gets ``results.parquet`` (one row per candidate), ``trials.parquet`` (one per trial),
``frontier.png``, ``summary.md`` and ``card/``: a new card version with the measured columns
(``measured_eval_loss``, ``measured_quality``, ``measured_gain``, ``measured_step_seconds`` per layer, where that layer
was trained alone) and ``frontier.parquet``; the input card is left as it was. Tune keeps its
state under ``OUT/tune`` (``storage_path``); an interrupted search resumes with ``--resume OUT``
(``Tuner.restore``): completed trials are kept; unfinished ones, and ones that failed (a worker lost to
the machine, say), run again from the start.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.runtime import run_main
from layercard.search.config import SearchConfig
from layercard.search.results import SearchInterrupted
from layercard.search.run import resume_search, run_search


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
            summary = resume_search(a.resume, a.overrides)
        else:
            summary = run_search(load_config(SearchConfig, a.config, a.overrides), a.out)
    except SearchInterrupted as err:
        print(f"layercard search: {err}", file=sys.stderr)
        return 3
    except LayercardError as err:
        print(f"layercard search: error: {err}", file=sys.stderr)
        return 2
    out = Path(summary["out"])
    print((out / "summary.md").read_text().rstrip())        # the result table(s) a person reads
    print(f"\nlayercard search: wrote {out}: summary.md, results.parquet (one row per candidate), trials.parquet, "
          f"frontier.png, card/{', explore.json' if 'explore' in summary else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))   # --verbose like every command
