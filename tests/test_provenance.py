"""benchmarks/provenance.py: the commit a result file records is marked -dirty when tracked code differs
from it (not when only results or prose do), and is None outside a repository."""
from __future__ import annotations

import subprocess

from bench_scripts import load_benchmark


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_commit_is_marked_dirty_when_tracked_code_changed(tmp_path):
    prov = load_benchmark("provenance")
    for rel in ("layercard/a.py", "benchmarks/results/r.json", "README.md", "configs/c.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert prov.commit(tmp_path) == head
    (tmp_path / "benchmarks/results/r.json").write_text("1\n")     # a run writing its results
    (tmp_path / "README.md").write_text("1\n")
    (tmp_path / "layercard/new.py").write_text("1\n")              # untracked: not part of any commit's code
    assert prov.commit(tmp_path) == head
    (tmp_path / "configs/c.yaml").write_text("1\n")
    assert prov.commit(tmp_path) == head + "-dirty"
    _git(tmp_path, "checkout", "--", "configs")
    (tmp_path / "layercard/a.py").write_text("1\n")
    assert prov.commit(tmp_path) == head + "-dirty"


def test_commit_outside_a_repository_is_none(tmp_path):
    assert load_benchmark("provenance").commit(tmp_path) is None
    assert load_benchmark("provenance").machine().count(",") == 2
