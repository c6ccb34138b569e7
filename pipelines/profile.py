"""``layercard profile --config configs/<x>.yaml --out DIR [key=value …]``

Pass 1 (statistics) and pass 2 (coupling directions) either in this process (``ray.num_actors: 0``)
or on Ray actors (see :mod:`layercard.profile.distributed`); then the cost measurement; then the card is
written atomically.
"""
from __future__ import annotations

import sys
from pathlib import Path

from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig, should_save_stats
from layercard.profile.run import run_profile
from layercard.runtime import parse_config, run_main

def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_config(ProfileConfig, argv, "layercard profile", __doc__.splitlines()[0],
                             extra=lambda p: p.add_argument("--overwrite", action="store_true",
                                                            help="replace an existing card directory"))
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LayercardError(f"output '{out}' already exists (pass --overwrite to replace it)")
    card = run_profile(cfg)
    stats_bytes = card.stats.nbytes if card.stats is not None else 0
    with_stats = should_save_stats(cfg.profile.save_stats, stats_bytes)
    card.save(out, overwrite=args.overwrite, with_stats=with_stats)
    print(f"card {card.card_id} written to {out}" + ("" if with_stats or card.stats is None else
          f" (statistics, {stats_bytes / 2**30:.2f} GiB, not saved: profile.save_stats="
          f"{str(cfg.profile.save_stats).lower() if cfg.profile.save_stats is not None else 'null'})"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
