"""The weights hash of a model directory covers every byte of every weight file (cached by path, mtime, size)."""
from __future__ import annotations

import json
import os

from layercard.models import HASH_CACHE, _hash_files, sampled_weights_hash, weights_hash_meta


def _weights(path, size=3 << 20):
    path.write_bytes(bytes(i % 251 for i in range(size)))
    return path


def _edit_middle(path):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_a_change_in_the_middle_of_a_file_changes_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    f = _weights(tmp_path / "model.safetensors")
    before, sampled = _hash_files([f]), sampled_weights_hash([f])
    _edit_middle(f)
    assert sampled_weights_hash([f]) == sampled          # the old fingerprint misses a fine-tune of the middle
    assert _hash_files([f]) != before


def test_hashes_are_cached_by_path_mtime_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    f = _weights(tmp_path / "model.safetensors", 4096)
    first = _hash_files([f])
    cache = json.loads((tmp_path / "cache" / HASH_CACHE).read_text())
    assert list(cache) == [f"{f.resolve()}:{f.stat().st_mtime_ns}:{f.stat().st_size}"]
    assert _hash_files([f]) == first
    assert weights_hash_meta([f]) == {"weights_hash_kind": "sha256", "weights_hash_sampled": sampled_weights_hash([f])}


def test_a_mismatch_against_a_record_without_a_hash_kind_says_why(tmp_path):
    """A selection (or card) from before whole-file hashing names the reason its hash differs."""
    from pathlib import Path

    import pytest

    from layercard.errors import LayercardError
    from layercard.models import legacy_hash_note
    from layercard.train.training import Selection, check_selection_for_model

    old = Selection(Path("sel"), {}, [1], "2e13074395d67211", "c", {"weights_hash": "2e13074395d67211"})
    with pytest.raises(LayercardError, match="recorded before weights hashes covered whole files.*re-profile"):
        check_selection_for_model(old, "0123456789abcdef")
    new = Selection(Path("sel"), {}, [1], "aaaaaaaaaaaaaaaa", "c",
                    {"weights_hash": "aaaaaaaaaaaaaaaa", "weights_hash_kind": "sha256"})
    with pytest.raises(LayercardError) as err:
        check_selection_for_model(new, "0123456789abcdef")
    assert "whole files" not in str(err.value)
    assert legacy_hash_note({"weights_hash": "x", "weights_hash_kind": "state-dict"}) == ""
