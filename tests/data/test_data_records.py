"""Every record of a data file is checked for the configured columns, not only the first."""
from __future__ import annotations

import json

import pytest

from layercard.data.examples import DataConfig, read_records
from layercard.errors import LayercardError


def test_a_later_record_without_a_column_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}, {"prompt": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), prompt_column="prompt", answer_column="answer")
    with pytest.raises(LayercardError, match=r"d.jsonl': record 3 has no column 'answer'") as err:
        read_records(cfg)
    assert "\n" not in str(err.value)


def test_a_record_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps(["text"]) + "\n")
    with pytest.raises(LayercardError, match=r"record 2 has no column 'text'"):
        read_records(DataConfig(path=str(path)))
