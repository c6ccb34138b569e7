"""Whole-or-nothing writes (layercard/atomic.py): a writer SIGKILLed at each step leaves the previous
version intact and the new one complete or absent; files and directories get umask permissions."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layercard.atomic import KILL_ENV, atomic_dir, atomic_write_bytes, atomic_write_json, check_private, \
    private_dir, remove_stale_temporaries, restore_moved_aside
from layercard.errors import LayercardError

ROOT = Path(__file__).resolve().parents[1]

# The writer imports layercard.atomic without the package's __init__ (which loads torch): ~0.1 s a run.
WRITER = textwrap.dedent("""
    import sys, types
    from pathlib import Path
    pkg = types.ModuleType("layercard")
    pkg.__path__ = [sys.argv[4]]
    sys.modules["layercard"] = pkg
    import layercard.atomic as atomic

    kind, target, fallback = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    if fallback:
        atomic._LIBC = None           # a system without renameat2: move aside, rename in, put back
    if kind == "file":
        atomic.atomic_write_bytes(target, b"new " * 50_000)
    elif kind == "dir":
        with atomic.atomic_dir(target, replace=True) as tmp:
            for i in range(5):
                (tmp / f"part{i}").write_bytes(b"new " * 10_000)
    elif kind == "new-dir":
        with atomic.atomic_dir(target) as tmp:
            (tmp / "part0").write_bytes(b"new")
""")


def run_writer(kind: str, target: Path, step: str | None, fallback: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(KILL_ENV, None)
    if step:
        env[KILL_ENV] = step
    return subprocess.run([sys.executable, "-c", WRITER, kind, str(target), "1" if fallback else "0",
                           str(ROOT / "layercard")], env=env,
                          timeout=120).returncode


def dir_state(path: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else None


OLD_DIR = {f"part{i}": b"old" for i in range(3)}
NEW_DIR = {f"part{i}": b"new " * 10_000 for i in range(5)}


@pytest.mark.parametrize("step", ["file-written", "file-synced", "file-renamed"])
def test_file_write_killed_at_each_step(tmp_path, step):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    assert run_writer("file", target, step) == -signal.SIGKILL
    assert target.read_bytes() in (b"old", b"new " * 50_000)        # never a truncated mix
    assert target.read_bytes() == (b"new " * 50_000 if step == "file-renamed" else b"old")
    left = list(tmp_path.glob(".results.json.tmp-*"))
    assert len(left) == (0 if step == "file-renamed" else 1)    # the killed writer could not remove its own
    assert run_writer("file", target, None) == 0
    assert target.read_bytes() == b"new " * 50_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]   # the next write removed it


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "move-aside"])
@pytest.mark.parametrize("step", ["dir-filled", "dir-synced", "dir-old-moved", "dir-renamed"])
def test_dir_replace_killed_at_each_step(tmp_path, step, fallback):
    target = tmp_path / "card"
    target.mkdir()
    for name, data in OLD_DIR.items():
        (target / name).write_bytes(data)
    rc = run_writer("dir", target, step, fallback)
    hit = step != "dir-old-moved" or fallback          # an atomic exchange never moves the old version aside
    assert rc == (-signal.SIGKILL if hit else 0)
    if step == "dir-old-moved" and hit:
        # the only instant without a card at the path: the old one waits beside it, whole, and the
        # next write (or restore_moved_aside) puts it back
        assert not target.exists()
        restore_moved_aside(target)
    expect = NEW_DIR if step == "dir-renamed" or not hit else OLD_DIR
    assert dir_state(target) == expect
    assert run_writer("dir", target, None, fallback) == 0
    assert dir_state(target) == NEW_DIR
    assert not list(tmp_path.glob(".card.old-*"))
    assert not list(tmp_path.glob(".card.tmp-*"))       # the killed writer's temporary went with the next write


@pytest.mark.parametrize("step", ["dir-filled", "dir-synced", "dir-renamed"])
def test_new_dir_killed_at_each_step_is_whole_or_absent(tmp_path, step):
    target = tmp_path / "selection"
    assert run_writer("new-dir", target, step) == -signal.SIGKILL
    assert dir_state(target) == ({"part0": b"new"} if step == "dir-renamed" else None)


def test_only_dead_writers_temporaries_on_this_host_are_removed(tmp_path):
    """A killed profile's temporary directory is removed by the next write to its target; a live
    writer's (this process, or another running one), another host's, an unrelated target's and one
    without a writer in its name are kept."""
    import layercard.atomic as atomic

    target = tmp_path / "card"
    run_writer("new-dir", target, "dir-filled")                      # killed: leaves a full temporary
    (dead,) = tmp_path.glob(".card.tmp-*")
    assert (dead / "part0").read_bytes() == b"new"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [tmp_path / f".card.tmp-{atomic._HOST}-{os.getpid()}-mine",
                tmp_path / f".card.tmp-{atomic._HOST}-{sleeper.pid}-live",
                tmp_path / ".card.tmp-otherhost_1-1-x", tmp_path / ".card.tmp-nowriter",
                tmp_path / f".cards.tmp-{atomic._HOST}-999999999-x"]
        for p in keep:
            p.mkdir()
        assert remove_stale_temporaries(target) == [dead]
        assert not dead.exists() and all(p.is_dir() for p in keep)
        with atomic_dir(target) as tmp:                                # a write does the same first
            (tmp / "a").write_text("1")
        assert all(p.is_dir() for p in keep) and (target / "a").read_text() == "1"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [keep[1]]            # its writer is gone now


def test_new_dir_refuses_an_existing_target(tmp_path):
    (tmp_path / "sel").mkdir()
    with pytest.raises(LayercardError, match="already exists"):
        with atomic_dir(tmp_path / "sel"):
            pass


def test_failure_inside_leaves_the_old_version_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    atomic_write_json(target / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "a.json").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a.json").read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "card") as tmp:
            (tmp / "x").write_text("x")
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "card").stat().st_mode & 0o777 == 0o755     # mkdtemp alone would leave 0700
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644    # mkstemp alone would leave 0600


def test_resume_refuses_a_directory_others_can_write(tmp_path):
    run = private_dir(tmp_path / "runs" / "a")
    assert run.stat().st_mode & 0o022 == 0
    (run / "ckpt").mkdir()
    check_private(run)                                   # owner-writable only: fine
    os.chmod(run / "ckpt", 0o777)
    with pytest.raises(LayercardError, match=r"refusing to resume from .*ckpt.* writable by group or others") as err:
        check_private(run, "run directory")
    assert "\n" not in str(err.value)


REAL_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from fake_cards import make_card
    from layercard.card.store import CardStore

    kind, target = sys.argv[1], sys.argv[2]
    if kind == "card":
        card = make_card(seed=1)
        card.meta["note"] = "new"
        card.save(target, overwrite=True)
    else:
        CardStore(target).publish(make_card(seed=1, created_at="2026-11-02T10:00:00+00:00"))
""")


