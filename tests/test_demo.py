"""The `make demo` path end to end on a tiny model: profile → report → select → train ×3 → table."""
from __future__ import annotations

import json
from pathlib import Path

from layercard.card.layer_card import LayerCard
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
    from layercard.train.base_eval import read_base_eval, write_base_eval

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


def test_benchmark_table_beside_the_smoke_run(tmp_path):
    """The demo prints the committed benchmark's figures for its own runs (and the best other set of k)."""
    from pipelines.demo import benchmark_table

    def row(strategy, k, seed, layers, quality, ratio=0.5, shared=(1.0, 1.0)):
        return {"task": "t", "strategy": strategy, "k": k, "seed": seed, "layers": layers, "quality": quality,
                "quality_name": "label_loss", "base_quality": 0.5, "gain_fraction": (0.5 - quality) / 0.1,
                "step_time_ratio": ratio, "shared_fraction": shared[0], "reference_shared_fraction": shared[1]}

    rows = [row("card", 2, s, [2, 3], 0.42) for s in (0, 1)]
    rows += [row("min-cost@0.95", 3, s, [1, 2, 3], 0.41) for s in (0, 1)]
    rows += [row("all", 4, s, [0, 1, 2, 3], 0.40, 1.0) for s in (0, 1)]
    rows += [row("bottom", 2, 0, [0, 1], 0.39, 0.9), row("bottom", 2, 1, [0, 1], 0.39, 0.1, (0.0, 1.0)),
             row("top", 2, 0, [2, 3], 0.45), row("card", 3, 0, [0, 2, 3], 0.30), row("other", 1, 0, [0], 0.45)]
    path = tmp_path / "paper_table.json"
    path.write_text(json.dumps(rows))
    text = benchmark_table("t", 2, 0.95, path)
    lines = {line.split("  ")[0]: line for line in text.splitlines()[2:]}
    assert list(lines) == ["base model (no LoRA)", "card max-quality k=2", "card min-cost 0.95", "all layers",
                           "best other k=2: bottom"]
    assert "0.5000" in lines["base model (no LoRA)"]
    assert "0.4200 ± 0.0000" in lines["card max-quality k=2"] and "0.80" in lines["card max-quality k=2"]
    assert "1–3" in lines["card min-cost 0.95"] and "0–3" in lines["all layers"]
    assert lines["best other k=2: bottom"].split()[-2] == "0.90"     # a seed timed unlike its reference is left out
    assert benchmark_table("missing", 2, 0.95, path) is None
    assert benchmark_table("t", 2, 0.95, tmp_path / "none.json") is None
