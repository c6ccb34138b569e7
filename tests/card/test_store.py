"""Card store (layercard.card.store): publish / list / load / latest, never overwriting, atomic under
concurrent publishers in real processes, on a plain path, a file:// URI and the object-store
protocol (manifest last), plus the ``layercard cards`` commands."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from fake_cards import make_card, publish_in_child
from layercard.errors import LayercardError
from layercard.card.store import CardStore, config_hash, model_key
from pipelines import cards as cards_cli


def _versions(store, model=None):
    return [v.version for v in store.list_versions(model)]


@pytest.mark.parametrize("kind", ["path", "file-uri", "manifest-last"])
def test_publish_list_load_latest(tmp_path, kind):
    root = tmp_path / "store"
    uri = f"file://{root}" if kind == "file-uri" else str(root)
    store = CardStore(uri, atomic_rename=False if kind == "manifest-last" else None)
    assert store.list_versions() == [] and store.latest("config:test-model") is None
    v1 = store.publish(make_card(created_at="2026-11-01T10:00:00+00:00"))
    v2 = store.publish(make_card(data_hash="d1", created_at="2026-11-02T10:00:00+00:00", seed=1))
    other = store.publish(make_card(model_id="hf:other", created_at="2026-11-03T10:00:00+00:00"))
    assert _versions(store) == [v1.version, v2.version, other.version]          # oldest first
    assert _versions(store, "config:test-model") == [v1.version, v2.version]
    assert _versions(store, model_key("hf:other")) == [other.version]          # the key works too
    assert store.latest("config:test-model").version == v2.version
    assert v1.version.startswith("20261101T100000Z-") and v1.data_hash == "d0" and v2.data_hash == "d1"
    assert v1.config_hash == config_hash({"model": {"seed": 0}, "data": {"path": "x.jsonl"}})  # ray left out

    card = store.load(v2.version)
    assert card.card_id == v2.card_id and card.meta["data_hash"] == "d1"
    np.testing.assert_allclose(card.coupling_k, make_card(seed=1).coupling_k)
    assert store.get(f"{v2.model_key}/{v2.version}") == store.get(v2.version)
    with pytest.raises(LayercardError, match=r"version '20990101T000000Z-000000000000' is not in store .*newest"):
        store.get("20990101T000000Z-000000000000")


@pytest.mark.parametrize("atomic_rename", [None, False])
def test_never_overwrites(tmp_path, atomic_rename):
    store = CardStore(tmp_path / "store", atomic_rename=atomic_rename)
    card = make_card()
    v = store.publish(card, extra_files={"note.txt": b"first"})
    before = {p.name: p.read_bytes() for p in Path(v.path).iterdir()}
    with pytest.raises(LayercardError, match="already exists.*never overwrites"):
        store.publish(make_card(), extra_files={"note.txt": b"second"})
    assert {p.name: p.read_bytes() for p in Path(v.path).iterdir()} == before
    assert store.read_file(v.version, "note.txt") == b"first"
    with pytest.raises(LayercardError, match="not allowed"):
        store.publish(make_card(created_at="2026-11-05T00:00:00+00:00"), extra_files={"card.json": b"{}"})


def test_incomplete_versions_are_absent(tmp_path):
    """A version without its manifest (a crashed object-store upload) and staging leftovers are not listed."""
    store = CardStore(tmp_path / "store", atomic_rename=False)
    v = store.publish(make_card())
    partial = Path(v.path).parent / "20261101T110000Z-0123456789ab"
    partial.mkdir()
    (partial / "card.json").write_text("{}")
    (tmp_path / "store" / ".staging" / "abc").mkdir(parents=True)
    assert _versions(store) == [v.version]


def test_publish_requires_key_meta(tmp_path):
    card = make_card()
    del card.meta["data_hash"]
    with pytest.raises(LayercardError, match=r"lacks \['data_hash'\]"):
        CardStore(tmp_path / "store").publish(card)


def _race(store_uri: str, card_dirs: list[str], atomic_rename) -> list[tuple[str, str]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(card_dirs)), ctx.Queue()
    procs = [ctx.Process(target=publish_in_child, args=(store_uri, d, barrier, atomic_rename, results))
             for d in card_dirs]
    for p in procs:
        p.start()
    out = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("atomic_rename", [None, False], ids=["rename", "manifest-last"])
def test_concurrent_publishers(tmp_path, atomic_rename):
    """4 processes publish distinct cards at the same instant, then 3 race for one version."""
    store_uri = f"file://{tmp_path / 'store'}"
    distinct = []
    for i in range(4):
        distinct.append(str(make_card(seed=i, data_hash=f"d{i}").save(tmp_path / f"card{i}")))
    same = [str(make_card(seed=9, data_hash="same").save(tmp_path / "same"))] * 3

    results = _race(store_uri, distinct, atomic_rename)
    assert [r[0] for r in results] == ["ok"] * 4
    store = CardStore(store_uri)
    assert sorted(_versions(store)) == sorted(r[1] for r in results)
    for v in store.list_versions():
        card = store.load(v)                       # every file matches its checksum
        assert card.meta["data_hash"] == v.data_hash

    results = _race(store_uri, same, atomic_rename)
    ok = [r for r in results if r[0] == "ok"]
    if atomic_rename is None:   # rename: exactly one writer wins, the others are told why
        assert len(ok) == 1, results
        assert all("already exists" in r[1] for r in results if r[0] == "error")
    else:                       # object-store protocol: identical content, so any winner is complete
        assert len(ok) >= 1, results
    assert len(store.list_versions()) == 5
    assert store.load(ok[0][1]).meta["data_hash"] == "same"
    staging = tmp_path / "store" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_cards_cli(tmp_path, capsys, monkeypatch):
    store = CardStore(tmp_path / "store")
    v1 = store.publish(make_card(), extra_files={"drift.md": b"# Drift report\n"}, summary={"against": None, "drift": None})
    v2 = store.publish(make_card(model_id="hf:other", created_at="2026-11-02T00:00:00+00:00"))
    monkeypatch.setenv("LAYERCARD_STORE", str(tmp_path / "store"))
    assert cards_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert v1.version in out and v2.version in out and "baseline" in out
    assert cards_cli.main(["list", "--model", "hf:other", "--json"]) == 0
    assert [d["version"] for d in json.loads(capsys.readouterr().out)] == [v2.version]
    assert cards_cli.main(["show", v1.version]) == 0
    out = capsys.readouterr().out
    assert f"version    {v1.version}" in out and "gain_adj" in out and "# Drift report" in out
    monkeypatch.delenv("LAYERCARD_STORE")
    with pytest.raises(LayercardError, match="LAYERCARD_STORE"):
        cards_cli.main(["list"])


@pytest.mark.parametrize("kind", ["path", "manifest-last"])
def test_a_file_edited_on_the_store_is_named_even_with_a_consistent_card_json(tmp_path, kind):
    """Forging a version: change a table, write its hash and the matching card id into card.json —
    the card alone would load; the store checks every file against the manifest."""
    import pandas as pd

    from layercard.card.layer_card import card_id_of, sha256_file

    store = CardStore(tmp_path / "store", atomic_rename=False if kind == "manifest-last" else None)
    v = store.publish(make_card(), extra_files={"drift.md": b"no drift"})
    d = Path(v.path)
    df = pd.read_parquet(d / "layers.parquet")
    df["res2"] = df["res2"][::-1].to_numpy()
    df.to_parquet(d / "layers.parquet", index=False)
    meta = json.loads((d / "card.json").read_text())
    meta["files"]["layers.parquet"] = sha256_file(d / "layers.parquet")
    meta["card_id"] = card_id_of(meta["files"])
    (d / "card.json").write_text(json.dumps(meta))
    with pytest.raises(LayercardError, match=r"'card.json' does not match its sha256 in _VERSION.json") as err:
        store.load(v.version)
    assert "\n" not in str(err.value)
    (d / "drift.md").write_bytes(b"edited")
    with pytest.raises(LayercardError, match=r"'drift.md' does not match its sha256"):
        store.read_file(v.version, "drift.md")
