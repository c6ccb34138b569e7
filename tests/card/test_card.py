"""The Layer Card on disk: round trip (tables, ρ, K, stats, metadata), atomic writes, validation on load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from layercard.card.layer_card import LayerCard
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig

REPO = Path(__file__).resolve().parents[2]
LAYER_COLUMNS = ["layer", "n_tokens", "res2", "res2_rank_r", "res_frac", "grad_norm", "energy", "kappa", "erank",
                 "d_eff", "gain_adj", "gain_adj_rank_r"]
MODULE_COLUMNS = ["layer", "module", "d_in", "d_out"]



@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """configs/tiny.yaml on 24 records, both passes (statistics + coupling), in this process."""
    from layercard.profile.run import add_coupling_local, profile_local

    cfg = load_config(ProfileConfig, REPO / "configs" / "tiny.yaml", [
        f"data.path={REPO / 'configs' / 'data' / 'tiny.jsonl'}", "data.num_samples=24", "coupling.probe_samples=8",
        "cost.measure=false",
    ])
    card, lm, examples = profile_local(cfg, progress=False)
    add_coupling_local(card, cfg, lm, examples, progress=False)
    return card


@pytest.fixture(scope="module")
def saved(profiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("cards") / "card"
    profiled.save(path)
    return path


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------------------- round trip
def test_round_trip(profiled, saved):
    assert _listing(saved) == ["card.json", "coupling.parquet", "layers.parquet", "modules.parquet",
                               "stats.safetensors"]
    loaded = LayerCard.load(saved)
    pd.testing.assert_frame_equal(loaded.layers, profiled.layers, check_exact=True)
    pd.testing.assert_frame_equal(loaded.modules, profiled.modules, check_exact=True)
    # ρ and K: filled by the coupling pass, exactly preserved
    assert profiled.coupling_k is not None and np.abs(profiled.coupling_k).sum() > 0
    np.testing.assert_array_equal(loaded.coupling, profiled.coupling)
    np.testing.assert_array_equal(loaded.coupling_k, profiled.coupling_k)
    np.testing.assert_allclose(np.diag(loaded.coupling), 1.0, rtol=1e-12)
    # the sufficient statistics
    s0, s1 = profiled.stats, loaded.stats
    assert s1 is not None
    assert sorted(s1.A) == sorted(s0.A) and sorted(s1.C) == sorted(s0.C)
    for k in s0.A:
        assert s1.A[k].dtype == torch.float64 and torch.equal(s1.A[k], s0.A[k])
    for k in s0.C:
        assert s1.C[k].dtype == torch.float64 and torch.equal(s1.C[k], s0.C[k])
    assert (s1.n, s1.gg, s1.group_of, s1.bi_sum, s1.bi_n) == (s0.n, s0.gg, s0.group_of, s0.bi_sum, s0.bi_n)
    # metadata: what save() wrote is what load() returns
    assert loaded.meta == json.loads(json.dumps(profiled.meta, default=str))
    assert loaded.card_id == profiled.card_id and len(loaded.card_id) == 16
    assert LayerCard.load(saved, with_stats=False).stats is None


def test_meta(saved):
    meta = LayerCard.load(saved).meta
    for key in ("model_id", "weights_hash", "data_hash", "rank", "ridge", "schema_version", "created_at",
                "library_versions", "tokenizer", "seq_len", "target_modules", "n_tokens"):
        assert meta.get(key) not in (None, "", {}), key
    assert meta["model_id"].startswith("config:qwen3")
    assert meta["rank"] == 4 and meta["ridge"] == pytest.approx(1e-3)
    assert meta["seq_len"] == 64
    assert isinstance(meta["schema_version"], int)
    assert {"torch", "transformers", "pyarrow"} <= set(meta["library_versions"])
    assert meta["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert set(meta["files"]) == {"layers.parquet", "modules.parquet", "coupling.parquet", "stats.safetensors"}


def test_columns(saved):
    loaded = LayerCard.load(saved)
    assert list(loaded.layers.columns[: len(LAYER_COLUMNS)]) == LAYER_COLUMNS
    assert list(loaded.layers["layer"]) == [0, 1, 2, 3]
    assert set(MODULE_COLUMNS + LAYER_COLUMNS[1:]) <= set(loaded.modules.columns)
    assert len(loaded.modules) == 4 * 7
    assert np.isfinite(loaded.layers[LAYER_COLUMNS].to_numpy(np.float64)).all()
    assert ((loaded.layers["res_frac"] >= 0) & (loaded.layers["res_frac"] <= 1)).all()
    assert (loaded.layers["res2_rank_r"] <= loaded.layers["res2"] * (1 + 1e-12)).all()


def test_save_without_stats(profiled, tmp_path):
    path = profiled_copy(profiled).save(tmp_path / "card", with_stats=False)
    assert "stats.safetensors" not in _listing(path)
    loaded = LayerCard.load(path)
    assert loaded.stats is None
    pd.testing.assert_frame_equal(loaded.layers, profiled.layers)


def profiled_copy(card: LayerCard) -> LayerCard:
    return LayerCard(card.layers.copy(), card.modules.copy(), card.coupling.copy(),
                     None if card.coupling_k is None else card.coupling_k.copy(), dict(card.meta), card.stats)


# -------------------------------------------------------------------------------------- atomic write
@pytest.mark.parametrize("fail_on_call", [1, 2, 3])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_write_killed_midway_leaves_nothing(profiled, tmp_path, monkeypatch, fail_on_call, exc):
    calls = []
    real = pd.DataFrame.to_parquet

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on_call:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    card = profiled_copy(profiled)
    with pytest.raises(type(exc)):
        card.save(tmp_path / "out")
    assert _listing(tmp_path) == []  # neither the card nor a temporary directory
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    card.save(tmp_path / "out")
    assert LayerCard.load(tmp_path / "out").card_id == card.card_id


def test_failed_overwrite_keeps_the_old_card(profiled, saved, tmp_path, monkeypatch):
    target = tmp_path / "card"
    shutil.copytree(saved, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []
    real = pd.DataFrame.to_parquet

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    with pytest.raises(OSError):
        profiled_copy(profiled).save(target, overwrite=True)
    assert _listing(tmp_path) == ["card"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_overwrite_killed_between_renames_keeps_the_old_card(profiled, saved, tmp_path, monkeypatch):
    """Without an atomic exchange (renameat2 missing) the old card is moved aside, then the new one
    renamed in: a failure there puts the old card back. (SIGKILLs: tests/test_atomic.py.)"""
    import os

    import layercard.atomic

    target = tmp_path / "card"
    shutil.copytree(saved, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".card.tmp-"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(layercard.atomic, "_LIBC", None)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        profiled_copy(profiled).save(target, overwrite=True)
    monkeypatch.setattr(os, "rename", real)
    assert _listing(tmp_path) == ["card"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_overwrite(profiled, saved, tmp_path):
    target = tmp_path / "card"
    shutil.copytree(saved, target)
    with pytest.raises(LayercardError, match="already exists"):
        profiled_copy(profiled).save(target)
    card = profiled_copy(profiled)
    card.meta["note"] = "second"
    card.save(target, overwrite=True)
    assert _listing(tmp_path) == ["card"]
    assert LayerCard.load(target).meta["note"] == "second"


def test_save_to_existing_dir_without_overwrite(profiled, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(LayercardError, match="already exists") as exc:
        profiled_copy(profiled).save(tmp_path / "out")
    assert "out" in str(exc.value)
    assert _listing(tmp_path / "out") == ["keep.txt"]
    assert _listing(tmp_path) == ["out"]


# -------------------------------------------------------------------------------- validation on load
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_of(saved: Path, tmp_path: Path) -> Path:
    """A copy of the saved card to break."""
    card = tmp_path / "card"
    shutil.copytree(saved, card)
    return card


@pytest.mark.parametrize("name", ["layers.parquet", "modules.parquet", "coupling.parquet", "stats.safetensors"])
@pytest.mark.parametrize("damage", [_truncate, _flip_byte])
def test_corrupted_file_is_detected(saved, tmp_path, name, damage):
    card = copy_of(saved, tmp_path)
    damage(card / name)
    with pytest.raises(LayercardError) as exc:
        LayerCard.load(card)
    msg = str(exc.value)
    assert name in msg and "checksum" in msg and "\n" not in msg


def test_missing_card_json(saved, tmp_path):
    card = copy_of(saved, tmp_path)
    (card / "card.json").unlink()
    with pytest.raises(LayercardError, match="card.json"):
        LayerCard.load(card)


def test_missing_directory(tmp_path):
    with pytest.raises(LayercardError, match="card.json"):
        LayerCard.load(tmp_path / "nothing-here")


def test_missing_table_file(saved, tmp_path):
    card = copy_of(saved, tmp_path)
    (card / "coupling.parquet").unlink()
    with pytest.raises(LayercardError, match="coupling.parquet"):
        LayerCard.load(card)


def test_invalid_card_json(saved, tmp_path):
    card = copy_of(saved, tmp_path)
    (card / "card.json").write_text("{not json")
    with pytest.raises(LayercardError, match="card.json"):
        LayerCard.load(card)


def test_newer_schema_version_refused(saved, tmp_path):
    card = copy_of(saved, tmp_path)
    meta = json.loads((card / "card.json").read_text())
    meta["schema_version"] = 10**6
    (card / "card.json").write_text(json.dumps(meta))
    with pytest.raises(LayercardError, match="schema version"):
        LayerCard.load(card)


def test_edited_checksum_list_cannot_hide_a_table(saved, tmp_path):
    card = copy_of(saved, tmp_path)
    meta = json.loads((card / "card.json").read_text())
    del meta["files"]["layers.parquet"]
    (card / "card.json").write_text(json.dumps(meta))
    with pytest.raises(LayercardError, match="layers.parquet"):
        LayerCard.load(card)


def _as_schema_1(saved: Path, card: Path, drop_module_columns=()) -> None:
    """Rewrite a saved card as schema 1 wrote it: no gain_adj_rank_r column (checksums updated)."""
    from layercard.card.layer_card import card_id_of, sha256_file

    shutil.copytree(saved, card)
    meta = json.loads((card / "card.json").read_text())
    for name, extra in (("layers.parquet", ()), ("modules.parquet", tuple(drop_module_columns))):
        df = pd.read_parquet(card / name).drop(columns=["gain_adj_rank_r", *extra])
        df.to_parquet(card / name, index=False)
        meta["files"][name] = sha256_file(card / name)
    meta["schema_version"] = 1
    meta["card_id"] = card_id_of(meta["files"])     # a genuine schema-1 card's id is the hash of its files
    (card / "card.json").write_text(json.dumps(meta))


def test_schema_1_card_gets_gain_adj_rank_r_from_its_module_table(profiled, saved, tmp_path):
    card = tmp_path / "card"
    _as_schema_1(saved, card)
    loaded = LayerCard.load(card)
    # derived on load = what profiling computes (same formula on the same float64 module numbers)
    np.testing.assert_allclose(loaded.modules["gain_adj_rank_r"], profiled.modules["gain_adj_rank_r"], rtol=1e-12)
    np.testing.assert_allclose(loaded.layers["gain_adj_rank_r"], profiled.layers["gain_adj_rank_r"], rtol=1e-12)
    assert (profiled.layers["gain_adj_rank_r"] > 0).any()


def test_schema_1_card_without_module_gg_is_refused(saved, tmp_path):
    card = tmp_path / "card"
    _as_schema_1(saved, card, drop_module_columns=["gg"])
    with pytest.raises(LayercardError, match=r"schema version 1 .*gg.*re-profile") as err:
        LayerCard.load(card)
    assert "\n" not in str(err.value)


def _rewrite(card: Path, edit) -> None:
    meta = json.loads((card / "card.json").read_text())
    edit(meta)
    (card / "card.json").write_text(json.dumps(meta))


def test_edited_table_with_updated_checksum_is_refused_under_the_old_id(saved, tmp_path):
    """Forging a card: change a table and write its new sha256 into card.json, keeping the id."""
    from layercard.card.layer_card import sha256_file

    card = copy_of(saved, tmp_path)
    df = pd.read_parquet(card / "layers.parquet")
    df["res2"] = df["res2"][::-1].to_numpy()
    df.to_parquet(card / "layers.parquet", index=False)
    _rewrite(card, lambda m: m["files"].__setitem__("layers.parquet", sha256_file(card / "layers.parquet")))
    with pytest.raises(LayercardError, match="card id .* is not the hash of its files") as err:
        LayerCard.load(card)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("body, words", [("[1, 2]", "list, not an object"), ('"card"', "str, not an object")])
def test_card_json_that_is_not_an_object(saved, tmp_path, body, words):
    card = copy_of(saved, tmp_path)
    (card / "card.json").write_text(body)
    with pytest.raises(LayercardError, match=words):
        LayerCard.load(card)


@pytest.mark.parametrize("files", [["layers.parquet"], {"layers.parquet": 3}, "x"])
def test_files_entry_of_the_wrong_type(saved, tmp_path, files):
    card = copy_of(saved, tmp_path)
    _rewrite(card, lambda m: m.__setitem__("files", files))
    with pytest.raises(LayercardError, match="'files' must map file names to sha256"):
        LayerCard.load(card)


def test_table_that_is_not_parquet_with_a_matching_hash(saved, tmp_path):
    from layercard.card.layer_card import card_id_of, sha256_file

    card = copy_of(saved, tmp_path)
    (card / "modules.parquet").write_text("not parquet at all")

    def edit(m):
        m["files"]["modules.parquet"] = sha256_file(card / "modules.parquet")
        m["card_id"] = card_id_of(m["files"])
    _rewrite(card, edit)
    with pytest.raises(LayercardError, match="'modules.parquet' is not a readable Parquet file") as err:
        LayerCard.load(card)
    assert "\n" not in str(err.value)


def test_other_major_library_version_warns_and_loads(saved, tmp_path):
    from layercard.card.layer_card import card_id_of, library_versions

    card = copy_of(saved, tmp_path)
    here = library_versions()
    older = {"pyarrow": "1.0.0", "torch": here["torch"]}
    _rewrite(card, lambda m: m.__setitem__("library_versions", older))
    assert json.loads((card / "card.json").read_text())["card_id"] == card_id_of(LayerCard.load(saved).meta["files"])
    with pytest.warns(UserWarning, match=r"another major version of pyarrow 1\.0\.0") as rec:
        LayerCard.load(card)
    assert not any("torch" in str(w.message) for w in rec)


def test_load_without_stats_does_not_read_the_statistics(saved, tmp_path):
    card = copy_of(saved, tmp_path)
    (card / "stats.safetensors").write_bytes(b"not statistics" * 1000)   # card.json keeps the old hash
    loaded = LayerCard.load(card, with_stats=False)
    assert loaded.stats is None and loaded.card_id == json.loads((saved / "card.json").read_text())["card_id"]
    with pytest.raises(LayercardError) as exc:
        LayerCard.load(card, with_stats=True)
    msg = str(exc.value)
    assert "'stats.safetensors' does not match its checksum" in msg and "\n" not in msg
