"""`layercard plan`: Qwen3-8B built on meta, sized against GPU memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layercard.config import load_config
from layercard.discovery import discover
from layercard.models import build_meta_model
from layercard.profile.plan import GIB, activation_bytes, slice_stat_bytes
from layercard.profile.config import ProfileConfig
from pipelines.cli import main as cli

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "qwen3-8b.yaml")


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


@pytest.mark.parametrize("gpus,mem,needed", [(1, 80, "needs at least 4 GPUs of 80 GB"),
                                               (1, 24, "one layer per actor does not fit")])
def test_plan_refuses_what_does_not_fit(capsys, gpus, mem, needed):
    assert cli(["plan", "--config", CONFIG, "--gpus", str(gpus), "--gpu-mem-gb", str(mem)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layout does not fit") and needed in err and "\n" not in err



# ------------------------------------------------------------------ brute force over the real modules
def _real_modules(model):
    """Every linear module of the blocks with its shape, and the input groups as the forward makes
    them: modules whose pre-hooks receive the same tensor share one A (a meta forward, no weights)."""
    seen = {}

    def hook(name):
        def f(mod, inp):
            seen[name] = inp[0]
        return f

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    for h in handles:
        h.remove()
    mods = {n: (int(n.split(".layers.")[1].split(".")[0]), m.in_features, m.out_features)
            for n, m in model.named_modules() if n in seen}
    groups = {}
    for n, t in seen.items():
        groups.setdefault(id(t), (mods[n][0], mods[n][1]))
    return list(mods.values()), list(groups.values())


def test_plan_json_matches_a_brute_force_sum_over_the_real_modules(tmp_path, capsys):
    cfg = load_config(ProfileConfig, CONFIG)
    model = build_meta_model(cfg.model)
    mods, groups = _real_modules(model)
    assert len(mods) == 36 * 7 and len(groups) == 36 * 4
    out = tmp_path / "plan.json"
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    slices = [list(range(9 * i, 9 * i + 9)) for i in range(4)]
    assert plan["slices"] == slices

    def stats(layers):
        return 8 * (sum(i * o for l, i, o in mods if l in layers) + sum(d * d for l, d in groups if l in layers))

    S = stats(range(36))
    newton = 4 * sum(i * o for _, i, o in mods)           # float32 Δ* on the driver's CPU
    deltas = 2 * newton                                     # coupling.adam (default): the sign steps too
    eigh = 3 * 8 * max(d * d for _, d in groups)
    expected = {"pass 1": S + 2 * stats(slices[0]), "card": S + eigh, "Δ*": S + deltas + eigh, "pass 2": S + 2 * deltas}
    assert plan["driver_phases_bytes"] == expected          # eigendecompositions (~58 GB) not cached
    assert plan["driver_bytes"] == max(expected.values()) == S + 2 * deltas
    assert plan["driver_bytes"] / GIB > 128                 # well above the head the cluster/ YAML gives
    assert plan["solve_flops"] >= 2 * 9 * sum(float(d) ** 3 for _, d in groups)   # each eigh twice
    assert plan["solve_s"] == pytest.approx(plan["solve_flops"] / 100e9)
    assert plan["stats_file_bytes"] == 0                     # ~106 GiB: not saved unless asked

    weights = 2 * sum(p.numel() for p in model.parameters())
    tokens = cfg.data.batch_size * cfg.data.max_seq_len
    act = activation_bytes(4096, 36, 151936, tokens, 2)
    for s, actor in zip(slices, plan["actor_bytes_per_slice"]):
        flush = 8 * max([i * o for l, i, o in mods if l in s] + [d * d for l, d in groups if l in s])
        x = 4 * tokens * sum(d for l, d in groups if l in s)
        assert actor == weights + act + stats(s) + stats(s) // 2 + flush + x
    assert plan["actor_bytes"] == max(plan["actor_bytes_per_slice"])

    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: the driver needs {plan['driver_bytes'] / GIB:.0f} GiB") and "\n" not in err


def test_driver_under_the_head_memory_gives_no_warning(capsys):
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80", "--head-mem-gb", "512"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "driver: " in captured.out and "GFLOP/s" in captured.out
    assert "stats.safetensors: 105.8 GiB, not written (profile.save_stats=null)" in captured.out


@pytest.mark.parametrize("extra,words", [(["--head-mem-gb", "0"], "--head-mem-gb"),
                                         (["--cpu-gflops", "-1"], "--cpu-gflops"),
                                         (["--json", "/nonexistent-dir/plan.json"], "/nonexistent-dir/plan.json")])
def test_plan_bad_input(capsys, extra, words):
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
