"""The Layer Card on disk: Parquet tables + a JSON sidecar, written atomically, validated on load.

A card directory holds ``layers.parquet`` (one row per layer), ``modules.parquet`` (one row per
target module), ``coupling.parquet`` (long form: layer_i, layer_j, rho, k), ``card.json``
(metadata and the sha256 of every file) and optionally ``stats.safetensors`` (the sufficient
statistics, so the coupling pass and re-analysis need no new forward passes). Nothing is pickled.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from layercard.atomic import atomic_dir
from layercard.errors import LayercardError
from layercard.profile.stats import SufficientStats

SCHEMA_VERSION = 2                # 2: gain_adj_rank_r (derived on load from a schema-1 card's module table)
STAT_COLUMNS = ["res2", "res2_rank_r", "res_frac", "grad_norm", "energy", "kappa", "erank", "d_eff", "gain_adj",
                "gain_adj_rank_r"]
LAYER_COLUMNS = ["layer", "n_tokens", *STAT_COLUMNS]
MODULE_COLUMNS = ["layer", "module", "target", "d_in", "d_out", "n_tokens", *STAT_COLUMNS]
COUPLING_COLUMNS = ["layer_i", "layer_j", "rho", "k"]
TABLES = {"layers.parquet": LAYER_COLUMNS, "modules.parquet": MODULE_COLUMNS, "coupling.parquet": COUPLING_COLUMNS}
STATS_FILE = "stats.safetensors"
STATS_SLICE_PREFIX = "stats-slice-"   # a Ray profile's statistics: one file per layer slice, by its owner


def stats_slice_file(slice_id: int) -> str:
    return f"{STATS_SLICE_PREFIX}{slice_id:03d}.safetensors"


def is_stats_file(name: str) -> bool:
    """The statistics: ``stats.safetensors``, or one ``stats-slice-NNN.safetensors`` per layer slice."""
    return name == STATS_FILE or (name.startswith(STATS_SLICE_PREFIX) and name.endswith(".safetensors"))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("layercard", "torch", "transformers", "peft", "ray", "deepspeed", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_id_of(files: dict[str, str]) -> str:
    """A card's id: 16 hex of sha256 over its files' hashes. Recomputed on every load, so an edited
    file whose new hash was written into card.json still cannot pass under the old id."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _add_rank_r_gain(tables: dict, meta: dict, path: Path) -> None:
    """Schema-1 cards predate ``gain_adj_rank_r``; it is a function of columns their module table
    carries (res2_rank_r, res2, gg, n_tokens, d_out, d_eff) and meta ``rank``. Layer value = the sum
    over the layer's modules, as :func:`layercard.profile.profiler.aggregate_layers` does."""
    from layercard.profile.metrics import gain_adj_rank_r

    mods, layers = tables.get("modules.parquet"), tables.get("layers.parquet")
    need = ["layer", "res2_rank_r", "res2", "gg", "n_tokens", "d_out", "d_eff"]
    rank = meta.get("rank")
    if mods is None or layers is None or any(c not in mods.columns for c in need) or not isinstance(rank, int):
        raise LayercardError(f"card '{path}' has schema version 1 and lacks what gain_adj_rank_r is derived from "
                             f"(module columns {need[1:]} and meta 'rank'); re-profile it")
    mods["gain_adj_rank_r"] = [gain_adj_rank_r(m.res2_rank_r, m.res2, m.gg, m.n_tokens, m.d_out, m.d_eff, rank)
                               for m in mods.itertuples()]
    per_layer = mods.groupby("layer")["gain_adj_rank_r"].sum()
    layers["gain_adj_rank_r"] = layers["layer"].map(per_layer).to_numpy(np.float64)


