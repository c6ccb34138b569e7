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
