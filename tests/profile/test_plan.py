"""`layercard plan`: Qwen3-8B built on meta, sized against GPU memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layercard.config import load_config
from layercard.discovery import discover
from layercard.models import build_meta_model
from layercard.profile.plan import GIB, activation_bytes, driver_memory, slice_stat_bytes
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
    assert plan["stats_file_bytes"] == 0                     # ~106 GiB: not saved unless asked
    # the driver: int32 token ids and labels of 2048 records, the rows, K over 72 direction keys (Δ* and
    # sign steps) twice, and one micro-batch of sketched directions (2 × 512 tokens × 1024 columns) per key,
    # received and copied — no term grows with the width, so Qwen3-8B's driver stays small
    keys = 72
    token = 2048 * (2 * 4 * 512 + 400)
    rows = 8 * (36 * 64 + 36 * 7 * 32)
    chunk = 2 * 8 * (2 * 512) * 1024 * keys
    expected = {"data": token, "rows": token + rows, "pass 2": token + rows + 2 * 8 * keys * keys + chunk}
    assert plan["driver_phases_bytes"] == expected
    assert plan["driver_bytes"] == expected["pass 2"] and plan["driver_bytes"] < 4 * GIB < S / 25
    # the largest slice's solve on its owner: each of its 36 input groups' eigh twice (not cached)
    slice_groups = [d for l, d in groups if l in slices[0]]
    assert plan["solve_flops"] >= 2 * 9 * sum(float(d) ** 3 for d in slice_groups)
    one_slice = driver_memory(discover(model), [list(range(36))], coupling=True, adam=True, records=2048, seq_len=512,
                              rows_per_batch=1024, width=1024)
    assert plan["solve_flops"] == pytest.approx(one_slice.solve_flops / 4)   # 4 owners solve side by side
    assert plan["solve_s"] == pytest.approx(plan["solve_flops"] / 100e9)

    weights = 2 * sum(p.numel() for p in model.parameters())
    tokens = cfg.data.batch_size * cfg.data.max_seq_len
    act = activation_bytes(4096, 36, 151936, tokens, 2)
    for s, actor, owner in zip(slices, plan["actor_bytes_per_slice"], plan["owner_solve_bytes_per_slice"]):
        flush = 8 * max([i * o for l, i, o in mods if l in s] + [d * d for l, d in groups if l in s])
        x = 4 * tokens * sum(d for l, d in groups if l in s)
        eigh = 3 * 8 * max(d * d for l, d in groups if l in s)   # eigendecompositions (~15 GB) not kept
        deltas = 2 * 2 * sum(i * o for l, i, o in mods if l in s)   # bf16 Δ* and sign steps
        assert owner == eigh + deltas
        assert actor == weights + stats(s) + max(act + stats(s) // 2 + flush + x, owner)
    assert plan["actor_bytes"] == max(plan["actor_bytes_per_slice"])
    assert capsys.readouterr().err == ""                    # the driver fits the head


def test_driver_over_the_head_memory_warns(capsys):
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80", "--head-mem-gb", "0.5"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: the driver needs 1 GiB") and "\n" not in err


def test_driver_under_the_head_memory_gives_no_warning(capsys):
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80", "--head-mem-gb", "512"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "driver: " in captured.out and "GFLOP/s" in captured.out
    assert "statistics: 105.8 GiB, not written (profile.save_stats=null)" in captured.out


@pytest.mark.parametrize("extra,words", [(["--head-mem-gb", "0"], "--head-mem-gb"),
                                         (["--cpu-gflops", "-1"], "--cpu-gflops"),
                                         (["--json", "/nonexistent-dir/plan.json"], "/nonexistent-dir/plan.json")])
def test_plan_bad_input(capsys, extra, words):
    assert cli(["plan", "--config", CONFIG, "--gpus", "8", "--gpu-mem-gb", "80", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
