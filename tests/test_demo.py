"""The `make demo` path end to end on a tiny model: profile → report → select → train ×3 → table."""
from __future__ import annotations

import json
from pathlib import Path

from layercard.card import LayerCard
from pipelines.demo import main as demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_tiny_end_to_end(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "demo"
    assert demo(["--config", "configs/demo-tiny.yaml", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["card max-quality k=2", "card min-cost 0.95", "all layers"]
    card = LayerCard.load(out / "card")
    assert {"b", "k_diag", "step_seconds"} <= set(card.layers.columns)
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert rows[0]["adapted_layers"] == 2 and rows[2]["adapted_layers"] == 4
    assert rows[0]["trainable_params"] < rows[2]["trainable_params"]
    for r in rows:
        assert r["eval_loss"] > 0 and r["median_step_s"] > 0
        assert Path(r["adapter"], "adapter_config.json").exists()
    assert "all layers" in printed and "report.html" in printed
    # the base model is evaluated once: later runs take its numbers from the cache
    runs = [json.loads(Path(r["adapter"]).parent.joinpath("metrics.json").read_text()) for r in rows]
    assert [m["initial_from_cache"] for m in runs] == [False, True, True]
    for m in runs[1:]:
        assert all(m[f"initial_{k}"] == runs[0][f"initial_{k}"] for k in ("eval_loss", "metric", "quality"))
    assert json.loads((out / "train" / "base_eval.json").read_text())["initial"]["initial_eval_loss"] \
        == runs[0]["initial_eval_loss"]


def test_base_eval_cache_is_keyed(tmp_path):
    from pipelines.train import read_base_eval, write_base_eval

    path = tmp_path / "base_eval.json"
    assert read_base_eval(path, "k1") is None                       # nothing yet
    write_base_eval(path, "k1", {"initial_eval_loss": None})        # a run without eval numbers writes nothing
    assert not path.exists()
    m = {"initial_eval_loss": 2.5, "initial_label_loss": 0.6, "initial_metric": 0.7, "initial_quality": 0.6}
    write_base_eval(path, "k1", m)
    assert read_base_eval(path, "k1") == m
    assert read_base_eval(path, "k2") is None                       # other model / data / settings: recompute
    write_base_eval(path, "k1", {**m, "initial_eval_loss": 9.0})    # the first writer of a key wins
    assert read_base_eval(path, "k1") == m
    write_base_eval(path, "k2", {**m, "initial_eval_loss": 9.0})    # new settings replace the entry
    assert read_base_eval(path, "k2")["initial_eval_loss"] == 9.0 and read_base_eval(path, "k1") is None
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    write_base_eval(blocked / "base_eval.json", "k1", m)             # unwritable: no cache, no error
    assert read_base_eval(blocked / "base_eval.json", "k1") is None
