"""`layercard plan`: Qwen3-8B built on meta, sized against GPU memory."""
from __future__ import annotations

from pathlib import Path

import pytest

from layercard.config import load_config
from layercard.discovery import discover
from layercard.models import build_meta_model
from layercard.plan import GIB, slice_stat_bytes
from layercard.profile_config import ProfileConfig
from pipelines.cli import main as cli

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "qwen3-8b.yaml")


def test_slice_statistics_bytes_match_module_shapes():
    cfg = load_config(ProfileConfig, CONFIG)
    layout = discover(build_meta_model(cfg.model))
    h, f, kv = 4096, 12288, 1024
    c = h * h + 2 * h * kv + h * h + 2 * h * f + f * h          # C: q, k, v, o, gate, up, down
    a = h * h + h * h + h * h + f * f                            # A: qkv, o, gate/up, down
    assert slice_stat_bytes(layout, [0]) == 8 * (a + c)
    assert slice_stat_bytes(layout, list(range(36))) == 36 * 8 * (a + c)


def test_plan_fits_on_8x80(capsys):
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits: ray.num_actors=8 ray.layer_slices=4" in out
    assert "36 layers" in out


@pytest.mark.parametrize("gpus,mem,needed", [(1, 80, "needs at least 3 GPUs of 80 GB"),
                                               (1, 24, "one layer per actor does not fit")])
def test_plan_refuses_what_does_not_fit(capsys, gpus, mem, needed):
    assert cli(["plan", "--config", CONFIG, "--gpus", str(gpus), "--gpu-mem-gb", str(mem)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layout does not fit") and needed in err and "\n" not in err
