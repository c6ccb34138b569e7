"""Where layercard keeps fetched models and data, and how config paths name them.

A config path may start with ``cache:`` (``cache:models/SmolLM2-135M-Instruct``): it is resolved
under the cache root, so one YAML works whatever ``$LAYERCARD_CACHE`` says. ``~`` and ``$VARS``
are expanded too.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_PREFIX = "cache:"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$LAYERCARD_CACHE``, else ``~/.cache/layercard``."""
    return Path(cache_dir or os.environ.get("LAYERCARD_CACHE") or "~/.cache/layercard").expanduser()


def resolve_path(text: str | None) -> str | None:
    """``cache:REL`` → ``<cache root>/REL``; ``~`` and ``$VARS`` expanded; None stays None."""
    if text is None:
        return None
    text = str(text)
    if text.startswith(CACHE_PREFIX):
        return str(cache_root() / text[len(CACHE_PREFIX):].lstrip("/"))
    return os.path.expanduser(os.path.expandvars(text))
