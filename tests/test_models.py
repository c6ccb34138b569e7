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
