"""The card store: immutable, versioned Layer Cards in a directory on any pyarrow filesystem.

A store is a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands
(``file:///srv/cards``, ``s3://bucket/cards``, ``gs://…``, ``hdfs://…``). Credentials come from
the filesystem's usual environment (AWS_* / instance roles, GOOGLE_APPLICATION_CREDENTIALS, …),
never from the URI or a config. Layout::

    <root>/<model key>/<version>/            a card directory (LayerCard.save) + extra files
    <root>/<model key>/<version>/_VERSION.json   the manifest, always the last thing to appear
    <root>/.staging/<uuid>/                  local and HDFS stores: a publish in progress

A version is keyed by (model id + weights hash, data hash, config hash, created-at); its id is
``<created-at, UTC, to the second>-<12 hex of sha256(model id, weights, data, config, card id)>``,
e.g. ``20261128T162000Z-3fa2b1c09d8e``. The model key is a readable slug of the model id plus 8
hex of its hash. The config hash leaves out the ``ray`` section: the layout of actors does not
change the card (the distributed profiler reproduces the single-process one).

**Atomic, never overwriting.** Where rename is atomic (local disks, HDFS) the whole version
directory, manifest included, is written under ``.staging`` and renamed into place; the rename
fails if the version exists, so of two writers racing for one version exactly one wins and the
other gets a :class:`LayercardError`. Object stores have no atomic rename: every file is put
(one PUT per object, atomic per object), the manifest last, and a version without a manifest is
absent. Two writers of the *same* version id on an object store can both pass the existence
check; that needs the same model, weights, data, config, card content and second, so both
write the same tables and either manifest describes a complete, loadable card. Distinct versions
never share a file, and there is no shared index to corrupt: listing reads the manifests.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layercard.atomic import crash_point, fsync_tree
from layercard.card.layer_card import is_stats_file, sha256_file
from layercard.errors import LayercardError

MANIFEST = "_VERSION.json"
STAGING = ".staging"
STORE_FORMAT = 1
REQUIRED_META = ("model_id", "weights_hash", "data_hash", "config", "created_at", "card_id")
_VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")
_ATOMIC_RENAME = ("local", "hdfs")


@dataclass(frozen=True)
class CardVersion:
    """One published card, as its manifest describes it (hashes are hex strings)."""

    version: str
    model_id: str
    model_key: str
    weights_hash: str
    data_hash: str
    config_hash: str
    created_at: str           # the card's creation time (ISO 8601, UTC)
    card_id: str
    published_at: str         # when the store accepted it (ISO 8601, UTC, microseconds)
    path: str                 # the version directory on the store's filesystem
    files: dict = field(default_factory=dict)      # name → sha256 of every file of the version
    summary: dict = field(default_factory=dict)    # publisher's notes, e.g. the drift verdict

    def to_dict(self) -> dict:
        return asdict(self)


def config_hash(config: dict) -> str:
    """16 hex of sha256 of the profile config without its ``ray`` section (layout ≠ content)."""
    body = {k: v for k, v in (config or {}).items() if k != "ray"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_key(model_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._-")[:48] or "model"
    return f"{slug}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def version_id(meta: dict) -> str:
    created = _parse_time(meta["created_at"]).strftime("%Y%m%dT%H%M%SZ")
    key = "\n".join([meta["model_id"], meta["weights_hash"], meta["data_hash"], config_hash(meta["config"]),
                     meta["card_id"]])
    return f"{created}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _parse_time(text: str) -> _dt.datetime:
    try:
        t = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise LayercardError(f"card meta 'created_at' is not an ISO 8601 time: {text!r}") from None
    return t.replace(tzinfo=_dt.timezone.utc) if t.tzinfo is None else t.astimezone(_dt.timezone.utc)


def _sha256_file(path: Path) -> str:
    return sha256_file(path)


def _check_card_dir(path: Path) -> dict:
    """card.json of a card directory: a valid card (files, checksums, id) with the meta a version needs."""
    from layercard.card.layer_card import read_meta

    meta = read_meta(path)
    missing = [k for k in REQUIRED_META if meta.get(k) in (None, "")]
    if missing:
        raise LayercardError(f"card '{path}' cannot be published: card.json lacks {missing}")
    return meta


class CardStore:
    """Publish, list and load card versions. ``uri``: a local path or a pyarrow filesystem URI.

    ``atomic_rename`` picks the publish protocol; None = by filesystem (local/HDFS: stage and
    rename; anything else: manifest last). Tests force False to exercise the object-store path.
    """

    def __init__(self, uri: str | os.PathLike, *, atomic_rename: bool | None = None):
        import pyarrow.fs as pafs

        self.uri = str(uri)
        if "://" in self.uri:
            try:
                self.fs, root = pafs.FileSystem.from_uri(self.uri)
            except (ValueError, OSError) as err:     # ArrowInvalid is a ValueError
                raise LayercardError(f"card store '{self.uri}': {str(err).splitlines()[0]}") from None
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(self.uri))
        self.root = root.rstrip("/") or "/"
        self.atomic_rename = self.fs.type_name in _ATOMIC_RENAME if atomic_rename is None else atomic_rename

    def __repr__(self) -> str:
        return f"CardStore({self.uri!r})"

    # ------------------------------------------------------------------ filesystem helpers
    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _put(self, path: str, data: bytes) -> None:
        """One object, whole or not at all: a PUT on object stores, write-then-rename elsewhere."""
        if self.fs.type_name in _ATOMIC_RENAME:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    # ------------------------------------------------------------------ publish
    def publish(self, card, *, extra_files: dict[str, bytes] | None = None, summary: dict | None = None) -> CardVersion:
        """Publish a :class:`~layercard.card.layer_card.LayerCard` (saved here) or a saved card directory as a
        new version; ``extra_files`` (name → bytes, e.g. a drift report) travel with it. Raises if
        the version exists: the store never overwrites one."""
        local_stage = self.fs.type_name == "local" and self.atomic_rename
        parent = self._join(STAGING) if local_stage else tempfile.mkdtemp(prefix="layercard-publish-")
        if local_stage:
            self.fs.create_dir(parent, recursive=True)
        stage = Path(parent) / uuid.uuid4().hex
        try:
            if hasattr(card, "save"):
                card.save(stage)
            else:
                _check_card_dir(Path(card))
                shutil.copytree(card, stage)
            meta = _check_card_dir(stage)
            for name, data in (extra_files or {}).items():
                if "/" in name or name.startswith(".") or name == MANIFEST or name in meta.get("files", {}) \
                        or name == "card.json":
                    raise LayercardError(f"extra file name '{name}' is not allowed (a card file, the manifest, or a path)")
                (stage / name).write_bytes(data)
            version = version_id(meta)
            mkey = model_key(meta["model_id"])
            final = self._join(mkey, version)
            manifest = {
                "store_format": STORE_FORMAT, "version": version, "model_id": meta["model_id"], "model_key": mkey,
                "weights_hash": meta["weights_hash"], "data_hash": meta["data_hash"],
                "config_hash": config_hash(meta["config"]), "created_at": meta["created_at"], "card_id": meta["card_id"],
                "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                "files": {p.name: _sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file()},
                "summary": summary or {},
            }
            manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
            self.fs.create_dir(self._join(mkey), recursive=True)
            if self.atomic_rename:
                self._publish_by_rename(stage, final, manifest_bytes, version)
            else:
                self._publish_manifest_last(stage, final, manifest_bytes, version)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            if not local_stage:
                shutil.rmtree(parent, ignore_errors=True)
        return self._version_from_manifest(manifest, final)

    def _exists_error(self, version: str) -> LayercardError:
        return LayercardError(f"version {version} already exists in store '{self.uri}'; the store never overwrites a version")

    def _publish_by_rename(self, stage: Path, final: str, manifest: bytes, version: str) -> None:
        (stage / MANIFEST).write_bytes(manifest)
        fsync_tree(stage)                  # the version's bytes are on disk before its name appears
        src = str(stage)
        if self.fs.type_name != "local":   # HDFS: upload to a staging dir on the store, then rename there
            import pyarrow.fs as pafs

            src = self._join(STAGING, stage.name)
            pafs.copy_files(str(stage), src, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        if self._exists(final):
            raise self._exists_error(version)
        crash_point("store-staged")
        try:
            self.fs.move(src, final)       # fails if another writer renamed its copy into place first
            if self.fs.type_name == "local":
                fsync_tree(Path(final).parent)
        except OSError:
            if self._exists(final):
                raise self._exists_error(version) from None
            raise
        finally:
            if src != str(stage) and self._exists(src):
                self.fs.delete_dir(src)

    def _publish_manifest_last(self, stage: Path, final: str, manifest: bytes, version: str) -> None:
        if self._exists(f"{final}/{MANIFEST}"):
            raise self._exists_error(version)
        self.fs.create_dir(final, recursive=True)
        for p in sorted(stage.iterdir()):
            if p.is_file():
                self._put(f"{final}/{p.name}", p.read_bytes())
        self._put(f"{final}/{MANIFEST}", manifest)

    # ------------------------------------------------------------------ read
    def _version_from_manifest(self, m: dict, path: str) -> CardVersion:
        return CardVersion(m["version"], m["model_id"], m["model_key"], m["weights_hash"], m["data_hash"],
                           m["config_hash"], m["created_at"], m["card_id"], m["published_at"], path,
                           m.get("files", {}), m.get("summary", {}))

    def list_versions(self, model: str | None = None) -> list[CardVersion]:
        """Every published version, oldest first; ``model``: a model id or model key to filter by."""
        import pyarrow.fs as pafs

        if not self._exists(self.root):
            return []
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            rel = info.path[len(self.root.rstrip("/")) + 1:] if self.root != "/" else info.path.lstrip("/")
            parts = rel.split("/")
            if len(parts) != 3 or parts[2] != MANIFEST or parts[0].startswith((".", "_")):
                continue
            if not _VERSION_RE.match(parts[1]):
                continue
            try:
                m = json.loads(self._read(info.path))
            except (OSError, json.JSONDecodeError):
                continue        # a manifest being written on a store without atomic puts: not there yet
            if model is None or model in (m.get("model_id"), m.get("model_key")):
                out.append(self._version_from_manifest(m, info.path.rsplit("/", 1)[0]))
        return sorted(out, key=lambda v: (_parse_time(v.created_at), v.published_at, v.version))

    def models(self) -> list[str]:
        return sorted({v.model_id for v in self.list_versions()})

    def get(self, version: str) -> CardVersion:
        """The manifest of ``version`` (an id, or ``<model key>/<id>``); an unknown id names the newest ones."""
        want = version.rsplit("/", 1)[-1]
        found = [v for v in self.list_versions() if v.version == want
                 and (version == want or version == f"{v.model_key}/{want}")]
        if not found:
            known = [v.version for v in self.list_versions()][-5:]
            raise LayercardError(f"version '{version}' is not in store '{self.uri}'"
                                 + (f" (newest: {', '.join(known)})" if known else " (the store is empty)"))
        return found[0]

    def latest(self, model: str) -> CardVersion | None:
        """The newest version of ``model`` (model id or key), or None when it has none."""
        versions = self.list_versions(model)
        return versions[-1] if versions else None

    def read_file(self, version: str | CardVersion, name: str) -> bytes:
        v = version if isinstance(version, CardVersion) else self.get(version)
        if name not in v.files:
            raise LayercardError(f"version {v.version} has no file '{name}' (it has {sorted(v.files)})")
        data = self._read(f"{v.path}/{name}")
        if hashlib.sha256(data).hexdigest() != v.files[name]:
            raise LayercardError(f"version {v.version}: '{name}' does not match its sha256 in {MANIFEST}")
        return data

    def load(self, version: str | CardVersion, *, with_stats: bool = True):
        """The :class:`~layercard.card.layer_card.LayerCard` of ``version`` (checksums verified)."""
        import pyarrow.fs as pafs

        from layercard.card.layer_card import LayerCard

        v = version if isinstance(version, CardVersion) else self.get(version)
        if self.fs.type_name == "local":
            self._verify(v, v.path, with_stats)
            card = LayerCard.load(v.path, with_stats=with_stats)
        else:
            with tempfile.TemporaryDirectory(prefix="layercard-load-") as tmp:
                pafs.copy_files(v.path, tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
                self._verify(v, tmp, with_stats)
                card = LayerCard.load(tmp, with_stats=with_stats)
        if card.card_id != v.card_id:
            raise LayercardError(f"version {v.version}: card id {card.card_id} does not match its manifest ({v.card_id})")
        return card

    def _verify(self, v: CardVersion, local_dir: str | Path, with_stats: bool = True) -> None:
        """Every file the manifest lists, present with the sha256 it records (card.json and extra files
        included): a file edited or swapped on the store is named, whatever card.json now says.
        ``with_stats=False``: the statistics file, which will not be read, is not hashed."""
        if not isinstance(v.files, dict) or not v.files:
            raise LayercardError(f"version {v.version}: its manifest lists no files")
        for name, digest in sorted(v.files.items()):
            f = Path(local_dir) / str(name)
            if "/" in str(name) or not f.is_file():
                raise LayercardError(f"version {v.version}: '{name}' is missing from the store")
            if is_stats_file(str(name)) and not with_stats:
                continue
            if _sha256_file(f) != digest:
                raise LayercardError(f"version {v.version}: '{name}' does not match its sha256 in {MANIFEST}")


def default_store(explicit: str | None) -> str:
    """``--store`` if given, else $LAYERCARD_STORE; an error naming both when neither is set."""
    uri = explicit or os.environ.get("LAYERCARD_STORE")
    if not uri:
        raise LayercardError("no card store: pass --store PATH_OR_URI or set LAYERCARD_STORE")
    return uri
