"""Whole-or-nothing writes: every file and directory layercard produces goes through here.

A reader (or a process killed half-way) sees either the previous version or the complete new one,
never a truncated file or a missing directory:

* :func:`atomic_write_bytes` / ``_text`` / ``_json`` write a sibling temporary file, fsync it,
  and rename it over the target, then fsync the directory so the rename survives a power loss.
* :func:`atomic_dir` yields a temporary sibling directory to fill; on a clean exit its files and
  directories are fsynced and it takes the target's place. On Linux the swap with an existing
  version is one ``renameat2(RENAME_EXCHANGE)`` call, so there is no instant at which the target
  is missing; elsewhere the old version is moved aside, the new one renamed in, and the old one
  put back if that rename fails (and restored by the next write if the process died in between).

A temporary sibling is named after its writer, ``.<name>.tmp-<host>-<pid>-<random>``. A writer that
is killed (SIGKILL, OOM, a lost node) cannot remove its own, and a killed profile's can hold gigabytes
of statistics, so every write first removes the siblings of its target that a writer on this host left
when its process is gone (:func:`remove_stale_temporaries`). A live writer's, another host's and
older-named ones are left alone.

Temporary files and directories get the permissions a plain ``open``/``mkdir`` would give under
the process umask (``mkstemp``/``mkdtemp`` would leave them 0600/0700, unreadable to a team that
shares a store or a results directory).

``LAYERCARD_TEST_KILL_AT=<step>[#N]`` makes the process SIGKILL itself at the named step (see
:data:`STEPS`; ``#N``: its N-th occurrence); the tests use it to check what a crash at each step leaves behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import uuid
from pathlib import Path

from layercard.errors import LayercardError

KILL_ENV = "LAYERCARD_TEST_KILL_AT"
STEPS = ("file-written", "file-synced", "file-renamed",
         "dir-filled", "dir-synced", "dir-old-moved", "dir-renamed", "store-staged")

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


_SEEN: dict[str, int] = {}


def crash_point(name: str) -> None:
    """The crash-test hook: die here, as a power cut or OOM kill would, when the env names this step
    (``<step>`` = its first occurrence in the process, ``<step>#N`` = the N-th)."""
    want = os.environ.get(KILL_ENV)
    if not want or not want.startswith(name):
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if want in (name, f"{name}#{_SEEN[name]}") and (want != name or _SEEN[name] == 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _writer_host() -> str:
    """This host, and its pid namespace (containers sharing a hostname and a volume have their own pids),
    without "-" (it separates the pid in a temporary's name)."""
    host = socket.gethostname() or "localhost"
    with contextlib.suppress(OSError):
        host += "_" + "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    return re.sub(r"[^A-Za-z0-9_.]", "_", host)


_HOST = _writer_host()


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, another user's
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by writers on this host whose process is gone;
    returns what was removed. Live writers' temporaries, other hosts' (a shared filesystem) and names
    without a writer are kept: a pid that was reused only delays the removal."""
    path = Path(path)
    removed = []
    lead = f".{path.name}.tmp-"
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f"{glob.escape(lead)}*"):
            parts = p.name[len(lead):].rsplit("-", 2)
            if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit() or _alive(int(parts[1])):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def _umask() -> int:
    """The process umask (Linux exposes it without the set-and-restore race of ``os.umask``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:      # some filesystems refuse fsync on a directory; the data itself was synced
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


# --------------------------------------------------------------------------- renames
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        return lib if hasattr(lib, "renameat2") else None
    except OSError:
        return None


_LIBC = _libc()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when the kernel did it; False when renameat2 or the flag is unsupported here (fall back)."""
    if _LIBC is None:
        return False
    if _LIBC.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):          # ENOSYS, EINVAL (flag unknown to this filesystem), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, which must not exist (a racing writer that got there first wins)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise LayercardError(f"'{dst}' already exists") from None
    if dst.exists():
        raise LayercardError(f"'{dst}' already exists")
    os.rename(src, dst)


def _old_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")


def restore_moved_aside(path: Path) -> None:
    """Undo what a writer killed mid-swap (move-aside fallback) left: with ``path`` missing, put the
    newest ``.<name>.old-*`` back; with ``path`` present, those are superseded versions, removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        with contextlib.suppress(OSError):
            os.rename(olds.pop(), path)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete ``tmp`` at ``path``, replacing what is there; the old version is removed last."""
    if path.exists() and _renameat2(tmp, path, _RENAME_EXCHANGE):
        crash_point("dir-renamed")
        _fsync_path(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)      # tmp now holds the old version
        return
    old = None
    if path.exists():
        old = _old_sibling(path)
        os.rename(path, old)
        crash_point("dir-old-moved")
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)     # put the previous version back
        raise
    crash_point("dir-renamed")
    _fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- public
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (creating the parent directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            crash_point("file-written")
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        crash_point("file-synced")
        os.replace(tmp, path)
        crash_point("file-renamed")
        _fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, **dumps_kwargs) -> Path:
    """JSON (indent 2 unless given) plus a trailing newline, written atomically."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False):
    """Yield a temporary sibling directory to fill; on a clean exit it becomes ``path``.

    ``replace=False``: an existing ``path`` is an error (also when another writer renames its
    directory in first). ``replace=True``: the old version stays readable until the new one is
    complete, and is put back if the swap fails. On an exception the temporary directory is removed
    and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(path)
    remove_stale_temporaries(path)
    if path.exists() and not replace:
        raise LayercardError(f"'{path}' already exists")
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        crash_point("dir-filled")
        fsync_tree(tmp)
        crash_point("dir-synced")
        if replace:
            _swap_in(tmp, path)
        else:
            _rename_new(tmp, path)
            crash_point("dir-renamed")
            _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) writable by its owner only: run directories hold checkpoints
    that resuming unpickles, so whoever can write there can run code (see :func:`check_private`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, os.stat(path).st_mode & ~0o022)
    return path


def check_private(path: str | Path, what: str = "directory") -> None:
    """Refuse to resume from ``path`` when group or others can write to it (or to a directory in it):
    resuming unpickles what is stored there. Local paths only; a URI is the operator's to secure."""
    path = Path(path)
    if not path.exists():
        return
    for dirpath, _dirs, files in os.walk(path):
        for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            mode = os.lstat(p).st_mode
            if not stat.S_ISLNK(mode) and mode & 0o022:
                raise LayercardError(f"refusing to resume from {what} '{path}': '{p}' is writable by group or others, "
                                     f"and resuming unpickles what is stored there (chmod -R go-w '{path}')")
