"""``layercard reprofile --config configs/<x>.yaml --store STORE --out DIR [--against VERSION] [key=value …]``

Profile the model and data the config names (a new checkpoint, new calibration data), publish the
card as a new version in the store, diff it against the previous version of the same model (or
``--against VERSION``) and write ``drift.json`` + ``drift.md`` to ``--out`` and beside the version
in the store. "The same model" is the same model id (``model.path`` / ``model.gguf_file`` as
written, or the config and seed of a random model): a checkpoint updated in place at one path is
compared with its predecessor automatically; one at a new path needs ``--against``.

The config is a profile config plus an optional ``drift`` section of thresholds
(:class:`layercard.card.drift.DriftSettings`), e.g. ``drift.min_kendall_tau=0.9``. A store keeps a
version per run, so it keeps the card without its sufficient statistics unless the config says
``profile.save_stats: true`` or ``--with-stats`` is given (``null``, the default, means none here).

The drift report is written to ``--out`` before the version is published, so a run that fails while
publishing leaves no version behind and its rerun (``--overwrite``) compares against the same
predecessor. Exit status, for a scheduler to act on: 0 = no drift (or the first version of this model),
3 = drift above the thresholds (the changed layers are named on stdout and in drift.md),
2 = bad input (config, store, unknown version), 1 = anything unexpected.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from layercard.atomic import atomic_dir
from layercard.config import load_config
from layercard.card.drift import ReprofileConfig, card_identity, diff_cards, drift_markdown
from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig
from layercard.card.store import CardStore, default_store, version_id
from layercard.runtime import config_parser, run_main

EXIT_OK, EXIT_DRIFT = 0, 3


def profile_card(cfg: ProfileConfig, progress: bool = True):
    """The card ``layercard profile`` makes (pass 1, coupling pass, cost), locally or on Ray actors."""
    from layercard.profile.run import run_profile

    return run_profile(cfg, progress=progress)


def baseline_report(card, version: str) -> dict:
    return {"against": None, "new": card_identity(card, version), "drift": False, "reasons": [],
            "changed_layers": [], "notes": ["first version of this model in the store: nothing to compare"]}


def write_outputs(out: Path, files: dict[str, str], overwrite: bool) -> None:
    """``out`` appears whole or not at all; an older ``out`` stays until the new one is complete."""
    with atomic_dir(out, replace=overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def print_summary(report: dict, version: str, out: Path) -> None:
    against = report["against"]
    print(f"published version {version} (model {report['new']['model_id']})")
    if against is None:
        print("no earlier version of this model: this one is the baseline (exit 0)")
    elif report["drift"]:
        print(f"DRIFT against {against['version']}: changed layers: {', '.join(map(str, report['changed_layers']))}")
        for reason in report["reasons"]:
            print(f"  - {reason}")
    else:
        taus = {k: r["kendall_tau"] for k, r in report.get("rankings", {}).items()}
        print(f"no drift against {against['version']} (Kendall τ {taus})")
    print(f"drift report: {out / 'drift.md'}")


def main(argv: list[str] | None = None) -> int:
    p = config_parser("layercard reprofile", __doc__.splitlines()[0])
    p.add_argument("--store", help="card store: a path or pyarrow URI (default: $LAYERCARD_STORE)")
    p.add_argument("--against", metavar="VERSION", help="compare with this version (default: the model's latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--with-stats", action="store_true",
                   help="store the sufficient statistics too (stats.safetensors, ~3 GiB per layer of an 8B model); "
                        "the same as profile.save_stats=true")
    args = p.parse_args(argv)
    cfg = load_config(ReprofileConfig, args.config, args.overrides)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LayercardError(f"output '{out}' already exists (pass --overwrite to replace it)")
    store = CardStore(default_store(args.store))
    against = store.get(args.against) if args.against else None     # an unknown version fails before profiling

    pcfg = cfg.profile_config()
    with_stats = args.with_stats or pcfg.profile.save_stats is True
    card = profile_card(pcfg)
    if against is None:
        against = store.latest(card.meta["model_id"])
    with tempfile.TemporaryDirectory(prefix="layercard-reprofile-") as tmp:
        # saving fixes created_at and card_id, hence the version id
        saved = card.save(Path(tmp) / "card", with_stats=with_stats)
        version = version_id(card.meta)
        if against is None:
            report = baseline_report(card, version)
        else:
            old = store.load(against, with_stats=False)
            report = diff_cards(old, card, cfg.drift, old_version=against.version, new_version=version)
        report["exit_code"] = EXIT_DRIFT if report["drift"] else EXIT_OK
        files = {"drift.json": json.dumps(report, indent=2, sort_keys=True, default=str), "drift.md": drift_markdown(report)}
        summary = {"against": against.version if against else None, "drift": report["drift"] if against else None,
                   "changed_layers": report["changed_layers"]}
        # The report first, then the store: a failure while publishing leaves the report and no new
        # version, so a rerun diffs against the same predecessor and finds the same drift (publishing
        # first would make the rerun compare the card with itself and report none).
        write_outputs(out, files, args.overwrite)
        published = store.publish(saved, extra_files={k: v.encode() for k, v in files.items()}, summary=summary)
    print_summary(report, published.version, out)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(run_main(main))