def run_real_writer(kind: str, target: Path, step: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), KILL_ENV: step}
    return subprocess.run([sys.executable, "-c", REAL_WRITER, kind, str(target), str(ROOT / "tests")], env=env,
                          timeout=300).returncode


@pytest.mark.parametrize("step", ["dir-synced", "dir-renamed"])
def test_card_save_killed_keeps_a_loadable_card(tmp_path, step):
    """LayerCard.save over an existing card, SIGKILLed before and after the swap: the card at the path
    loads (checksums and id verified) and is the old one or the complete new one."""
    from fake_cards import make_card

    from layercard.card.layer_card import LayerCard

    target = tmp_path / "card"
    make_card().save(target)
    assert run_real_writer("card", target, step) == -signal.SIGKILL
    loaded = LayerCard.load(target)
    assert loaded.meta.get("note") == ("new" if step == "dir-renamed" else None)


def test_store_publish_killed_before_the_rename_leaves_no_version(tmp_path):
    from fake_cards import make_card

    from layercard.card.store import CardStore

    store = CardStore(tmp_path / "store")
    old = store.publish(make_card())
    assert run_real_writer("store", tmp_path / "store", "store-staged") == -signal.SIGKILL
    assert [v.version for v in store.list_versions()] == [old.version]
    store.load(old.version)                                    # every file still matches its manifest
    assert store.publish(make_card(seed=1, created_at="2026-11-02T10:00:00+00:00")).version != old.version
