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
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from layercard.errors import LayercardError
from layercard.stats import SufficientStats

SCHEMA_VERSION = 2                # 2: gain_adj_rank_r (derived on load from a schema-1 card's module table)
STAT_COLUMNS = ["res2", "res2_rank_r", "res_frac", "grad_norm", "energy", "kappa", "erank", "d_eff", "gain_adj",
                "gain_adj_rank_r"]
LAYER_COLUMNS = ["layer", "n_tokens", *STAT_COLUMNS]
MODULE_COLUMNS = ["layer", "module", "target", "d_in", "d_out", "n_tokens", *STAT_COLUMNS]
COUPLING_COLUMNS = ["layer_i", "layer_j", "rho", "k"]
TABLES = {"layers.parquet": LAYER_COLUMNS, "modules.parquet": MODULE_COLUMNS, "coupling.parquet": COUPLING_COLUMNS}
STATS_FILE = "stats.safetensors"


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


def _add_rank_r_gain(tables: dict, meta: dict, path: Path) -> None:
    """Schema-1 cards predate ``gain_adj_rank_r``; it is a function of columns their module table
    carries (res2_rank_r, res2, gg, n_tokens, d_out, d_eff) and meta ``rank``. Layer value = the sum
    over the layer's modules, as :func:`layercard.profiler.aggregate_layers` does."""
    from layercard.metrics import gain_adj_rank_r

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


@dataclass
class LayerCard:
    layers: pd.DataFrame
    modules: pd.DataFrame
    coupling: np.ndarray                       # ρ, L × L (zeros until the coupling pass fills it)
    coupling_k: np.ndarray | None = None       # K, L × L, or None without coupling
    meta: dict = field(default_factory=dict)
    stats: SufficientStats | None = None       # kept when the card was profiled here or saved with stats

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
                             "k": np.asarray(k, dtype=np.float64).ravel()})

    def save(self, path: str | Path, *, overwrite: bool = False, with_stats: bool = True) -> Path:
        """Write the card atomically: a sibling temporary directory renamed into place."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise LayercardError(f"card directory '{path}' already exists (pass overwrite=True or choose another --out)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            self.layers.to_parquet(tmp / "layers.parquet", index=False)
            self.modules.to_parquet(tmp / "modules.parquet", index=False)
            self.coupling_frame().to_parquet(tmp / "coupling.parquet", index=False)
            files = list(TABLES)
            if with_stats and self.stats is not None:
                tensors, header = self.stats.to_tensors()
                from safetensors.torch import save_file

                save_file(tensors, str(tmp / STATS_FILE), metadata=header)
                files.append(STATS_FILE)
            meta = dict(self.meta)
            meta.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            meta["schema_version"] = SCHEMA_VERSION
            meta["files"] = {name: sha256_file(tmp / name) for name in files}
            meta["card_id"] = hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()[:16]
            (tmp / "card.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                try:
                    tmp.rename(path)
                except BaseException:
                    old.rename(path)  # put the previous card back
                    raise
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.meta = meta
        return path

    # ------------------------------------------------------------------ read
    @classmethod
    def load(cls, path: str | Path, *, with_stats: bool = True) -> "LayerCard":
        path = Path(path)
        meta_path = path / "card.json"
        if not meta_path.is_file():
            raise LayercardError(f"'{path}' is not a Layer Card: card.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise LayercardError(f"card '{path}': card.json is not valid JSON ({err.msg} at line {err.lineno})") from None
        version = meta.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise LayercardError(f"card '{path}' has schema version {version!r}; this layercard reads up to {SCHEMA_VERSION}")
        for name, digest in meta.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise LayercardError(f"card '{path}': file '{name}' is missing")
            if sha256_file(f) != digest:
                raise LayercardError(f"card '{path}': '{name}' does not match its checksum in card.json (truncated or edited)")
        tables = {}
        for name, columns in TABLES.items():
            if name not in meta.get("files", {}):
                raise LayercardError(f"card '{path}': card.json does not list '{name}'")
            df = pd.read_parquet(path / name)
            tables[name] = df
        if version < 2:
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
        stats = None
        if with_stats and STATS_FILE in meta["files"]:
            from safetensors import safe_open

            with safe_open(str(path / STATS_FILE), framework="pt") as f:
                stats = SufficientStats.from_tensors({n: f.get_tensor(n) for n in f.keys()}, f.metadata())
        return cls(layers, tables["modules.parquet"], rho, None if np.isnan(k).all() else k, meta, stats)
