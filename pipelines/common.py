"""What every pipeline entry point shares: ``--config FILE --out DIR key=value …`` and error exits."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from layercard.config import load_config
from layercard.errors import LayercardError


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. profile.rank=16")
    return p


def parse_config(cls, argv: list[str] | None, prog: str, description: str, extra: Callable | None = None):
    parser = config_parser(prog, description)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return args, load_config(cls, args.config, args.overrides)


def run_main(fn: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a pipeline main; a LayercardError becomes one line on stderr and exit status 2."""
    try:
        return fn(argv) or 0
    except LayercardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def init_ray(address: str | None, **kwargs):
    """Join ``address`` / RAY_ADDRESS if given, else start (or reuse) a local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    except ConnectionError as err:
        raise LayercardError(f"cannot connect to the Ray cluster at '{address}': {str(err).splitlines()[0]}") from None
    return ray
