"""What a result file records of where its numbers came from: the commit and the machine.

``commit()`` is the short HEAD, marked ``-dirty`` when tracked code (the library, the pipelines, the
benchmarks, the configs) differs from it: then the numbers came from code no commit holds.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("layercard", "pipelines", "benchmarks", "configs")   # what the numbers depend on (not README prose)


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit(root: Path = ROOT) -> str | None:
    """Short HEAD of ``root``'s repository (None outside one), ``-dirty`` when tracked code has changed."""
    head = _git(root, "rev-parse", "--short", "HEAD")
    if not head:
        return None
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *CODE)
    # result files change as a run writes them: they are not code
    code = [line for line in changed.splitlines() if "benchmarks/results/" not in line]
    return head + ("-dirty" if code else "")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
