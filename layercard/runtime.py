"""What every command shares: ``--config FILE --out DIR key=value …``, error exits, what reaches the
terminal, and the connection to Ray."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from layercard.config import load_config
from layercard.errors import LayercardError


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. profile.rank=16")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's INFO lines, worker output and library warnings on the terminal "
                        "(default: they go to the log file, see $LAYERCARD_LOG_DIR)")
    return p


def parse_config(cls, argv: list[str] | None, prog: str, description: str, extra: Callable | None = None):
    parser = config_parser(prog, description)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return args, load_config(cls, args.config, args.overrides)


def run_main(fn: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a pipeline main; a LayercardError becomes one line on stderr and exit status 2.

    ``--verbose`` anywhere in ``argv`` is taken out here (every command accepts it) and sets
    ``LAYERCARD_VERBOSE=1``; without it the console keeps to the pipeline's own lines (see :func:`quiet_console`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"
    quiet_console()
    try:
        return fn(argv) or 0
    except LayercardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- what reaches the terminal
VERBOSE_ENV = "LAYERCARD_VERBOSE"
LOG_DIR_ENV = "LAYERCARD_LOG_DIR"
_LOG: dict = {}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def log_path() -> Path:
    """This process's log file: ``$LAYERCARD_LOG_DIR`` or ``<cache root>/logs``, one file per run (created on first write)."""
    if "path" not in _LOG:
        from layercard.paths import cache_root

        root = Path(os.environ.get(LOG_DIR_ENV) or cache_root() / "logs").expanduser()
        prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "layercard"
        _LOG["path"] = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{prog}-{os.getpid()}.log"
    return _LOG["path"]


def _file_handler() -> logging.Handler:
    if "handler" not in _LOG:
        path = log_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path, delay=True, encoding="utf-8")
        except OSError:                                   # no writable log dir: drop the messages, never fail a run
            handler = logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        _LOG["handler"] = handler
    return _LOG["handler"]


class _ConsoleFilter(logging.Filter):
    """On the terminal: WARNING and above, except Ray's start-up notice about token authentication."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and record.filename != "authentication_token_setup.py"


def reroute_logger(name: str) -> None:
    """Send ``name``'s INFO lines to the log file; its terminal handlers keep WARNING and above."""
    logger = logging.getLogger(name)
    handler = _file_handler()
    if handler not in logger.handlers:
        logger.addHandler(handler)
    for h in logger.handlers:
        if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                and not any(isinstance(f, _ConsoleFilter) for f in h.filters):
            h.addFilter(_ConsoleFilter())


def quiet_console() -> None:
    """Unless verbose: Python warnings (deprecations and the like) go to the log file, not the terminal.
    Idempotent; Ray's own loggers are rerouted where Ray starts (:func:`ray_init_kwargs`)."""
    if verbose() or _LOG.get("warnings"):
        return
    logging.captureWarnings(True)
    warn_log = logging.getLogger("py.warnings")
    warn_log.addHandler(_file_handler())
    warn_log.propagate = False
    _LOG["warnings"] = True


def ray_init_kwargs() -> dict:
    """``ray.init`` arguments for a person at the terminal: unless verbose, Ray's INFO lines (driver and Ray
    Data) go to the log file, workers' output stays in Ray's own logs (``/tmp/ray/session_latest/logs``
    locally, the job's logs under ``ray job submit``)."""
    if verbose():
        return {"log_to_driver": True}
    import ray.data  # noqa: F401  (configures the ray.data logger, rerouted below)

    # Tune's newer console engine prints its experiment table even at verbose=0; the older one is silent
    # there, and layercard's searches print their own trial lines
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    quiet_console()
    for name in ("ray", "ray.data"):
        reroute_logger(name)
    route_raylet_notices()
    return {"log_to_driver": False}


# What the raylet pushes to every driver that is routine on a small node: a Tune search starts a trial actor
# and a Train worker group per trial, which trips "N PYTHON worker processes have been started" on every
# search with few CPUs. Everything else the raylet pushes (a worker killed, out of memory) still prints.
RAYLET_NOTICES = ("worker processes have been started on node",)


def route_raylet_notices() -> None:
    """Send the raylet's routine notices (:data:`RAYLET_NOTICES`) to the log file instead of stdout.

    Ray's driver prints what the raylet pushes through ``print_to_stdstream`` whatever ``log_to_driver``
    says, and has no switch for it (ray-project/ray#63800), so that one function is wrapped; if a Ray
    release renames it, the notices print as before. Idempotent."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    log = logging.getLogger("layercard.raylet")
    if _file_handler() not in log.handlers:
        log.addHandler(_file_handler())
    log.propagate = False
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "layercard_routed", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        if data.get("pid") == "raylet":
            lines = data.get("lines") or []
            routine = [line for line in lines if any(n in line for n in RAYLET_NOTICES)]
            for line in routine:
                log.warning("(raylet) %s", line)
            if len(routine) == len(lines):
                return
            data = {**data, "lines": [line for line in lines if line not in routine]}
        return original(data, ignore_prefix)

    print_to_stdstream.layercard_routed = True
    ray_worker.print_to_stdstream = print_to_stdstream


def init_ray(address: str | None, **kwargs):
    """Join ``address`` / RAY_ADDRESS if given, else start (or reuse) a local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {**ray_init_kwargs(), **kwargs}
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    except ConnectionError as err:
        raise LayercardError(f"cannot connect to the Ray cluster at '{address}': {str(err).splitlines()[0]}") from None
    return ray


# Filesystems every node can mount at the same path; FUSE mounts (gcsfuse, s3fs, juicefs, sshfs)
# are taken to be network filesystems too.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "wekafs",
                      "virtiofs"}


def mount_fstype(path: str | Path, mounts: str | None = None) -> str:
    """Type of the filesystem ``path`` lies on: the longest mount point above it in ``mounts``
    (the text of /proc/mounts; read when None). "" when unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    path = str(Path(path).expanduser().resolve())
    best, fstype = -1, ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, fstype = len(point), parts[2]
    return fstype


def check_storage_reachable(path: str, nodes: int, key: str, *, uri_ok: bool = True,
                            mounts: str | None = None) -> None:
    """Ray Train/Tune storage must be reachable from every node: with more than one node, refuse a
    path on a node-local filesystem (a URI, or a path on NFS/Lustre/… or a FUSE mount, passes)."""
    if nodes <= 1 or "://" in str(path):
        return
    fstype = mount_fstype(path, mounts)
    if fstype in SHARED_FILESYSTEMS or fstype.startswith("fuse."):
        return
    where = f"a shared path (NFS, Lustre, … mounted on every node){' or a URI (s3://…, gs://…)' if uri_ok else ''}"
    raise LayercardError(f"storage path '{path}' is on this node's {fstype or 'local'} filesystem, but the Ray "
                         f"cluster has {nodes} nodes whose workers cannot reach it: set {key} to {where}")


def connect_ray(address: str | None) -> None:
    """Join ``address`` / RAY_ADDRESS if given, else start (or reuse) a local Ray without its dashboard
    (Ray Train and Tune drivers)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             **ray_init_kwargs())


def alive_nodes() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