def _read_stats(path: Path, name: str) -> SufficientStats:
    from safetensors import safe_open

    try:
        with safe_open(str(path / name), framework="pt") as f:
            return SufficientStats.from_tensors({n: f.get_tensor(n) for n in f.keys()}, f.metadata())
    except (OSError, ValueError, RuntimeError) as err:   # safetensors' header errors
        raise LayercardError(f"card '{path}': '{name}' is not a readable safetensors file "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def read_meta(path: Path, *, with_stats: bool = True) -> dict:
    """card.json of the card directory ``path``, checked: an object of a schema this code reads, every
    listed file present and matching its sha256, and the card id the hash of those hashes.

    ``with_stats=False`` leaves ``stats.safetensors`` unread (not hashed): a caller that only needs the
    tables does not pay for the statistics (1.65 GB for SmolLM2). The card id is still checked — it
    is recomputed from the listed hashes, so no file has to be read for it."""
    meta_path = path / "card.json"
    if not meta_path.is_file():
        raise LayercardError(f"'{path}' is not a Layer Card: card.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" ({err.msg} at line {err.lineno})" if isinstance(err, json.JSONDecodeError) else ""
        raise LayercardError(f"card '{path}': card.json is not valid JSON{where}") from None
    if not isinstance(meta, dict):
        raise LayercardError(f"card '{path}': card.json holds a {type(meta).__name__}, not an object")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise LayercardError(f"card '{path}' has schema version {version!r}; this layercard reads up to {SCHEMA_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise LayercardError(f"card '{path}': card.json 'files' must map file names to sha256 strings")
    for name, digest in files.items():
        f = path / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise LayercardError(f"card '{path}': file '{name}' is missing")
        if is_stats_file(name) and not with_stats:
            continue
        if sha256_file(f) != digest:
            raise LayercardError(f"card '{path}': '{name}' does not match its checksum in card.json (truncated or edited)")
    for name in TABLES:
        if name not in files:
            raise LayercardError(f"card '{path}': card.json does not list '{name}'")
    if meta.get("card_id") != card_id_of(files):
        raise LayercardError(f"card '{path}': card id {meta.get('card_id')!r} is not the hash of its files "
                             f"({card_id_of(files)}): card.json was edited")
    warn_library_versions(meta, path)
    return meta


def _read_table(path: Path, name: str) -> pd.DataFrame:
    import pyarrow as pa

    try:
        return pd.read_parquet(path / name)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise LayercardError(f"card '{path}': '{name}' is not a readable Parquet file "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def warn_library_versions(meta: dict, path: Path) -> list[str]:
    """A warning per library whose major version differs from the one that wrote the card: its numbers
    may not be reproducible here (not an error — the tables themselves are still valid)."""
    import warnings

    recorded = meta.get("library_versions")
    if not isinstance(recorded, dict):
        return []
    here = library_versions()
    notes = [f"{pkg} {recorded[pkg]} (here {here[pkg]})" for pkg in sorted(recorded)
             if pkg in here and isinstance(recorded[pkg], str) and _major(recorded[pkg]) != _major(here[pkg])]
    if notes:
        warnings.warn(f"card '{path}' was written with another major version of {', '.join(notes)}", stacklevel=3)
    return notes


@dataclass
class LayerCard:
    layers: pd.DataFrame
    modules: pd.DataFrame
    coupling: np.ndarray                       # ρ, L × L (zeros until the coupling pass fills it)
    coupling_k: np.ndarray | None = None       # K, L × L, or None without coupling
    meta: dict = field(default_factory=dict)
    stats: SufficientStats | None = None       # kept when the card was profiled here or saved with stats
    coupling_adam: np.ndarray | None = None    # Gram of Adam's sign-step directions, L × L (optional, `k_adam`)

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.layers["layer"]]

    @property
    def card_id(self) -> str:
        return self.meta.get("card_id", "")

    def positions(self, layers) -> list[int]:
        """Row positions of layer indices; an index not in the card is an error naming it."""
        where = {l: i for i, l in enumerate(self.layer_ids)}
        bad = [l for l in layers if l not in where]
        if bad:
            raise LayercardError(f"layers {bad} are not in the card (it has layers {self.layer_ids[0]}..{self.layer_ids[-1]})")
        return [where[l] for l in layers]

    def require_columns(self, columns: list[str], filled_by: str) -> None:
        missing = [c for c in columns if c not in self.layers.columns or self.layers[c].isna().all()]
        if missing:
            raise LayercardError(f"card lacks columns {missing}; {filled_by} fills them")

    # ------------------------------------------------------------------ write
    def coupling_frame(self) -> pd.DataFrame:
        ids = np.asarray(self.layer_ids)
        L = len(ids)
        k = self.coupling_k if self.coupling_k is not None else np.full((L, L), np.nan)
        ii, jj = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
        return pd.DataFrame({"layer_i": ids[ii.ravel()], "layer_j": ids[jj.ravel()],
                             "rho": np.asarray(self.coupling, dtype=np.float64).ravel(),
                             "k": np.asarray(k, dtype=np.float64).ravel(),
                             **({"k_adam": np.asarray(self.coupling_adam, dtype=np.float64).ravel()}
                                if self.coupling_adam is not None else {})})

    def save(self, path: str | Path, *, overwrite: bool = False, with_stats: bool = True) -> Path:
        """Write the card atomically: a sibling temporary directory renamed into place."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise LayercardError(f"card directory '{path}' already exists (pass overwrite=True or choose another --out)")
        with atomic_dir(path, replace=overwrite) as tmp:
            meta = self._write_files(tmp, with_stats)
        self.meta = meta
        return path

    def _write_files(self, tmp: Path, with_stats: bool) -> dict:
        self.layers.to_parquet(tmp / "layers.parquet", index=False)
        self.modules.to_parquet(tmp / "modules.parquet", index=False)
        self.coupling_frame().to_parquet(tmp / "coupling.parquet", index=False)
        files = list(TABLES)
        if with_stats and self.stats is not None and hasattr(self.stats, "write"):
            files += self.stats.write(tmp)   # statistics left where they were summed (a Ray profile's owners)
        elif with_stats and self.stats is not None:
            tensors, header = self.stats.to_tensors()
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / STATS_FILE), metadata=header)
            files.append(STATS_FILE)
        meta = dict(self.meta)
        meta.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        meta["schema_version"] = SCHEMA_VERSION
        meta["files"] = {name: sha256_file(tmp / name) for name in files}
        meta["card_id"] = card_id_of(meta["files"])
        (tmp / "card.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        return meta

    # ------------------------------------------------------------------ read
    @classmethod
    def load(cls, path: str | Path, *, with_stats: bool = True) -> "LayerCard":
        path = Path(path)
        meta = read_meta(path, with_stats=with_stats)   # the statistics are hashed only when they are read
        tables = {name: _read_table(path, name) for name in TABLES}
        if meta["schema_version"] < 2:
            _add_rank_r_gain(tables, meta, path)
        for name, columns in TABLES.items():
            df = tables[name]
            missing = [c for c in columns if c not in df.columns]
            if missing:
                raise LayercardError(f"card '{path}': '{name}' lacks columns {missing}")
        layers = tables["layers.parquet"]
        L = len(layers)
        cp = tables["coupling.parquet"]
        if len(cp) != L * L:
            raise LayercardError(f"card '{path}': coupling.parquet has {len(cp)} rows, expected {L}×{L}")
        rho = cp["rho"].to_numpy(np.float64).reshape(L, L)
        k = cp["k"].to_numpy(np.float64).reshape(L, L)
        k_adam = cp["k_adam"].to_numpy(np.float64).reshape(L, L) if "k_adam" in cp.columns else None
        stats = None
        for name in sorted(n for n in meta["files"] if is_stats_file(n)) if with_stats else []:
            part = _read_stats(path, name)
            stats = part if stats is None else stats + part   # slices hold disjoint layers
        return cls(layers, tables["modules.parquet"], rho, None if np.isnan(k).all() else k, meta, stats, k_adam)
