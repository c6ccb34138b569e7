"""The package layout's dependency rules, read from the source with ``ast``: the library and the
benchmarks never import a pipeline, a pipeline imports only the library (the command table,
``pipelines/cli.py``, names the others), each stage is a subpackage of the library, and the public
API stays importable from ``layercard``."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("profile", "card", "select", "search", "train", "data")
PUBLIC = ("LayerCard", "LayercardError", "additivity_error", "predicted_cost", "predicted_gain", "profile_model")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
            if node.module == "pipelines":                   # from pipelines import train
                out += [(node.lineno, f"pipelines.{a.name}") for a in node.names]
    return out


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def pipeline_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in imported_modules(path)
            if module == "pipelines" or module.startswith("pipelines.")]


def test_the_library_and_the_benchmarks_import_no_pipeline():
    files = python_files("layercard", "benchmarks")
    assert len(files) > 20
    assert [hit for path in files for hit in pipeline_imports(path)] == []


def test_pipelines_import_only_the_library_except_the_command_table():
    files = [p for p in python_files("pipelines") if p.name != "cli.py"]
    assert len(files) > 10
    assert [hit for path in files for hit in pipeline_imports(path)] == []


def test_the_command_table_names_pipelines():
    modules = {m for _, m in imported_modules(ROOT / "pipelines" / "cli.py")}
    assert not any(m.startswith("pipelines") for m in modules)      # it imports them by name, on demand
    cli = importlib.import_module("pipelines.cli")
    for name, (module, _) in cli.COMMANDS.items():
        assert module.startswith("pipelines.") and (ROOT / (module.replace(".", "/") + ".py")).is_file(), name


def test_the_library_names_no_pipeline_module():
    """Not even by name (an importlib string would hide the dependency from the import checks)."""
    hits = []
    for path in python_files("layercard"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("pipelines."):
                hits.append((str(path.relative_to(ROOT)), node.value))
    assert hits == []


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_subpackage(stage):
    package = ROOT / "layercard" / stage
    assert (package / "__init__.py").is_file()
    assert not (ROOT / "layercard" / f"{stage}.py").exists()       # no flat module beside the package
    assert len(list(package.glob("*.py"))) >= 2
    importlib.import_module(f"layercard.{stage}")


def test_every_package_directory_is_a_package():
    """setuptools' package discovery (pyproject: include layercard*) finds only directories with __init__.py."""
    for d in [ROOT / "layercard", *(p for p in (ROOT / "layercard").rglob("*") if p.is_dir())]:
        if d.name != "__pycache__" and any(d.glob("*.py")):
            assert (d / "__init__.py").is_file(), d


def test_the_public_api_is_importable_from_layercard():
    import layercard

    assert set(PUBLIC) <= set(layercard.__all__)
    for name in PUBLIC:
        assert getattr(layercard, name) is not None
